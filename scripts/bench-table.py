#!/usr/bin/env python3
"""Markdown table of two parvis-bench JSON result files (Parvis, Synapse), for bench-vs-synapse.sh.

Ratio: Parvis ÷ Synapse for rates, Synapse ÷ Parvis for latencies and costs, so that a ratio above
1 always means Parvis is ahead.
"""

import argparse
import json

HIGHER, LOWER, INFO = "higher", "lower", "info"

# Per scenario family: (label, JSON key, unit, which is better).
ROWS = {
    "whoami": [("requests/s", "throughput_per_s", "/s", HIGHER), ("p99", "p99_ms", "ms", LOWER)],
    "login": [("logins/s (stock password hashing)", "throughput_per_s", "/s", HIGHER), ("p99", "p99_ms", "ms", LOWER)],
    "send": [
        ("messages/s", "throughput_per_s", "/s", HIGHER),
        ("p50", "p50_ms", "ms", LOWER),
        ("p95", "p95_ms", "ms", LOWER),
        ("p99", "p99_ms", "ms", LOWER),
        ("server CPU per message", "server_cpu_ms_per_request", "ms", LOWER),
        ("PostgreSQL CPU per message", "postgres_cpu_ms_per_request", "ms", LOWER),
        ("PostgreSQL transactions per message", "pg_transactions_per_request", "", LOWER),
    ],
    "create-rooms": [("rooms/s", "throughput_per_s", "/s", HIGHER), ("p95", "p95_ms", "ms", LOWER)],
    "join-storm": [("joins/s", "throughput_per_s", "/s", HIGHER), ("p99", "p99_ms", "ms", LOWER)],
    "incremental-sync": [
        ("empty syncs/s", "throughput_per_s", "/s", HIGHER),
        ("p99", "p99_ms", "ms", LOWER),
        ("server CPU per sync", "server_cpu_ms_per_request", "ms", LOWER),
    ],
    "fanout": [("delivery p50", "delivery_p50_ms", "ms", LOWER), ("delivery p99", "delivery_p99_ms", "ms", LOWER)],
    "initial-sync": [("p50", "p50_ms", "ms", LOWER), ("response", "response_bytes", "B", INFO)],
    "mixed": [("agents held (p99 < objective)", "agents_held", "", HIGHER)],
}


def load(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    out[r["scenario"]] = r
    except FileNotFoundError:
        pass
    return out


def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "B":
        return f"{v / 1024:.0f} KiB"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}".replace(",", " ") + (f" {unit}" if unit not in ("", "/s") else "")
    if abs(v) >= 100:
        s = f"{v:,.0f}".replace(",", " ")
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return f"{s} {unit}".strip() if unit not in ("", "/s") else s


def ratio(p, s, better):
    if p is None or s is None or better == INFO:
        return ""
    try:
        r = p / s if better == HIGHER else s / p
    except ZeroDivisionError:
        return "∞" if better == LOWER or p else "—"
    return f"×{r:.1f}" if r >= 1.95 else f"×{r:.2f}"


def cell(report, key, unit):
    if report is None:
        return "—", None
    v = report.get(key)
    text = fmt(v, unit)
    if report.get("errors"):
        text += f" ({report['errors']} err)"
    return text, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("parvis")
    ap.add_argument("synapse")
    ap.add_argument("--date", default="")
    ap.add_argument("--machine", default="")
    ap.add_argument("--parvis", dest="parvis_rev", default="")
    ap.add_argument("--synapse", dest="synapse_version", default="")
    ap.add_argument("--ceiling", default="", help="'clients:tps ...' from pgbench")
    a = ap.parse_args()
    parvis, synapse = load(a.parvis), load(a.synapse)

    print(f"### {a.date}: Parvis {a.parvis_rev} vs Synapse {a.synapse_version}")
    print()
    print(f"Machine: {a.machine}. Servers run one after the other, each alone with PostgreSQL and the load tool.")
    print()
    print("| scenario | figure | Parvis | Synapse | ratio |")
    print("|---|---|---|---|---|")
    names = list(parvis) + [n for n in synapse if n not in parvis]
    for name in names:
        family = name.split("/")[0]
        if family == "mixed" and name != "mixed":
            continue
        for label, key, unit, better in ROWS.get(family, []):
            pt, pv = cell(parvis.get(name), key, unit)
            st, sv = cell(synapse.get(name), key, unit)
            print(f"| `{name}` | {label} | {pt} | {st} | {ratio(pv, sv, better)} |")
    peaks = []
    for reports in (parvis, synapse):
        values = [r["server_peak_rss_mb"] for r in reports.values() if r.get("server_peak_rss_mb")]
        peaks.append(max(values) if values else None)
    print(f"| all | server peak RSS | {fmt(peaks[0], 'MB')} | {fmt(peaks[1], 'MB')} | {ratio(peaks[0], peaks[1], LOWER)} |")
    mixed_p, mixed_s = parvis.get("mixed"), synapse.get("mixed")
    print()
    print("Ratio: Parvis ÷ Synapse for rates, Synapse ÷ Parvis for latencies and costs (above 1: Parvis ahead).")
    if mixed_p or mixed_s:
        m = mixed_p or mixed_s
        print(
            f"`mixed`: agents in teams of {m.get('room_size')}, a burst (typing, 1-3 messages) every "
            f"{m.get('think_s')} s on average per agent, read receipts; held = no error and p99 of sends, "
            f"of receipts, of typing notifications and of deliveries under {m.get('objective_ms'):.0f} ms."
        )
        for label, r in (("Parvis", mixed_p), ("Synapse", mixed_s)):
            if r:
                steps = ", ".join(
                    f"{s['agents']}{'✓' if s['held'] else '✗'} (send p99 {s['send_p99_ms']:.0f} ms, "
                    f"delivery p99 {s['delivery_p99_ms']:.0f} ms, {s['sends_per_s']:.1f} msg/s)"
                    for s in r.get("steps", [])
                )
                print(f"{label} steps: {steps}.")
    if a.ceiling.strip():
        parts = dict(p.split(":") for p in a.ceiling.split())
        text = ", ".join(f"{c} client{'s' if c != '1' else ''}: {int(t):,}".replace(",", " ") for c, t in parts.items() if t)
        print()
        print(f"PostgreSQL ceiling (pgbench, one-row INSERT per committed transaction, commits/s): {text}.")
        best = max((int(t) for t in parts.values() if t), default=0)
        sends = [(n, r["throughput_per_s"]) for n, r in parvis.items() if n.startswith("send/")]
        if best and sends:
            print(
                "Parvis sends reach "
                + ", ".join(f"{100 * v / best:.0f} % (`{n}`)" for n, v in sends)
                + " of the best ceiling."
            )


if __name__ == "__main__":
    main()
