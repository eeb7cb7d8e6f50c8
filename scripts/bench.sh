#!/usr/bin/env bash
# Per-call cost against the plain-proxy floor, in one run (benches/proxy_cost.rs):
#   scripts/bench.sh                 # release build, 6 s runs, median of 3
#   scripts/bench.sh --seconds 10    # longer runs
#   scripts/bench.sh --smoke         # CI: debug build, one 1 s run each, so it never rots
# Pins the server to core 0 (taskset, when present) with one tokio worker;
# the load and the simulator run on core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=(--release)
args=()
if [[ "${1:-}" == "--smoke" ]]; then
  shift
  profile=()
  args=(--seconds 1 --runs 1)
fi
cargo build --locked --quiet "${profile[@]}" --example floor --bin piclumen-grpc
dir=target/$([[ ${#profile[@]} -gt 0 ]] && echo release || echo debug)
bench=(cargo bench --locked --quiet --bench proxy_cost)
[[ ${#profile[@]} -gt 0 ]] || bench+=(--profile dev)
# Build unpinned (both cores), then run pinned to core 1.
"${bench[@]}" --no-run
run=("${bench[@]}" -- --floor "$dir/examples/floor" "${args[@]}" "$@")
if command -v taskset >/dev/null; then
  taskset -c 1 "${run[@]}"
else
  "${run[@]}"
fi
