#!/usr/bin/env bash
# The interop suite: our users' real tools against a real piclumen-grpc.
#   - grpcurl runs the README's example block verbatim against `serve --simulate`
#   - buf lint, buf format and buf breaking against the released contract (scripts/buf-breaking.sh)
#   - ghz drives each RPC briefly
#   - the generated Go, Python, Node.js and Java clients run their scenario
#     against a server whose upstream (the simulator) accepts one token only,
#     their WatchImages step included (three jobs and an unknown id on one
#     stream: every job SUCCEEDED once, the unknown id NOT_FOUND)
#   - each of those clients, with the published retry policy
#     (clients/service_config.json), rides through a server restart (drain,
#     a pause, then a new process on the same port) without an error reaching
#     its code; a control shows a client without the policy does not
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

for port in 50051 50052 50053 18080; do
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
    "JOB_STATE_PENDING" '"queuePosition"' "JOB_STATE_SUCCEEDED" '"etag"' \
    "// WatchImages streams the states of many jobs"; do
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
  ghz --insecure --proto proto/piclumen/v1/image_service.proto --import-paths proto,proto-vendor \
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
    ghz_rpc WatchImage "{\"mark_id\": \"$mark_id\"}" &&
    ghz_rpc WatchImages "{\"mark_ids\": [\"$mark_id\"]}"
}
run ghz ghz_all

echo "== generated clients"
run generate-stubs clients/generate.sh
export PICLUMEN_ADDR=127.0.0.1:50052 PICLUMEN_TOKEN=interop-token
# watch_images_done LOG: the client's WatchImages step saw its three jobs end
# SUCCEEDED, each once, the unknown id come back NOT_FOUND, and the stream end
# OK (each client checks that and prints this line only then).
watch_images_done() {
  grep -q "watch_images: 3 SUCCEEDED, 1 NOT_FOUND, stream ended OK" "$1" ||
    { echo "the client's WatchImages step did not finish"; return 1; }
}
# client_scenario NAME COMMAND...: a client's scenario, its WatchImages step
# included.
client_scenario() {
  local out="$LOGS/$1.out"
  shift
  "$@" | tee "$out" || return 1
  watch_images_done "$out"
}
# The Go client sends W3C trace context (OpenTelemetry's propagator) and
# prints its trace id; the server's log lines of those calls carry it.
client_go() {
  (cd clients/go && go run .) | tee "$LOGS/client-go.out" || return 1
  watch_images_done "$LOGS/client-go.out" || return 1
  local trace_id
  trace_id=$(sed -n 's/^trace_id=//p' "$LOGS/client-go.out")
  [[ -n "$trace_id" ]] || { echo "the Go client printed no trace_id"; return 1; }
  grep -q "\"trace_id\":\"$trace_id\"" "$LOGS/server.out" ||
    { echo "no server log line in trace $trace_id"; return 1; }
  echo "the server's log lines are in the Go client's trace $trace_id"
}
run client-go client_go
run client-python client_scenario client-python "$TOOLS/venv/bin/python" clients/python/client.py
run client-node client_scenario client-node node clients/node/client.js
# The same scenario over gRPC-Web (Connect-ES, HTTP/1.1) on the same port;
# Node sends no Origin, so the server needs no --cors-allow-origin.
run client-web node clients/web/client.js
run client-java client_scenario client-java bash -c 'cd clients/java && mvn -q -B compile exec:java'

