#!/usr/bin/env bash
# Server-side search, measured (docs/benchmarks.md, "Search"):
#   1. send throughput with the full-text index written versus a build without it (BEFORE_DIR,
#      e.g. the commit before search), same generated French messages;
#   2. Parvis and Synapse side by side on the same generated messages (SMALL, default 3000:
#      Synapse sends about 30 messages/s here), search latency per kind of query;
#   3. Parvis alone over LARGE messages (default 1 000 000): BASE (default 20 000) generated
#      messages sent through the API, copied in SQL (`parvis-bench search --replicate-to`) up to
#      LARGE, then the same searches.
#
# PHASES (default "onoff small synapse large") picks the phases to run.
#
#   scripts/bench-search.sh BEFORE_DIR AFTER_DIR [OUT_DIR]
#
# Each *_DIR holds a release build's `parvis` and `parvis-bench` (BEFORE_DIR only needs
# `parvis`). Synapse is installed once into a virtualenv outside the repository
# ($BENCH_CACHE, default ~/.cache/parvis-bench), as scripts/bench-vs-synapse.sh does. Every
# server gets a fresh database; everything stays on loopback. JSON lines land in OUT_DIR.
set -euo pipefail
BEFORE=${1:?before dir}
AFTER=${2:?after dir}
OUT=${3:-$(mktemp -d)}
PG=${PG_URL:-postgres://postgres@127.0.0.1:5432}
SMALL=${SMALL:-3000}
LARGE=${LARGE:-1000000}
ONOFF=${ONOFF:-20000}
BASE=${BASE:-20000}
PHASES=${PHASES:-onoff small synapse large}
phase() { [[ " $PHASES " == *" $1 "* ]]; }
CACHE="${BENCH_CACHE:-$HOME/.cache/parvis-bench}"
VENV="$CACHE/synapse-venv"
PORT=18458
SYNAPSE_PORT=18468
SECRET="bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
mkdir -p "$OUT" "$CACHE"
log() { echo "== $*" >&2; }
psql_admin() { psql "$PG/postgres" -v ON_ERROR_STOP=1 -qAtc "$1"; }
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

wait_ready() { # url pid
  for _ in $(seq 1 240); do
    curl -sf "$1/_matrix/client/versions" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { log "server exited during start-up"; return 1; }
    sleep 0.5
  done
  return 1
}

start_parvis() { # dir db -> sets PID
  psql_admin "DROP DATABASE IF EXISTS $2 WITH (FORCE)"
  PARVIS__DATABASE__URL="$PG/$2" PARVIS__LISTEN__CLIENT="127.0.0.1:$PORT" \
    PARVIS__REGISTRATION__SHARED_SECRET="$SECRET" PARVIS__RATE_LIMITS__ENABLED=false \
    PARVIS__LOGGING__FILTER=warn PARVIS__MEDIA__PATH="$OUT/media-$2" \
    "$1/parvis" serve >"$OUT/$2.log" 2>&1 &
  PID=$!
  PIDS+=("$PID")
  wait_ready "http://127.0.0.1:$PORT" "$PID"
}

stop() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$1" 2>/dev/null || true
}

bench() { # url pid db args...
  local url=$1 pid=$2 db=$3
  shift 3
  "$AFTER/parvis-bench" --url "$url" --shared-secret "$SECRET" --json --no-progress --server-pid "$pid" \
    --pg-url "$PG/$db" search "$@"
}

# 1. The index's cost on sends: the same messages into a build without search, then with it.
phase onoff && for label in before after; do
  dir=$BEFORE
  [ "$label" = after ] && dir=$AFTER
  log "index $label: $ONOFF messages"
  start_parvis "$dir" "parvis_search_$label"
  bench "http://127.0.0.1:$PORT" "$PID" "parvis_search_$label" --messages "$ONOFF" --senders 20 --rooms 20 \
    --no-queries >"$OUT/onoff-$label.jsonl"
  stop "$PID"
  psql_admin "DROP DATABASE IF EXISTS parvis_search_$label WITH (FORCE)"
done

# 2. Side by side with Synapse on SMALL messages.
if phase small; then
  log "Parvis: $SMALL messages, searches"
  start_parvis "$AFTER" parvis_search_small
  bench "http://127.0.0.1:$PORT" "$PID" parvis_search_small --messages "$SMALL" --senders 20 --rooms 20 \
    --queries 100 >"$OUT/parvis-small.jsonl"
  stop "$PID"
  psql_admin "DROP DATABASE IF EXISTS parvis_search_small WITH (FORCE)"
