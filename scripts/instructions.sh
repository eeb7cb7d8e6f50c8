#!/usr/bin/env bash
# instructions.sh CHECKOUT_DIR [N]
#
# The server's CPU cost per call as an instruction count, to compare code
# versions ("GenerateImage's and CheckImage's instructions per call no higher
# than before"). Wall time on a shared machine swings; instruction counts
# repeat within about 1%.
#
# Method: build CHECKOUT_DIR in release (`cargo build --release --locked`,
# niced), start its simulator (`piclumen-grpc sim`, NOT under valgrind; jobs
# last an hour so they stay pending; no latency, no faults) and, for each
# scenario, a fresh `piclumen-grpc serve` under
# `valgrind --tool=cachegrind --cache-sim=no` pointed at it; send the
# scenario's calls with ghz (not under valgrind); stop the server with SIGTERM
# by PID (it drains and exits 0) and read `I refs` from valgrind's summary.
#
#   instructions/call SCENARIO = (I refs SCENARIO - I refs idle) / N
#
# Scenarios (each a fresh server process under valgrind):
#   idle            start, wait until it listens, stop: no calls (the baseline).
#   generate        N GenerateImage {"prompt": "a magical landscape"},
#                   sequential (ghz -c 1, one connection); one upstream create
#                   per call.
#   check           CheckImage of ONE pending job, N times, sequential: the
#                   first check asks the simulator, the other N-1 are answered
#                   from the hub's state (the shared, cached path). This is the
#                   common case the hub is built for (many callers checking
#                   one job, see BENCHMARKS.md "CheckImage, 160 callers").
#   check-distinct  CheckImage of N DISTINCT pending jobs, one each,
#                   sequential: every check goes upstream (one
#                   batch-process-task call each): the full path.
# Both check flavours are measured because they are different code paths; a
# change can make one cheaper and the other dearer.
#
# The jobs the checks ask about are created directly at the simulator (curl,
# same token), not through the server, so no setup call is counted: the
# server holds no job state, and a job created there is, for it, identical to
# one created through GenerateImage. The scenario's whole I refs are checks
# (plus the fixed cost of one client connection, spread over N, as in
# `generate`).
#
# Fixed so that the counts do not depend on timing:
#   --poll-interval 1h       the cached answer of `check` never goes stale
#                            mid-run (with the default 2s the number of
#                            upstream calls would follow wall time), and no
#                            sweep timer fires;
#   --max-connection-age 24h no GOAWAY/reconnect in a long run;
#   --http2-keepalive-interval 1h  no server pings;
#   TOKIO_WORKER_THREADS=1   (INSTRUCTIONS_WORKERS) one tokio worker, as in
#                            scripts/bench.sh, and the same runtime on any
#                            machine. With 2 workers, check-distinct moved
#                            between runs by up to 1.5% (cross-thread
#                            wake-ups between the connection and the hub's
#                            poller, probably); with 1 and N=20000,
#                            every scenario repeats within 0.8%.
# Still timer-driven: a 1 s runtime-gauge tick and a 10 s idempotency sweep,
# about 5,000 instructions per second of wall time, i.e. a few per call:
# negligible (each scenario's wall time is printed).
# What remains varies with timing: how often the connection task and the log
# writer thread wake (one read or two per request, one log flush per line or
# per batch). On the 2-core machine, 1cf296d, 1 worker, repeated runs
# (lowest-highest per call):
#   N=2000 (11 runs):  generate 151.8k-154.1k (1.5%), check 69.5k-70.7k
#                      (1.7%), check-distinct 153.5k-154.8k (0.9%);
#   N=20000 (8 runs):  generate 152.9k-153.9k (0.6%), check 70.3k-70.8k
#                      (0.8%), check-distinct 154.4k-155.0k (0.4%);
#                      about 62 s per run in all.
# So a difference under ~1% is noise: run each version 2-3 times, alternating.
# Metrics, OpenTelemetry, the HTTP API and TLS are off; logging is the
# default (info, text, to a file); everything listens on 127.0.0.1 on free
# ports chosen here. PICLUMEN_*, OTEL_*, TOKIO_*, RUST_LOG and *_proxy
# variables of the caller's environment are cleared so they cannot change
# what runs.
# Upstream calls per scenario (from the simulator's /_sim/stats) are printed
# and checked: generate = N creates, check = 1 status call,
# check-distinct = N status calls; every ghz call must be OK.
#
# Tools: valgrind (apt-get install when missing), ghz at the version pinned in
# CHECKOUT_DIR/scripts/tools.sh (installed with `go install` into
# $INSTRUCTIONS_TOOLS, default CHECKOUT_DIR/.tools/instructions, when missing;
# INSTRUCTIONS_GHZ=/path/to/ghz overrides), curl, jq, ss.
# N defaults to 20000 (the smaller spread; each scenario takes 12-25 s
# under valgrind on the 2-core machine); N=2000 takes about 20 s in all.
# Environment: INSTRUCTIONS_SCENARIOS (default "generate check check-distinct";
# idle always runs), INSTRUCTIONS_WORKERS (default 1),
# INSTRUCTIONS_VALGRIND_ARGS (extra valgrind words, e.g. --fair-sched=yes),
# INSTRUCTIONS_CALLERS=COUNT runs every server with a `--callers-file` of
# COUNT named callers (keys `instructions-key-1` ...), the calls sent as the
# last of them, whose `images_per_day` and `creates_per_minute` are high
# enough never to refuse: the cost of identifying a caller among COUNT and
# of counting its creates (default: no callers file, no API key).
# INSTRUCTIONS_KEEP=1 keeps the work dir (valgrind logs, cachegrind.out.* for
# cg_annotate/cg_diff, server logs, ghz reports); default: kept only on
# failure.
#
# Output: for each scenario `I refs SCENARIO: TOTAL (...)` and
# `instructions/call SCENARIO: X`; the last lines repeat the per-call figures.
set -euo pipefail

