"""Where a decode step of N sequences goes, fully resident: the step the server runs
(runner.step with one new token of each of N sequences), timed in the library, split into
the attention blocks (one native call per sequence and layer: norm, q/k/v/o products with the
layer's attention weights, attention, router), the experts' feed-forward (one native call per
expert for all the rows routed to it) and the rest (the output projection, Python), and the
weight-bound ceiling on the gain over one stream: the weight bytes a generated token
costs alone (the dense weights plus its experts) over what it costs in a step of N (the dense
weights once for all N, plus the experts the step uses, each once).

    python bench/serve_step_split.py /var/tmp/moeedge-models/mixtral-medium --streams 1,2,4,8 --steps 8 --rounds 3

N held-out prompts (as bench/serve_load.py sends) are prefilled once; each round, for each N
(alternating order), the first N sequences decode --steps greedy tokens together and are cut
back to their prompts. Medians over rounds.

--attention rows,apart times each N both ways in the same rounds, alternating: "rows" (the
library's step: one native attention call a layer for all N tokens, AttentionStep.rows) and
"apart" (one call per sequence and layer, as before it; DecoderMoE.attention_rows off), and
prints the median ratio of their step times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from serve_clients import commit, cpu_name, held_out_prompts, report


class Timed:
    """Wraps a callable, adding its wall time to self.seconds."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **k):
        start = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attention", default="rows", help="rows, apart, or both (rows,apart): alternated")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from moeedge.api import load
    from moeedge.models import decoder_ffn

    streams = [int(s) for s in args.streams.split(",")]
    with load(args.source, max_context=512, n_sequences=max(streams)) as model, torch.inference_mode():
        runner, cache = model.runner, model.cache
        seqs = [model.sequence] + [runner.new_sequence() for _ in range(max(streams) - 1)]
        prompts = [model.tokenizer.encode(t) for t in held_out_prompts(len(seqs), 400)]
        first = []
        for seq, ids in zip(seqs, prompts):
            first.append(int(runner.step([(seq, torch.tensor(ids))])[0][-1].argmax()))
        expert_bytes = cache.store.slot_bytes(cache.store.keys()[0])
        # one expert of one token alone (_expert_token), or of several rows (expert_rows)
        attention, attention_rows, one, rows_ = (Timed(runner._attention_block), Timed(runner._attention_rows),
                                                 Timed(runner._expert_token), Timed(decoder_ffn.expert_rows))
        runner._attention_block, runner._attention_rows = attention, attention_rows
        runner._expert_token, decoder_ffn.expert_rows = one, rows_
        modes = args.attention.split(",")
        order = [(n, m) for n in streams for m in modes]
        cells: dict[tuple, list[dict]] = {cell: [] for cell in order}
        for r in range(args.rounds + 1):   # round 0 warms (every expert read once)
            for n, mode in (order if r % 2 == 0 else order[::-1]):
                runner.attention_rows = mode == "rows"
                tokens = first[:n]
                stats0, start = cache.stats(), time.perf_counter()
                attention.seconds = attention_rows.seconds = one.seconds = rows_.seconds = 0.0
                for _ in range(args.steps):
                    out = runner.step([(s, torch.tensor([t])) for s, t in zip(seqs, tokens)])
                    tokens = [int(o[-1].argmax()) for o in out]
                wall, stats1 = time.perf_counter() - start, cache.stats()
                for seq, ids in zip(seqs[:n], prompts):
                    runner.truncate(seq, len(ids))
                gets = (stats1["hits"] + stats1["misses"] - stats0["hits"] - stats0["misses"]) / args.steps
                misses = (stats1["misses"] - stats0["misses"]) / args.steps  # 0: fully resident
                if r:
                    cells[n, mode].append({"step_s": wall / args.steps,
                                           "attention_s": (attention.seconds + attention_rows.seconds) / args.steps,
                                           "experts_s": (one.seconds + rows_.seconds) / args.steps,
                                           "experts_per_step": gets, "misses_per_step": misses})
        rows = []
        dense = model.plan.dense_bytes
        for n, mode in order:
            med = {k: statistics.median(c[k] for c in cells[n, mode]) for k in cells[n, mode][0]}
            rows.append({"streams": n, "attention": mode, **med,
                         "other_s": med["step_s"] - med["attention_s"] - med["experts_s"],
                         "attention_share": med["attention_s"] / med["step_s"], "tok_s": n / med["step_s"],
                         "weight_bytes_per_step": dense + med["experts_per_step"] * expert_bytes})
        alone = rows[0]["weight_bytes_per_step"] / rows[0]["streams"]
        for row in rows:
            row["x_first"] = row["tok_s"] / rows[0]["tok_s"]
            row["weight_bound_x_first"] = row["streams"] * alone / row["weight_bytes_per_step"]
            print(f"N={row['streams']} ({row['attention']}): {row['step_s'] * 1e3:.0f} ms a step "
                  f"(attention {row['attention_s'] * 1e3:.0f} = {row['attention_share']:.0%}, "
                  f"experts {row['experts_s'] * 1e3:.0f}, other {row['other_s'] * 1e3:.0f}; "
                  f"{row['experts_per_step']:.1f} experts), {row['tok_s']:.2f} tok/s = {row['x_first']:.2f} x 1 "
                  f"stream; weight-bound ceiling {row['weight_bound_x_first']:.2f} x", file=sys.stderr)
        ratios = {}
        if len(modes) > 1:  # each round's pair of cells ran side by side: the median of their ratios
            for n in streams:
                each = [a["step_s"] / b["step_s"] for a, b in zip(cells[n, modes[0]], cells[n, modes[1]])]
                ratios[n] = statistics.median(each)
                print(f"N={n}: {modes[0]} / {modes[1]} by round: " + " ".join(f"{x:.3f}" for x in each),
                      file=sys.stderr)
                print(f"N={n}: {modes[0]} / {modes[1]} step time, median of rounds: {ratios[n]:.3f}", file=sys.stderr)
    return report({"source": args.source, "cpu": cpu_name(), "commit": commit(), "steps": args.steps, "dense_bytes": dense,
                   "expert_bytes": expert_bytes, "rows": rows, "step_ratio": ratios}, args.json)


if __name__ == "__main__":
    sys.exit(main())
