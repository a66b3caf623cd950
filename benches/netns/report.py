#!/usr/bin/env python3
"""Turns the `round timing` log lines of one benchmark run into JSON lines on stdout: one per
replica and round, then one summary for the run. Called by run.sh."""
import json
import statistics
import sys
from pathlib import Path

mode, work, peers, rate, quota, seconds = sys.argv[1:7]
work = Path(work)
rows = []
for i in range(1, int(peers) + 1):
    for line in (work / f"p{i}.log").read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        f = ev.get("fields", {})
        if ev.get("target") != "potluck::timing" or f.get("message") != "round timing":
            continue
        row = {"bench": "netns_round_timing", "mode": mode, "peer": i}
        row.update({k: v for k, v in f.items() if k != "message"})
        rows.append(row)
for r in sorted(rows, key=lambda r: (r["round"], r["peer"])):
    print(json.dumps(r))
status = json.loads((work / "status.json").read_text() or "{}")
shares = [r["network_wait_share"] for r in rows]
walls = [r["wall_ms"] for r in rows]


def share(key, rs=None):
    rs = rows if rs is None else rs
    total = sum(r["wall_ms"] for r in rs)
    return round(sum(r.get(key, 0) for r in rs) / total, 4) if total else None


# Rounds between the first (nothing to exchange when overlapped) and the last (an overlapped
# run's final flush is on the critical path): what a long run looks like.
last = max((r["round"] for r in rows), default=0)
steady = [r for r in rows if 1 < r["round"] < last]


print(json.dumps({
    "bench": "netns_summary",
    "mode": mode,
    "peers": int(peers),
    "rate": rate,
    "cpu_quota_pct": int(quota),
    "rounds_timed": len(rows),
    "network_wait_share_mean": round(statistics.mean(shares), 4) if shares else None,
    "network_wait_share_median": round(statistics.median(shares), 4) if shares else None,
    "network_wait_share_max": round(max(shares), 4) if shares else None,
    # Shares of all timed wall time, over every replica and round.
    "network_wait_share_total": share("network_wait_ms"),
    "train_share_total": share("train_ms"),
    "local_share_total": share("local_ms"),
    "persist_share_total": share("persist_ms"),
    "coordination_share_total": share("coordination_ms"),
    "steady_rounds_network_wait_share_total": share("network_wait_ms", steady),
    "round_wall_ms_mean": round(statistics.mean(walls)) if walls else None,
    "run_seconds": int(seconds),
    "state": status.get("state"),
    "final_eval_loss": status.get("eval_loss"),
    "bytes_sent_peer1": status.get("bytes_sent"),
    "bytes_received_peer1": status.get("bytes_received"),
}))
