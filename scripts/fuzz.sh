#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (seconds, default 60):
#   scripts/fuzz.sh --dev 30  # CI's short run: an unoptimised build
#   scripts/fuzz.sh 3600      # the longer run, before a release
# --dev builds without optimisations (debug assertions and overflow checks
# on): about a third less build time, the most of a 30 s run; the long run
# wants the optimised build's speed per input.
# cargo fuzz needs nightly-only compiler flags (sanitizers); no nightly
# toolchain is assumed here, so the stable compiler is allowed them with
# RUSTC_BOOTSTRAP=1 for this build only. Each run is capped in memory
# (-rss_limit_mb, which also bounds a single allocation) and input size.
#
# Exits non-zero when any target crashes, panics, goes past its memory cap
# or does not build: with the first failing target's cargo-fuzz exit status.
# Every target runs even after a failure, so one report shows them all. The
# summary lines are printed here; each target's full log stays in
# fuzz/target/fuzz-logs/TARGET.log and a crashing input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
build=(-O)
if [[ "${1:-}" == --dev ]]; then
  build=(--dev)
  shift
fi
seconds=${1:-60}
CARGO_FUZZ_VERSION=0.13.2
if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
export RUSTC_BOOTSTRAP=1
logs="$PWD/target/fuzz-logs"
mkdir -p "$logs"

first_failure=0
failed=()
for target in upstream_reply request_mapping; do
  echo "== fuzzing $target for ${seconds}s"
  log="$logs/$target.log"
  status=0
  cargo fuzz run "${build[@]}" "$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=65536 \
    >"$log" 2>&1 || status=$?
  # The summary: libFuzzer's last lines, sanitizer reports, panics, build errors.
  # grep exits 1 when nothing matches; that says nothing about the run.
  grep -E '^Done|DONE|ERROR|panicked|SUMMARY|==[0-9]+==|^error' "$log" || [[ $? -eq 1 ]]
  if ((status != 0)); then
    echo "FAILED  $target: cargo fuzz exited with $status; last lines of $log:"
    tail -n 30 "$log" | sed 's/^/    /'
    failed+=("$target")
    ((first_failure != 0)) || first_failure=$status
  fi
done
if ((${#failed[@]} > 0)); then
  echo "fuzzing: ${#failed[@]} target(s) failed: ${failed[*]}"
  exit "$first_failure"
fi
echo "fuzzing: no crash"
