#!/usr/bin/env bash
# The interop suite: our users' real tools against a real piclumen-grpc.
#   - grpcurl runs the README's example block verbatim against `serve --simulate`
#   - buf lint, buf format and buf breaking against the released contract (scripts/buf-breaking.sh)
#   - ghz drives each RPC briefly
#   - the generated Go, Python, Node.js and Java clients run their scenario
#     against a server whose upstream (the simulator) accepts one token only
# Installs its pinned tools (scripts/tools.sh), starts every process it needs,
# stops them by PID, and ends with a line "N passed, N failed".
set -uo pipefail
source "$(dirname "$0")/tools.sh"
cd "$ROOT"

LOGS="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
}
trap cleanup EXIT

passed=0
failed=0
# run NAME COMMAND...: one check; its output is shown when it fails.
run() {
  local name=$1
  shift
  if "$@" >"$LOGS/$name.log" 2>&1; then
    passed=$((passed + 1))
    echo "ok      $name"
  else
    failed=$((failed + 1))
    echo "FAILED  $name"
    sed 's/^/    /' "$LOGS/$name.log" | tail -40
  fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start NAME ARGS...: runs the binary in the background, waits for its
# "listening on" line.
start() {
  local name=$1
  shift
  "$BIN" "$@" >"$LOGS/$name.out" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    grep -q "listening on" "$LOGS/$name.out" && return 0
    sleep 0.1
  done
  echo "$name did not start:" && cat "$LOGS/$name.out"
  exit 1
}

echo "== installing pinned tools"
install_tools || { echo "tool installation failed"; exit 1; }
cargo build --locked --quiet --bin piclumen-grpc || exit 1
BIN="$ROOT/target/debug/piclumen-grpc"

for port in 50051 50052 18080; do
  port_free "$port" || { echo "port $port is in use; stop what holds it"; exit 1; }
done
start quickstart serve --simulate --listen 127.0.0.1:50051 --sim-job-duration 2s --poll-interval 300ms
start sim sim --listen 127.0.0.1:18080 --tokens interop-token --job-duration 2s
# JSON logs with tracing on (towards a collector that is not there): the Go
# client's trace id must show up in this server's log lines.
start server serve --listen 127.0.0.1:50052 --upstream-url http://127.0.0.1:18080 --poll-interval 300ms \
  --log-format json --otlp-endpoint http://127.0.0.1:9

echo "== grpcurl: the README's commands, verbatim"
readme_grpcurl() {
  local script="$LOGS/readme-grpcurl.sh"
  sed -n '/<!-- grpcurl-example:begin -->/,/<!-- grpcurl-example:end -->/p' README.md |
    grep -v -e '^<!--' -e '^```' >"$script"
  [[ -s "$script" ]] || { echo "no grpcurl block in README.md"; return 1; }
  bash -euo pipefail "$script" >"$LOGS/grpcurl.out" 2>&1 || { cat "$LOGS/grpcurl.out"; return 1; }
  cat "$LOGS/grpcurl.out"
  local out
  out="$(cat "$LOGS/grpcurl.out")"
  for want in "piclumen.v1.ImageService" "grpc.health.v1.Health" "grpc.reflection.v1.ServerReflection" \
    "// WatchImage streams the job's state" '"status": "SERVING"' '"markId"' \
    "JOB_STATE_PENDING" '"queuePosition"' "JOB_STATE_SUCCEEDED"; do
    grep -qF -- "$want" <<<"$out" || { echo "missing in grpcurl output: $want"; return 1; }
  done
  # The stream's last message is the terminal one, with both images.
  [[ "$(grep -o 'JOB_STATE_[A-Z]*' <<<"$out" | tail -1)" == JOB_STATE_SUCCEEDED ]] || return 1
  [[ "$(grep -c "\"url\"" <<<"$out")" -ge 2 ]] || { echo "expected the two image URLs"; return 1; }
}
run grpcurl-readme readme_grpcurl
run grpcurl-error-details bash -c '
  out=$(grpcurl -plaintext -d "{\"prompt\": \"\"}" localhost:50051 piclumen.v1.ImageService/GenerateImage 2>&1)
  echo "$out"
  grep -q "Code: InvalidArgument" <<<"$out" && grep -q "\"reason\": \"INVALID_REQUEST\"" <<<"$out" \
    && grep -q "\"field\": \"prompt\"" <<<"$out"'

echo "== buf"
run buf-lint bash -c 'cd proto && buf lint'
run buf-format bash -c 'cd proto && buf format --diff --exit-code'
run buf-breaking scripts/buf-breaking.sh

echo "== ghz"
ghz_rpc() {
  local rpc=$1 data=$2
  ghz --insecure --proto proto/piclumen/v1/image_service.proto --import-paths proto \
    --call "piclumen.v1.ImageService/$rpc" -m '{"authorization": "Bearer demo-token"}' \
    -d "$data" -n 20 -c 5 -O json localhost:50051 >"$LOGS/ghz-$rpc.json" || return 1
  python3 - "$LOGS/ghz-$rpc.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
codes = report.get("statusCodeDistribution", {})
print(report["count"], "calls", codes)
assert report["count"] == 20 and codes == {"OK": 20}, codes
PY
}
ghz_all() {
  local mark_id
  mark_id=$(grpcurl -plaintext -H 'authorization: Bearer demo-token' -d '{"prompt": "ghz"}' \
    localhost:50051 piclumen.v1.ImageService/GenerateImage | sed -n 's/.*"markId": "\(.*\)".*/\1/p')
  ghz_rpc GenerateImage '{"prompt": "a magical landscape"}' &&
    ghz_rpc CheckImage "{\"mark_id\": \"$mark_id\"}" &&
    ghz_rpc WatchImage "{\"mark_id\": \"$mark_id\"}"
}
run ghz ghz_all

echo "== generated clients"
run generate-stubs clients/generate.sh
export PICLUMEN_ADDR=127.0.0.1:50052 PICLUMEN_TOKEN=interop-token
# The Go client sends W3C trace context (OpenTelemetry's propagator) and
# prints its trace id; the server's log lines of those calls carry it.
client_go() {
  (cd clients/go && go run .) | tee "$LOGS/client-go.out" || return 1
  local trace_id
  trace_id=$(sed -n 's/^trace_id=//p' "$LOGS/client-go.out")
  [[ -n "$trace_id" ]] || { echo "the Go client printed no trace_id"; return 1; }
  grep -q "\"trace_id\":\"$trace_id\"" "$LOGS/server.out" ||
    { echo "no server log line in trace $trace_id"; return 1; }
  echo "the server's log lines are in the Go client's trace $trace_id"
}
run client-go client_go
run client-python "$TOOLS/venv/bin/python" clients/python/client.py
run client-node node clients/node/client.js
# The same scenario over gRPC-Web (Connect-ES, HTTP/1.1) on the same port;
# Node sends no Origin, so the server needs no --cors-allow-origin.
run client-web node clients/web/client.js
run client-java bash -c 'cd clients/java && mvn -q -B compile exec:java'

echo "== Swagger UI of the first version's HTTP API, in headless Chromium"
run docs-chromium scripts/docs-check.sh "$LOGS/docs-check"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
