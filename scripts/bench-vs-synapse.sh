#!/usr/bin/env bash
# Parvis and Synapse side by side: the same parvis-bench scenarios against each server, on this
# machine and the same PostgreSQL, one server at a time; then a Markdown table
# (scenario, Parvis, Synapse, ratio) and PostgreSQL's own ceiling for durable one-row writes.
#
#   scripts/bench-vs-synapse.sh [--out FILE] [--quick]
#
# Everything stays on loopback. Each run drops and recreates its databases (parvis_vs_bench,
# synapse_vs_bench, pgbench_ceiling). Synapse is installed once into a virtualenv outside the
# repository ($BENCH_CACHE, default ~/.cache/parvis-bench). Raw JSON results and server logs are
# kept in $BENCH_WORK (default /tmp/parvis-bench-vs-synapse).
#
# Environment: PG_URL (default postgres://postgres@127.0.0.1:5432, a role that can create
# databases), SYNAPSE_VERSION (pip version pin, default the latest), BENCH_SKIP_BUILD=1 (use the
# existing release build), BENCH_SCENARIOS (replaces the scenario list, one per line), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=""
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: $0 [--out FILE] [--quick]" >&2; exit 2 ;;
  esac
done

PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
CACHE="${BENCH_CACHE:-$HOME/.cache/parvis-bench}"
WORK="${BENCH_WORK:-/tmp/parvis-bench-vs-synapse}"
TARGET="${CARGO_TARGET_DIR:-target}"
VENV="$CACHE/synapse-venv"
PARVIS_PORT=18108
SYNAPSE_PORT=18118
SECRET="bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
PARVIS_DB=parvis_vs_bench
SYNAPSE_DB=synapse_vs_bench

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
mkdir -p "$CACHE" "$WORK"
rm -rf "$WORK/results" "$WORK/synapse"
mkdir -p "$WORK/results" "$WORK/synapse"

log() { echo "== $*" >&2; }
psql_admin() { psql "$PG_URL/postgres" -v ON_ERROR_STOP=1 -qAtc "$1"; }

# The scenarios, identical for both servers. Sizes fit a 2-core machine in a few minutes each.
if [ "$QUICK" = 1 ]; then
  SCENARIOS=(
    "whoami --concurrency 8 --users 8 --requests 2000 --duration 3"
    "login --concurrency 2 --users 2 --requests 10 --duration 5"
    "send --users 5 --rooms 1 --requests 200 --duration 5"
    "send --users 5 --rooms 5 --requests 200 --duration 5"
    "create-rooms --concurrency 4 --users 4 --requests 20 --duration 5"
    "join-storm --joiners 10"
    "incremental-sync --concurrency 8 --users 8 --requests 2000 --duration 3"
    "fanout --receivers 5 --messages 5 --interval-ms 100"
    "initial-sync --rooms 5 --events 4 --repeat 2"
    "mixed --steps 10,20 --step-seconds 5 --think-s 10"
  )
else
  SCENARIOS=(
    "whoami --concurrency 32 --users 32 --requests 100000 --duration 10"
    "login --concurrency 4 --users 4 --requests 200 --duration 10"
    "send --users 20 --rooms 1 --requests 4000 --duration 15"
    "send --users 20 --rooms 20 --requests 4000 --duration 15"
    "create-rooms --concurrency 8 --users 8 --requests 400 --duration 15"
    "join-storm --joiners 100"
    "incremental-sync --concurrency 32 --users 32 --requests 100000 --duration 10"
    "fanout --receivers 50 --messages 30 --interval-ms 200"
    "initial-sync --rooms 50 --events 10 --repeat 5"
    "mixed --steps 10,25,50,100,200,400,800,1600,3200 --step-seconds 20"
  )
fi

# BENCH_SCENARIOS (one scenario per line) replaces the list, e.g. for one comparison:
#   BENCH_SCENARIOS="sliding-sync --rooms 500 --repeat 100" scripts/bench-vs-synapse.sh
if [ -n "${BENCH_SCENARIOS:-}" ]; then
  mapfile -t SCENARIOS <<<"$BENCH_SCENARIOS"
