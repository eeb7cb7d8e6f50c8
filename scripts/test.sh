#!/usr/bin/env bash
# The full test suite: the Rust tests (server, simulator, Redis and clients
# over loopback), then the interop suite with grpcurl, buf, ghz, the Go,
# Python, Node.js, Java and gRPC-Web clients and Swagger UI in headless
# Chromium, then a short smoke run of the per-call benchmark so it never
# rots. This is the README's test command and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# The Redis tests start their own redis-server; install it once, up front.
scripts/redis.sh >/dev/null
cargo test --locked
scripts/interop.sh
scripts/bench.sh --smoke
