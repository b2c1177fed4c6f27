#!/usr/bin/env bash
# Parvis with 1, 2 and 3 instances on one PostgreSQL database (issue 20): the same scenarios
# against each, parvis-bench spreading requests over the instances in turn (a load balancer
# without stickiness), with the CPU of every instance summed. Prints one JSON line per scenario
# and instance count, and a table.
#
#   scripts/bench-instances.sh                 # release build, then 1, 2, 3 instances
#   BENCH_INSTANCES="1 3" BENCH_SKIP_BUILD=1 scripts/bench-instances.sh
#   BENCH_SCENARIOS="send --users 20 --rooms 20 --requests 4000 --duration 15" scripts/bench-instances.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}"
TARGET="${CARGO_TARGET_DIR:-target}"
WORK="${BENCH_WORK:-/tmp/parvis-bench-instances}"
SECRET=bench
DB=parvis_bench_instances
BASE_PORT="${BENCH_BASE_PORT:-18108}"
INSTANCES="${BENCH_INSTANCES:-1 2 3}"
mkdir -p "$WORK/results"
log() { printf '\n== %s\n' "$*" >&2; }
psql_admin() { psql "$PG_URL/postgres" -qAtc "$1" >/dev/null; }

SCENARIOS=(
  "send --users 20 --rooms 1 --requests 4000 --duration 15"
  "send --users 20 --rooms 20 --requests 4000 --duration 15"
  "mixed --steps 10,25,50,100,200,400,800,1600,3200 --step-seconds 20"
)
if [ -n "${BENCH_SCENARIOS:-}" ]; then
  mapfile -t SCENARIOS <<<"$BENCH_SCENARIOS"
fi

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_ready() { # url pid
  for _ in $(seq 1 120); do
    if curl -sf "$1/_matrix/client/versions" >/dev/null; then return 0; fi
    if ! kill -0 "$2" 2>/dev/null; then log "instance exited during start-up"; return 1; fi
    sleep 0.5
  done
  return 1
}

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  log "building Parvis (release)"
  cargo build --release --bins
fi

OUT="$WORK/results/instances.jsonl"
: >"$OUT"
for n in $INSTANCES; do
  psql_admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
  psql_admin "CREATE DATABASE $DB"
  PIDS=()
  URLS=()
  for i in $(seq 1 "$n"); do
    port=$((BASE_PORT + i))
    PARVIS__DATABASE__URL="$PG_URL/$DB" \
      PARVIS__LISTEN__CLIENT="127.0.0.1:$port" \
      PARVIS__LISTEN__METRICS="127.0.0.1:0" \
      PARVIS__REGISTRATION__SHARED_SECRET="$SECRET" \
      PARVIS__RATE_LIMITS__ENABLED=false \
      PARVIS__LOGGING__FILTER=warn \
      "$TARGET/release/parvis" serve >"$WORK/parvis-$n-$i.log" 2>&1 &
    PIDS+=("$!")
    URLS+=("http://127.0.0.1:$port")
    wait_ready "http://127.0.0.1:$port" "$!"
  done
  url_list=$(IFS=,; echo "${URLS[*]}")
  pid_list=$(IFS=,; echo "${PIDS[*]}")
  for s in "${SCENARIOS[@]}"; do
    log "$n instance(s): $s"
    # shellcheck disable=SC2086 # the scenario's arguments are split on purpose
    "$TARGET/release/parvis-bench" --url "$url_list" --shared-secret "$SECRET" --json --no-progress \
      --server-pid "$pid_list" --pg-url "$PG_URL/$DB" $s |
      python3 -c "import json,sys; [print(json.dumps({**json.loads(l), 'instances': $n})) for l in sys.stdin if l.strip()]" \
        >>"$OUT" || log "'$s' reported errors"
  done
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
done
psql_admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
log "raw results: $OUT"
python3 - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| scenario | instances | throughput (mixed: agents held) | p50 ms | p99 ms | server CPU ms / op | PostgreSQL CPU ms / op | transactions / op |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    sc = r.get("scenario", "")
    if sc.startswith("mixed") and "agents_held" not in r:
        continue
    if sc == "send" and "rooms" in r:
        sc = f"send/{r['rooms']}r"
    thr = r.get("agents_held", r.get("throughput_per_s", ""))
    print(f"| {sc} | {r['instances']} | {thr} | {r.get('p50_ms', '')} | {r.get('p99_ms', '')} | "
          f"{r.get('server_cpu_ms_per_request', '')} | {r.get('postgres_cpu_ms_per_request', '')} | "
          f"{r.get('pg_transactions_per_request', '')} |")
EOF