fi

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

wait_ready() { # url pid name
  for _ in $(seq 1 120); do
    if curl -sf "$1/_matrix/client/versions" >/dev/null; then return 0; fi
    if ! kill -0 "$2" 2>/dev/null; then log "$3 exited during start-up"; return 1; fi
    sleep 0.5
  done
  log "$3 did not become ready"
  return 1
}

stop() { # pid
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$1" 2>/dev/null || true
}

# Progress bars when a person watches.
PROGRESS_FLAG=--no-progress
if [ -t 2 ]; then PROGRESS_FLAG=--progress; fi

run_scenarios() { # name url pid db
  local out="$WORK/results/$1.jsonl" err="$WORK/results/$1.err"
  : >"$out"
  : >"$err"
  for s in "${SCENARIOS[@]}"; do
    log "$1: $s"
    # shellcheck disable=SC2086 # the scenario's arguments are split on purpose
    if ! "$TARGET/release/parvis-bench" --url "$2" --shared-secret "$SECRET" --json --server-pid "$3" \
      --pg-url "$PG_URL/$4" "$PROGRESS_FLAG" $s >>"$out" 2> >(tee -a "$err" >&2); then
      log "$1: '$s' reported errors (see $err)"
    fi
  done
}

# 1. Build.
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  log "building Parvis (release)"
  cargo build --release --bins
fi

# 2. Synapse, installed once.
if ! "$VENV/bin/python" -c "import synapse" 2>/dev/null; then
  log "installing Synapse into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "matrix-synapse[postgres]${SYNAPSE_VERSION:+==$SYNAPSE_VERSION}"
fi
SYNAPSE_VERSION_USED=$("$VENV/bin/python" -c "import synapse; print(synapse.__version__)")

# 3. Databases, new each run.
for db in "$PARVIS_DB" "$SYNAPSE_DB" pgbench_ceiling; do
  psql_admin "DROP DATABASE IF EXISTS $db WITH (FORCE)"
done
psql_admin "CREATE DATABASE $PARVIS_DB"
# Synapse refuses anything but C collation.
psql_admin "CREATE DATABASE $SYNAPSE_DB ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
psql_admin "CREATE DATABASE pgbench_ceiling"

# 4. The physical ceiling: one-row INSERT transactions, committed durably, nothing else running.
log "pgbench: one-row INSERT per transaction"
psql "$PG_URL/pgbench_ceiling" -qc "CREATE TABLE t (id bigserial PRIMARY KEY, room int, body text)"
printf '%s\n' '\set room random(1, 100)' "INSERT INTO t (room, body) VALUES (:room, 'hello');" >"$WORK/insert.sql"
CEILING=""
for c in 1 8 32; do
  tps=$(pgbench -n -f "$WORK/insert.sql" -c "$c" -j "$((c < 2 ? c : 2))" -T 8 "$PG_URL/pgbench_ceiling" 2>/dev/null |
    awk '/^tps/ {printf "%.0f", $3}' || true)
  CEILING="$CEILING $c:$tps"
done
psql_admin "DROP DATABASE pgbench_ceiling"

# 5. Parvis.
log "Parvis: starting"
PARVIS__DATABASE__URL="$PG_URL/$PARVIS_DB" \
  PARVIS__LISTEN__CLIENT="127.0.0.1:$PARVIS_PORT" \
  PARVIS__LISTEN__METRICS="127.0.0.1:0" \
  PARVIS__PUBLIC_BASEURL="http://127.0.0.1:$PARVIS_PORT/" \
  PARVIS__REGISTRATION__SHARED_SECRET="$SECRET" \
  PARVIS__RATE_LIMITS__ENABLED=false \
  PARVIS__LOGGING__FILTER=warn \
  "$TARGET/release/parvis" serve >"$WORK/parvis.log" 2>&1 &
