#!/usr/bin/env bash
# Checks that the Swagger UI at /docs of the HTTP API (--http-listen) renders
# both endpoints in a real browser: starts `serve --simulate` with the HTTP
# API on free loopback ports, loads /docs in headless Chromium (Debian's
# `chromium`, installed with apt-get when missing, which needs root), and
# looks for Swagger UI's rendered operation blocks of /generate-image and
# /check-image in the DOM (they exist only once Swagger UI's JavaScript has
# fetched /openapi.json and rendered it). Also saves a screenshot.
# Usage: scripts/docs-check.sh [OUT_DIR]   (default: target/docs-check)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-target/docs-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PIDS=()
PROFILE=""
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n "$PROFILE" ]]; then rm -rf "$PROFILE"; fi
}
trap cleanup EXIT

fail() {
  echo "docs-check: FAILED: $*" >&2
  exit 1
}

if ! command -v chromium >/dev/null; then
  [[ "$(id -u)" -eq 0 ]] || fail "chromium is missing and installing it needs root (apt-get install chromium)"
  echo "== installing chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "== building piclumen-grpc"
cargo build --locked --quiet --bin piclumen-grpc
BIN="$PWD/target/debug/piclumen-grpc"

# A free loopback port: bind port 0, read it back, release it.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
GRPC_PORT="$(free_port)"
HTTP_PORT="$(free_port)"
[[ "$GRPC_PORT" != "$HTTP_PORT" ]] || HTTP_PORT="$(free_port)"

"$BIN" serve --simulate --listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
  >"$OUT/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  grep -q "HTTP API" "$OUT/server.log" && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$OUT/server.log"; fail "the server exited"; }
  sleep 0.1
done
grep -q "HTTP API" "$OUT/server.log" || { cat "$OUT/server.log"; fail "the HTTP API did not start"; }

URL="http://127.0.0.1:$HTTP_PORT/docs"
# chromium ARGS...: one headless run with a fresh profile and no network
# besides loopback; bounded in time.
chromium_run() {
  PROFILE="$(mktemp -d)"
  timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$PROFILE" --virtual-time-budget=10000 "$@" 2>>"$OUT/chromium.log"
  rm -rf "$PROFILE"
  PROFILE=""
}

echo "== rendering $URL in headless chromium"
: >"$OUT/chromium.log"
chromium_run --dump-dom "$URL" >"$OUT/docs.html" || fail "chromium failed (see $OUT/chromium.log)"
for path in /generate-image /check-image; do
  grep -q "class=\"opblock-summary-path\" data-path=\"$path\"" "$OUT/docs.html" ||
    fail "the rendered page shows no operation $path (DOM in $OUT/docs.html)"
done
blocks="$(grep -o 'class="opblock opblock-post' "$OUT/docs.html" | wc -l)"
[[ "$blocks" -eq 2 ]] || fail "expected 2 rendered POST operations, found $blocks"

chromium_run --window-size=1280,1000 --screenshot="$OUT/docs.png" "$URL" >/dev/null ||
  fail "chromium could not take the screenshot"
[[ "$(head -c 8 "$OUT/docs.png" | od -An -tx1 | tr -d ' \n')" == 89504e470d0a1a0a ]] ||
  fail "the screenshot is not a PNG"

echo "docs-check: ok: /docs renders POST /generate-image and POST /check-image (screenshot: $OUT/docs.png)"
