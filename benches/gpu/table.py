#!/usr/bin/env python3
"""Prints the side-by-side table of the GPU benchmark from the JSON lines that
gpu_moe_bench (candle) and torch_moe.py (PyTorch) wrote: per config and dtype, tokens/s,
median step time and MFU of each, and candle's speed as a multiple of PyTorch's.

    python3 benches/gpu/table.py results.jsonl [more.jsonl ...]
"""

import json
import sys


def main(paths):
    rows = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    rows[(r["config"], r["dtype"], r["impl"])] = r
    keys = sorted({(c, d) for c, d, _ in rows}, key=lambda k: (k[0] != "small", k[0], k[1]))
    head = (
        f"{'config':<6} {'dtype':<5} | {'candle tok/s':>12} {'ms':>8} {'MFU':>6} | "
        f"{'torch tok/s':>11} {'ms':>8} {'MFU':>6} | {'candle/torch':>12}"
    )
    print(head)
    print("-" * len(head))
    for c, d in keys:
        a = rows.get((c, d, "candle"))
        b = rows.get((c, d, "pytorch"))
        if a and b and a["flops_per_step"] != b["flops_per_step"]:
            print(f"# {c} {d}: FLOP counts differ: {a['flops_per_step']} vs {b['flops_per_step']}")

        def cells(r):
            if not r:
                return f"{'-':>12} {'-':>8} {'-':>6}"
            return (
                f"{r['tokens_per_s']:>12,.0f} {r['median_step_ms']:>8.1f} "
                f"{100 * r['mfu']:>5.2f}%"
            )

        ratio = f"{a['tokens_per_s'] / b['tokens_per_s']:>11.2f}x" if a and b else f"{'-':>12}"
        print(f"{c:<6} {d:<5} | {cells(a)} | {cells(b)[1:]} | {ratio}")


if __name__ == "__main__":
    main(sys.argv[1:])
