#!/usr/bin/env bash
# The full test suite: the Rust tests (server, simulator and clients over
# loopback), then the interop suite with grpcurl, buf, ghz and the Go, Python,
# Node.js and Java clients. This is the README's test command and what
# .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked
scripts/interop.sh
