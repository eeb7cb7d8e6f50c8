#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (seconds, default 60):
#   scripts/fuzz.sh 60        # CI's short run
#   scripts/fuzz.sh 3600      # the longer run, before a release
# cargo fuzz needs nightly-only compiler flags (sanitizers); no nightly
# toolchain is assumed here, so the stable compiler is allowed them with
# RUSTC_BOOTSTRAP=1 for this build only. Each run is capped in memory
# (-rss_limit_mb) and input size, so an unbounded allocation fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz 0.13.2" ]]; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
export RUSTC_BOOTSTRAP=1
for target in upstream_reply request_mapping; do
  echo "== fuzzing $target for ${seconds}s"
  cargo fuzz run -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=65536 2>&1 |
    grep -E '^Done|DONE|ERROR|panicked|SUMMARY|==[0-9]+==' || true
  # cargo fuzz exits non-zero on a crash; pipefail carries it here.
done
echo "fuzzing: no crash"