usage() {
  echo "usage: $0 CHECKOUT_DIR [N]" >&2
  exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
[[ -d $1 ]] || { echo "no such directory: $1" >&2; usage; }
CHECKOUT=$(cd "$1" && pwd)
N=${2:-20000}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer: $N" >&2; usage; }
SCENARIOS=${INSTRUCTIONS_SCENARIOS:-generate check check-distinct}
WORKERS=${INSTRUCTIONS_WORKERS:-1}
TOOLS=${INSTRUCTIONS_TOOLS:-$CHECKOUT/.tools/instructions}
TOKEN=simtoken
PROMPT="a magical landscape"

for s in $SCENARIOS; do
  case $s in
    generate | check | check-distinct) ;;
    *) echo "unknown scenario: $s (generate, check, check-distinct)" >&2; exit 2 ;;
  esac
done

# Nothing from the caller's environment changes what the server or the
# clients do.
while read -r v; do
  unset "$v"
done < <(compgen -e | grep -E '^(PICLUMEN_|OTEL_|TOKIO_)|^RUST_LOG$|_proxy$|_PROXY$' || true)

log() { echo "[instructions] $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in curl jq ss awk; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

# --- tools -----------------------------------------------------------------

if ! command -v valgrind >/dev/null; then
  log "installing valgrind"
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq valgrind >/dev/null
  fi
fi

GHZ_VERSION=$(sed -n 's/^GHZ_VERSION=\(v[0-9.]*\).*/\1/p' "$CHECKOUT/scripts/tools.sh" 2>/dev/null || true)
GHZ_VERSION=${GHZ_VERSION:-v0.121.0}
GHZ_TARGET="github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
if [[ -n ${INSTRUCTIONS_GHZ:-} ]]; then
  GHZ=$INSTRUCTIONS_GHZ
elif [[ -x $CHECKOUT/.tools/bin/ghz && "$(cat "$CHECKOUT/.tools/stamps/ghz" 2>/dev/null)" == "$GHZ_TARGET" ]]; then
  GHZ=$CHECKOUT/.tools/bin/ghz
else
  GHZ=$TOOLS/bin/ghz
  if [[ ! -x $GHZ || "$(cat "$TOOLS/stamps/ghz" 2>/dev/null)" != "$GHZ_TARGET" ]]; then
    command -v go >/dev/null || die "go is required to install ghz (or set INSTRUCTIONS_GHZ)"
    log "installing $GHZ_TARGET into $TOOLS/bin"
    mkdir -p "$TOOLS/stamps"
    (cd /tmp && GOBIN="$TOOLS/bin" go install "$GHZ_TARGET") >&2
    echo "$GHZ_TARGET" >"$TOOLS/stamps/ghz"
  fi
fi
[[ -x $GHZ ]] || die "ghz not found at $GHZ"

PROTO_DIR=$CHECKOUT/proto
# Versions that import googleapis' google/rpc/status.proto vendor it here.
if [[ -d $CHECKOUT/proto-vendor ]]; then
  PROTO_DIR=$PROTO_DIR,$CHECKOUT/proto-vendor
fi
PROTO=$CHECKOUT/proto/piclumen/v1/image_service.proto
[[ -f $PROTO ]] || die "no $PROTO"

# --- build -----------------------------------------------------------------

log "building $CHECKOUT (release)"
(cd "$CHECKOUT" && nice -n 10 cargo build --release --locked) >&2
TARGET_DIR=$(cd "$CHECKOUT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
BIN=$TARGET_DIR/release/piclumen-grpc
[[ -x $BIN ]] || die "no binary at $BIN"
REV=$(git -C "$CHECKOUT" rev-parse --short HEAD 2>/dev/null || echo "$CHECKOUT")
git -C "$CHECKOUT" diff --quiet HEAD 2>/dev/null || REV="$REV (with local changes)"
log "commit: $REV"

# --- processes -------------------------------------------------------------

WORK=$(mktemp -d /tmp/instructions-run.XXXXXX)
# The PIDs of the processes this script started and has not reaped yet:
# only those are ever signalled.
SIM_PID=
SERVER_PID=
GHZ_PID=
OK=0
cleanup() {
  local pid
  for pid in $GHZ_PID $SERVER_PID $SIM_PID; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $GHZ_PID $SERVER_PID $SIM_PID; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ $OK -eq 1 && -z ${INSTRUCTIONS_KEEP:-} ]]; then
    rm -rf "$WORK"
  else
    log "work dir kept: $WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A loopback TCP port nothing uses now.
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 40000))
    if [[ -z $(ss -Htan "sport = :$p" 2>/dev/null) ]]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

