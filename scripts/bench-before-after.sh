#!/usr/bin/env bash
# The hot paths of two Parvis builds side by side: sends (1 room and 100 rooms), incremental sync
# with nothing new, fan-out delivery and initial sync, each on a fresh database, one server at a
# time, on the same machine and PostgreSQL.
#
#   scripts/bench-before-after.sh BEFORE_DIR AFTER_DIR [OUT_DIR]
#
# Each *_DIR holds a release build's `parvis` and `parvis-bench` (e.g. copied out of
# target/release after `cargo build --release --bins` of each commit). The JSON reports land in
# OUT_DIR (default: a temporary folder), one per build and scenario, and a table is printed.
# Every loop of the load tool is bounded in count and time; everything runs on loopback.
set -euo pipefail
BEFORE=${1:?before dir}
AFTER=${2:?after dir}
OUT=${3:-$(mktemp -d)}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-18448}
mkdir -p "$OUT"

run_one() {
  local label=$1 dir=$2 db="parvis_bench_$1"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
  PARVIS__DATABASE__URL="$PG/$db" \
  PARVIS__LISTEN__CLIENT="127.0.0.1:$PORT" \
  PARVIS__REGISTRATION__SHARED_SECRET=bench \
  PARVIS__RATE_LIMITS__ENABLED=false \
  PARVIS__LOGGING__FILTER=warn \
  PARVIS__MEDIA__PATH="$OUT/media-$label" \
    "$dir/parvis" >"$OUT/$label-server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$PORT/_matrix/client/versions" >/dev/null && break
    sleep 0.2
  done
  local B=("$dir/parvis-bench" --url "http://127.0.0.1:$PORT" --shared-secret bench --server-pid "$pid" --pg-url "$PG/$db" --json)
  "${B[@]}" send --users 50 --rooms 1 --requests 4000 >"$OUT/$label-send1.json"
  "${B[@]}" send --users 50 --rooms 100 --requests 4000 >"$OUT/$label-send100.json"
  "${B[@]}" incremental-sync --concurrency 32 --requests 40000 --users 32 >"$OUT/$label-isync.json"
  "${B[@]}" fanout --receivers 100 --messages 30 --interval-ms 100 >"$OUT/$label-fanout.json"
  "${B[@]}" initial-sync --rooms 100 --events 30 --repeat 10 >"$OUT/$label-initial.json"
  kill "$pid"
  wait "$pid" || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
}

run_one before "$BEFORE"
run_one after "$AFTER"
python3 - "$OUT" <<'EOF'
import json, sys, os
out = sys.argv[1]
def load(label, scen):
    # One JSON object per line (a scenario may report several phases).
    with open(os.path.join(out, f"{label}-{scen}.json")) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]
def flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v
print("| scenario | figure | before | after |")
print("|---|---|---|---|")
for scen in ["send1", "send100", "isync", "fanout", "initial"]:
    b, a = load("before", scen), load("after", scen)
    for rb, ra in zip(b, a):
        fb, fa = dict(flat(rb)), dict(flat(ra))
        for k in fb:
            if k in fa and any(w in k for w in ("throughput", "p50", "p99", "rss", "per_request", "delivery")):
                print(f"| {rb.get('scenario', scen)} | {k} | {fb[k]:.4g} | {fa[k]:.4g} |")
EOF
echo "reports in $OUT"
