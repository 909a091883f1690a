"""What one expert's feed-forward costs for 1, 2, 4 and 8 rows (sequences) in one call of
the native, batch-invariant kernel (moeedge._core.ExpertFfn): the ceiling on what decoding
N sequences together can save over decoding them one by one, per expert they share.

    python bench/expert_rows.py /var/tmp/moeedge-models/default-64m --rounds 5 [--experts 8]

Rounds alternate the row counts; each cell is the median of the rounds' means over 5 calls.
--experts N cycles the calls through layer 0's first N experts, so that experts the CPU's
last-level cache would hold (mixtral-medium's: 11-22 MB) come from memory, as a decode step
reads them; with 1 (the default) the same expert is multiplied every call.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moeedge.api import load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--experts", type=int, default=1, help="experts of layer 0 the calls cycle through")
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    with load(args.source, max_context=256) as model:
        experts = model.runner.experts
        ids = list(range(args.experts))
        experts.prefetch(0, ids, priority=1)
        ffns = [(experts.ffn(0, e), experts.buffer(0, e)) for e in ids]
        if ffns[0][0] is None:
            sys.exit("this checkpoint's experts do not take the native feed-forward (fp32 activations needed)")
        hidden = model.config.hidden
        times: dict[int, list[float]] = {n: [] for n in rows}
        for r in range(args.rounds):
            for n in (rows if r % 2 == 0 else rows[::-1]):
                x, y = torch.randn(n, hidden), torch.empty(n, hidden)
                start = time.perf_counter()
                for i in range(5):
                    ffn, buf = ffns[(r * 5 + i) % len(ffns)]
                    ffn(x.numpy(), buf, y.numpy(), 1.0)
                times[n].append((time.perf_counter() - start) / 5)
        one = statistics.median(times[rows[0]])
        for n in rows:
            t = statistics.median(times[n])
            print(f"rows {n}: {t * 1e3:.1f} ms a call, {t / one:.2f} x {rows[0]} row(s), "
                  f"{n * one / t:.2f} x the rows done one by one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
