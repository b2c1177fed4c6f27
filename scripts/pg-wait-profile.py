#!/usr/bin/env python3
"""Where a server's PostgreSQL backends spend their time: samples pg_stat_activity of one database
every few milliseconds for a while and prints the share of samples per (state, wait event), and
the statements most often seen running. Needs psycopg2 (the Synapse virtualenv of
bench-vs-synapse.sh has it):

    ~/.cache/parvis-bench/synapse-venv/bin/python scripts/pg-wait-profile.py \
        postgres://postgres@127.0.0.1:5432/parvis_vs_bench --seconds 10

"idle" is a connection waiting in the pool; "active" with no wait event is running on a CPU;
"idle in transaction" (Client:ClientRead) is PostgreSQL waiting for the server's next statement
inside a transaction: a round trip, or the server's own CPU work between statements.
"""

import argparse
import collections
import time

import psycopg2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--interval-ms", type=float, default=5)
    a = ap.parse_args()
    conn = psycopg2.connect(a.url)
    conn.autocommit = True
    cur = conn.cursor()
    states = collections.Counter()
    queries = collections.Counter()
    samples = 0
    busy = 0
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        cur.execute(
            "SELECT state, coalesce(wait_event_type || ':' || wait_event, 'CPU'), left(regexp_replace(query, '\\s+', ' ', 'g'), 90) "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        )
        samples += 1
        for state, wait, query in cur.fetchall():
            states[(state, wait)] += 1
            if state != "idle":
                busy += 1
                queries[query] += 1
        time.sleep(a.interval_ms / 1000)
    total = sum(states.values()) or 1
    print(f"{samples} samples, {total / samples:.1f} connections, {busy / samples:.2f} busy on average")
    print("share  state / wait event")
    for (state, wait), n in states.most_common(12):
        print(f"{100 * n / total:5.1f}% {state} / {wait}")
    print("samples statement (not idle)")
    for q, n in queries.most_common(12):
        print(f"{n:7d} {q}")


if __name__ == "__main__":
    main()
