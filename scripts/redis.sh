#!/usr/bin/env bash
# Makes sure `redis-server` is installed (Debian's package), for the tests of
# `--idempotency-store redis://` (tests/redis.rs starts its own servers on
# free loopback ports, persistence off). Prints the binary's path.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  echo "installing redis-server" >&2
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server >&2
fi
command -v redis-server