SIM_PORT=$(free_port) || die "no free port"
SIM=http://127.0.0.1:$SIM_PORT
"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --job-duration 1h --job-jitter 0 \
  --latency 0s --fail-5xx-rate 0 --fail-429-rate 0 --log warn \
  >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 300); do
  curl -sf "$SIM/_sim/stats" >/dev/null 2>&1 && break
  kill -0 "$SIM_PID" 2>/dev/null || { cat "$WORK/sim.log" >&2; die "the simulator exited"; }
  sleep 0.1
done
curl -sf "$SIM/_sim/stats" >/dev/null || die "the simulator does not answer"

sim_stat() { curl -sf "$SIM/_sim/stats" | jq -r ".$1"; }

# create_jobs COUNT FILE: COUNT pending jobs of TOKEN created at the
# simulator directly (one curl, one connection); FILE gets a JSON array of
# {"mark_id": ...} for ghz.
create_jobs() {
  local count=$1 out=$2 cfg=$WORK/create.curl
  printf '{"prompt": "%s"}' "$PROMPT" >"$WORK/create.json"
  {
    echo "header = \"authorization: $TOKEN\""
    echo 'header = "content-type: application/json"'
    echo "data = \"@$WORK/create.json\""
    # shellcheck disable=SC2028 # a literal \n: curl's config parses it
    echo 'write-out = "\n"'
    for ((i = 0; i < count; i++)); do echo "url = \"$SIM/api/gen/create\""; done
  } >"$cfg"
  curl -sS --fail -K "$cfg" | jq -cs '[.[] | {mark_id: .data.markId}]' >"$out"
  [[ $(jq '[.[] | select(.mark_id | type == "string" and length > 0)] | length' "$out") -eq $count ]] ||
    die "could not create $count jobs at the simulator"
}