PARVIS_PID=$!
PIDS+=("$PARVIS_PID")
wait_ready "http://127.0.0.1:$PARVIS_PORT" "$PARVIS_PID" Parvis
run_scenarios parvis "http://127.0.0.1:$PARVIS_PORT" "$PARVIS_PID" "$PARVIS_DB"
stop "$PARVIS_PID"

# 6. Synapse: stock settings, except loopback, PostgreSQL, warnings-only logs and rate limits.
log "Synapse $SYNAPSE_VERSION_USED: configuring"
S="$WORK/synapse"
(cd "$S" && "$VENV/bin/python" -m synapse.app.homeserver --server-name localhost \
  --config-path homeserver.yaml --generate-config --report-stats=no >/dev/null)
cat >"$S/log.yaml" <<EOF
version: 1
formatters: {precise: {format: '%(asctime)s - %(name)s - %(levelname)s - %(message)s'}}
handlers: {file: {class: logging.FileHandler, formatter: precise, filename: $WORK/synapse.log}}
root: {level: WARNING, handlers: [file]}
disable_existing_loggers: false
EOF
{
  cat <<EOF
listeners:
  - port: $SYNAPSE_PORT
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources: [{names: [client, federation], compress: false}]
database:
  name: psycopg2
  args: {user: postgres, host: 127.0.0.1, port: 5432, database: $SYNAPSE_DB, cp_min: 5, cp_max: 10}
log_config: $S/log.yaml
registration_shared_secret: "$SECRET"
trusted_key_servers: []
suppress_key_server_warning: true
report_stats: false
EOF
  # Every rate limit lifted: stock values (e.g. 0.2 messages/s) would measure the limiter.
  for k in rc_message rc_registration rc_registration_token_validity rc_admin_redaction \
    rc_joins_per_room rc_3pid_validation rc_third_party_invite rc_media_create \
    rc_delayed_event_mgmt rc_room_creation rc_reports rc_user_directory rc_profile rc_key_requests; do
    echo "$k: {per_second: 1000000, burst_count: 1000000}"
  done
  echo "rc_login: {address: &u {per_second: 1000000, burst_count: 1000000}, account: *u, failed_attempts: *u}"
  echo "rc_joins: {local: *u, remote: *u}"
  echo "rc_invites: {per_room: *u, per_user: *u, per_issuer: *u}"
  echo "rc_presence: {per_user: *u}"
} >"$S/bench.yaml"
log "Synapse: starting"
(cd "$S" && exec "$VENV/bin/python" -m synapse.app.homeserver -c homeserver.yaml -c bench.yaml \
  >"$WORK/synapse.out" 2>&1) &
SYNAPSE_PID=$!
PIDS+=("$SYNAPSE_PID")
wait_ready "http://127.0.0.1:$SYNAPSE_PORT" "$SYNAPSE_PID" Synapse
run_scenarios synapse "http://127.0.0.1:$SYNAPSE_PORT" "$SYNAPSE_PID" "$SYNAPSE_DB"
stop "$SYNAPSE_PID"

# 7. The table.
MACHINE="$(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), \
PostgreSQL $(psql "$PG_URL/postgres" -qAtc 'SHOW server_version' | cut -d' ' -f1)"
python3 scripts/bench-table.py "$WORK/results/parvis.jsonl" "$WORK/results/synapse.jsonl" \
  --date "$(date -u +%Y-%m-%d)" --machine "$MACHINE" --synapse "$SYNAPSE_VERSION_USED" \
  --parvis "$(git rev-parse --short HEAD)" --ceiling "$CEILING" | tee "$WORK/table.md"
if [ -n "$OUT" ]; then
  cp "$WORK/table.md" "$OUT"
fi
psql_admin "DROP DATABASE IF EXISTS $PARVIS_DB WITH (FORCE)"
psql_admin "DROP DATABASE IF EXISTS $SYNAPSE_DB WITH (FORCE)"
log "raw results: $WORK/results"