fi
synapse_phase() {

if ! "$VENV/bin/python" -c "import synapse" 2>/dev/null; then
  log "installing Synapse into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "matrix-synapse[postgres]${SYNAPSE_VERSION:+==$SYNAPSE_VERSION}"
fi
S="$OUT/synapse"
rm -rf "$S"
mkdir -p "$S"
psql_admin "DROP DATABASE IF EXISTS synapse_search WITH (FORCE)"
psql_admin "CREATE DATABASE synapse_search ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
(cd "$S" && "$VENV/bin/python" -m synapse.app.homeserver --server-name localhost \
  --config-path homeserver.yaml --generate-config --report-stats=no >/dev/null)
echo >>"$S/homeserver.yaml" # the generated file does not end with a newline
cat >"$S/log.yaml" <<EOF
version: 1
formatters: {precise: {format: '%(asctime)s - %(name)s - %(levelname)s - %(message)s'}}
handlers: {file: {class: logging.FileHandler, formatter: precise, filename: $OUT/synapse.log}}
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
    resources: [{names: [client], compress: false}]
database:
  name: psycopg2
  args: {user: postgres, host: 127.0.0.1, port: 5432, database: synapse_search, cp_min: 5, cp_max: 10}
log_config: $S/log.yaml
registration_shared_secret: "$SECRET"
trusted_key_servers: []
suppress_key_server_warning: true
report_stats: false
EOF
  cat "$(dirname "$0")/../../shared/peers/synapse/rate-limits-lifted.yaml" 2>/dev/null || cat <<EOF
rc_message: {per_second: 100000, burst_count: 100000}
rc_registration: {per_second: 100000, burst_count: 100000}
rc_login:
  address: {per_second: 100000, burst_count: 100000}
  account: {per_second: 100000, burst_count: 100000}
  failed_attempts: {per_second: 100000, burst_count: 100000}
rc_joins:
  local: {per_second: 100000, burst_count: 100000}
  remote: {per_second: 100000, burst_count: 100000}
rc_room_creation: {per_second: 100000, burst_count: 100000}
EOF
} >>"$S/homeserver.yaml"
log "Synapse: $SMALL messages, searches"
(cd "$S" && "$VENV/bin/python" -m synapse.app.homeserver --config-path homeserver.yaml >"$OUT/synapse.out" 2>&1) &
SPID=$!
PIDS+=("$SPID")
wait_ready "http://127.0.0.1:$SYNAPSE_PORT" "$SPID" || { log "Synapse did not start"; return 1; }
bench "http://127.0.0.1:$SYNAPSE_PORT" "$SPID" synapse_search --messages "$SMALL" --senders 20 --rooms 20 \
  --queries 100 >"$OUT/synapse-small.jsonl" || log "Synapse reported errors"
stop "$SPID"
psql_admin "DROP DATABASE IF EXISTS synapse_search WITH (FORCE)"
}
if phase synapse; then synapse_phase; fi

# 3. Parvis over LARGE messages.
if phase large; then
  log "Parvis: $BASE messages sent, copied up to $LARGE, searches"
  start_parvis "$AFTER" parvis_search_large
  bench "http://127.0.0.1:$PORT" "$PID" parvis_search_large --messages "$BASE" --senders 20 --rooms 20 \
    --replicate-to "$LARGE" --queries 200 >"$OUT/parvis-large.jsonl"
  psql "$PG/parvis_search_large" -qAtc "SELECT count(*) || ' indexed events, index ' ||
    pg_size_pretty(pg_total_relation_size('event_search')) FROM event_search" >"$OUT/parvis-large-index.txt"
  stop "$PID"
  psql_admin "DROP DATABASE IF EXISTS parvis_search_large WITH (FORCE)"
fi

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def rows(name):
    p = os.path.join(out, name)
    return [json.loads(l) for l in open(p) if l.startswith("{")] if os.path.exists(p) else []
print("| run | scenario | requests | errors | per s | p50 ms | p99 ms | results/query |")
print("|---|---|---|---|---|---|---|---|")
for name in ["onoff-before", "onoff-after", "parvis-small", "synapse-small", "parvis-large"]:
    for r in rows(name + ".jsonl"):
        print(f"| {name} | {r['scenario']} | {r['requests']} | {r['errors']} | {r['throughput_per_s']:.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r.get('results_per_query', '')} |")
EOF
cat "$OUT/parvis-large-index.txt" 2>/dev/null || true