echo "== restarts under the clients (clients/service_config.json)"
RESTART_ADDR=127.0.0.1:50053
# forget PID: drops a process that has been waited for from the cleanup list.
forget() {
  local keep=() pid
  for pid in "${PIDS[@]}"; do [[ $pid == "$1" ]] || keep+=("$pid"); done
  PIDS=("${keep[@]}")
}
# serve_restartable LOG: a server on $RESTART_ADDR whose upstream is the
# simulator above (which outlives it, so jobs survive the restart); sets
# SERVER_PID once the server listens.
serve_restartable() {
  "$BIN" serve --listen "$RESTART_ADDR" --upstream-url http://127.0.0.1:18080 \
    --poll-interval 300ms --drain-timeout 5s >"$1" 2>&1 &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  for _ in $(seq 1 200); do
    grep -qs "listening on" "$1" && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "the server did not start:" && cat "$1"
  return 1
}
# stop PID: SIGTERM, then wait for it (the server drains within 5 s).
stop() {
  kill "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  forget "$1"
}
# restart_scenario NAME COMMAND...: runs a client's restart scenario
# (PICLUMEN_SCENARIO=restart: GenerateImage then CheckImage every ~100 ms for
# 8 s, exiting non-zero on the first error its code sees) against a server on
# $RESTART_ADDR. About 1 s after the client's first answered call the server
# gets SIGTERM: it refuses new calls (UNAVAILABLE, SHUTTING_DOWN), stops
# listening, drains and exits. The port then stays closed for
# $RESTART_GAP s (connections refused: UNAVAILABLE), as while a process
# restarts, and a new server listens on it. (Without the pause the new process
# listens ~0.1 s after the old one stopped, between two of the client's calls,
# and even a client without a retry policy sees nothing.) Sets RESTART_RC to the client's
# exit status and RESTART_CALLING to yes when it was still calling once the
# new server listened.
RESTART_GAP=0.5
restart_scenario() {
  local name=$1
  shift
  local dir="$LOGS/$name.d"
  mkdir -p "$dir"
  serve_restartable "$dir/server-1.out" || return 1
  local first=$SERVER_PID
  PICLUMEN_ADDR=$RESTART_ADDR PICLUMEN_SCENARIO=restart PICLUMEN_RESTART_SECONDS=8 \
    timeout 180 "$@" >"$dir/client.out" 2>&1 &
  local client=$!
  PIDS+=("$client")
  # Clients start at their own pace (a JVM under Maven takes seconds).
  until grep -qs "first call ok" "$dir/client.out"; do
    if ! kill -0 "$client" 2>/dev/null; then
      wait "$client"
      forget "$client"
      stop "$first"
      echo "the client ended before its first answered call:" && cat "$dir/client.out"
      return 1
    fi
    sleep 0.05
  done
  sleep 1
  kill -TERM "$first"
  wait "$first"
  local drained=$?
  forget "$first"
  sleep "$RESTART_GAP"
  serve_restartable "$dir/server-2.out" || { stop "$client"; return 1; }
  local second=$SERVER_PID
  RESTART_CALLING=yes
  kill -0 "$client" 2>/dev/null || RESTART_CALLING=no
  wait "$client"
  RESTART_RC=$?
  forget "$client"
  stop "$second"
  cat "$dir/client.out"
  echo "--- the first server's log after SIGTERM:"
  sed -n '/SIGTERM/,$p' "$dir/server-1.out"
  [[ $drained -eq 0 ]] || { echo "the first server exited $drained after SIGTERM"; return 1; }
}
# restart_check NAME COMMAND...: the client rides through the restart: it
# exits 0, no error having reached its code, and kept calling across it.
restart_check() {
  restart_scenario "$@" || return 1
  [[ $RESTART_RC -eq 0 ]] || { echo "an error reached the client's code (exit $RESTART_RC)"; return 1; }
  [[ $RESTART_CALLING == yes ]] || { echo "the client had ended before the new server listened"; return 1; }
}
build_go_client() { (cd clients/go && go build -o "$LOGS/go-client-bin" .); }
# From clients/go, where its default ../service_config.json is.
GO_CLIENT=(bash -c 'cd clients/go && exec "$0"' "$LOGS/go-client-bin")
restart_go() { build_go_client && restart_check restart-go "${GO_CLIENT[@]}"; }
# The control: the same Go client with an empty service config (no retry
# policy) must see the restart as an UNAVAILABLE error, or the checks prove
# nothing.
restart_without_policy() {
  build_go_client || return 1
  echo '{}' >"$LOGS/no-policy.json"
  restart_scenario restart-without-policy env PICLUMEN_SERVICE_CONFIG="$LOGS/no-policy.json" "${GO_CLIENT[@]}" ||
    return 1
  [[ $RESTART_RC -ne 0 ]] && grep -q "code = Unavailable" "$LOGS/restart-without-policy.d/client.out" ||
    { echo "without a retry policy the restart went unnoticed"; return 1; }
  echo "without a retry policy, the restart reached the client's code as UNAVAILABLE"
}
run restart-go restart_go
run restart-python restart_check restart-python "$TOOLS/venv/bin/python" clients/python/client.py
run restart-node restart_check restart-node node clients/node/client.js
run restart-java restart_check restart-java bash -c 'cd clients/java && exec mvn -q -B compile exec:java'
run restart-without-policy restart_without_policy

echo "== Swagger UI of the first version's HTTP API, in headless Chromium"
run docs-chromium scripts/docs-check.sh "$LOGS/docs-check"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