# With INSTRUCTIONS_CALLERS: the callers file, and the metadata of calls.
CALLERS_ARGS=()
METADATA="{\"authorization\": \"Bearer $TOKEN\"}"
if [[ -n ${INSTRUCTIONS_CALLERS:-} ]]; then
  [[ $INSTRUCTIONS_CALLERS =~ ^[1-9][0-9]*$ ]] || die "INSTRUCTIONS_CALLERS must be a positive integer"
  for ((i = 1; i <= INSTRUCTIONS_CALLERS; i++)); do
    printf '[[caller]]\nname = "caller-%d"\nkey_sha256 = "%s"\nimages_per_day = 100000000\ncreates_per_minute = 100000000\n\n' \
      "$i" "$(printf '%s' "instructions-key-$i" | sha256sum | cut -d' ' -f1)"
  done >"$WORK/callers.toml"
  CALLERS_ARGS=(--callers-file "$WORK/callers.toml")
  METADATA="{\"authorization\": \"Bearer $TOKEN\", \"x-api-key\": \"instructions-key-$INSTRUCTIONS_CALLERS\"}"
  log "callers file: $INSTRUCTIONS_CALLERS callers; calls as the last"
fi

SERVER_PORT=
# start_server NAME: a fresh server under cachegrind; returns once it listens.
start_server() {
  local name=$1
  SERVER_PORT=$(free_port) || die "no free port"
  # shellcheck disable=SC2086 # INSTRUCTIONS_VALGRIND_ARGS: extra words
  TOKIO_WORKER_THREADS=$WORKERS valgrind --tool=cachegrind --cache-sim=no ${INSTRUCTIONS_VALGRIND_ARGS:-} \
    --cachegrind-out-file="$WORK/cachegrind.out.$name" --log-file="$WORK/valgrind.$name.log" \
    "$BIN" serve --listen "127.0.0.1:$SERVER_PORT" --upstream-url "$SIM" --token "$TOKEN" \
    --poll-interval 1h --max-connection-age 24h --http2-keepalive-interval 1h \
    "${CALLERS_ARGS[@]}" >"$WORK/server.$name.log" 2>&1 &
  SERVER_PID=$!
  # Listening is enough: the kernel queues connections from then on, and
  # asking anything (health, reflection) would add to the count.
  for _ in $(seq 1200); do
    listening "$SERVER_PORT" && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.$name.log" >&2; die "the server ($name) exited"; }
    sleep 0.1
  done
  die "the server ($name) did not listen within 120 s"
}

# stop_server NAME: SIGTERM, wait for it (it drains and exits 0), sets
# IREFS[NAME] (not in a subshell: `wait` needs this shell).
stop_server() {
  local name=$1 rc=0
  kill -TERM "$SERVER_PID"
  for _ in $(seq 600); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    die "the server ($name) did not exit within 60 s of SIGTERM"
  fi
  wait "$SERVER_PID" || rc=$?
  SERVER_PID=
  [[ $rc -eq 0 ]] || { tail -20 "$WORK/server.$name.log" >&2; die "the server ($name) exited with $rc"; }
  local irefs
  irefs=$(sed -n 's/^==[0-9]*== I *refs: *\([0-9,]*\).*/\1/p' "$WORK/valgrind.$name.log" | tr -d ,)
  [[ $irefs =~ ^[0-9]+$ ]] || die "no I refs in $WORK/valgrind.$name.log"
  IREFS[$name]=$irefs
}

# ghz_run NAME METHOD DATA_ARGS...: N calls, sequential, one connection;
# fails unless all N are OK. In the background, so a signal to this script
# is handled at once (and ghz stopped by the trap).
ghz_run() {
  local name=$1 method=$2 rc=0
  shift 2
  "$GHZ" --insecure --proto "$PROTO" --import-paths "$PROTO_DIR" \
    --call "piclumen.v1.ImageService.$method" "$@" \
    -m "$METADATA" \
    -n "$N" -c 1 --connections 1 -t 60s \
    --format json -o "$WORK/ghz.$name.json" "127.0.0.1:$SERVER_PORT" >&2 &
  GHZ_PID=$!
  wait "$GHZ_PID" || rc=$?
  GHZ_PID=
  [[ $rc -eq 0 ]] || die "ghz failed ($name): exit $rc"
  local ok count
  ok=$(jq '.statusCodeDistribution.OK // 0' "$WORK/ghz.$name.json")
  count=$(jq '.count' "$WORK/ghz.$name.json")
  if [[ $ok -ne $N || $count -ne $N ]]; then
    jq -c '{count, statusCodeDistribution, errorDistribution}' "$WORK/ghz.$name.json" >&2
    die "$name: $ok of $N calls OK"
  fi
}

declare -A IREFS SECONDS_TAKEN UPSTREAM

# run_scenario NAME: setup (not counted), fresh server, calls, stop.
run_scenario() {
  local name=$1
  case $name in
    check) create_jobs 1 "$WORK/ids.$name.json" ;;
    check-distinct) create_jobs "$N" "$WORK/ids.$name.json" ;;
  esac
  local creates0 status0 t0 t1
  creates0=$(sim_stat create_calls)
  status0=$(sim_stat status_calls)
  log "$name: starting the server under valgrind"
  t0=$(date +%s.%N)
  start_server "$name"
  case $name in
    idle) ;;
    generate) ghz_run "$name" GenerateImage -d "{\"prompt\": \"$PROMPT\"}" ;;
    check) ghz_run "$name" CheckImage -d "$(jq -c '.[0]' "$WORK/ids.$name.json")" ;;
    # A JSON array: ghz sends its messages round-robin, so each id once.
    check-distinct) ghz_run "$name" CheckImage -D "$WORK/ids.$name.json" ;;
  esac
  stop_server "$name"
  t1=$(date +%s.%N)
  SECONDS_TAKEN[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  local creates status
  creates=$(($(sim_stat create_calls) - creates0))
  status=$(($(sim_stat status_calls) - status0))
  UPSTREAM[$name]="upstream creates $creates, status calls $status"
  local want_creates=0 want_status=0
  case $name in
    generate) want_creates=$N ;;
    check) want_status=1 ;;
    check-distinct) want_status=$N ;;
  esac
  [[ $creates -eq $want_creates && $status -eq $want_status ]] ||
    die "$name: ${UPSTREAM[$name]}, expected $want_creates and $want_status"
}

log "N=$N, workers=$WORKERS, scenarios: idle $SCENARIOS; work dir $WORK"
run_scenario idle
echo "I refs idle: ${IREFS[idle]} (${SECONDS_TAKEN[idle]} s)"
RESULTS=()
for s in $SCENARIOS; do
  run_scenario "$s"
  per=$(awk -v s="${IREFS[$s]}" -v i="${IREFS[idle]}" -v n="$N" 'BEGIN { printf "%.1f", (s - i) / n }')
  echo "I refs $s: ${IREFS[$s]} (N=$N, ${UPSTREAM[$s]}, ${SECONDS_TAKEN[$s]} s)"
  echo "instructions/call $s: $per"
  RESULTS+=("instructions/call $s: $per")
done
echo "--- $REV, N=$N, workers=$WORKERS, idle ${IREFS[idle]}"
printf '%s\n' "${RESULTS[@]}"
OK=1
