"""Speculative decoding against plain decoding on one model, side by side in one process:
the same prompts, greedy (temperature=0), runs alternating plain / speculative, medians.

For each expert-cache size (a fraction of the model's expert bytes; 1 = fully resident),
first a prediction from a routing trace, then the measurement:
- predicted expert reads per token: the trace replayed through an LRU cache of that many
  experts, plainly (each token's layers in turn) and speculatively (a verify pass reads, per
  layer, the union of the experts of the k+1 tokens it checks, then moves on by the tokens
  kept: geometric at the measured acceptance, at most k, plus the full model's own);
- predicted tokens/s from the measured costs: c_e seconds per expert computed (from the
  resident plain step), o seconds of a step's other work per token (the draft's step less its
  experts), and r seconds per expert read (the cache's own read timing);
- measured: tokens/s of plain decoding, of speculative decoding with k adapting, and with k
  fixed; reads per token from the caches' bytes read; acceptance, draft-pick recall and
  the learned predictor's recall.

    python bench/speculative.py --model /var/tmp/moeedge-models/default-64m \\
        --draft /var/tmp/moeedge-models/default-merge1-64m --fractions 1,0.5,0.25 \\
        --trace bench/traces/default-heldout.npz -o bench/results/speculative/default-64m.json

    python bench/speculative.py --show bench/results/speculative/default-64m.json   # the table

On random-weight models the acceptance rate means nothing (a draft of noise agrees with
noise by chance): run it on trained routing (the default model and its widened copies).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import moeedge
from moeedge.runtime.plan import budget_for_cache
from moeedge.spec_choice import KChooser, expected_tokens

PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n\ndef main(", "class Stack:\n    def __init__(self",
           "    for i, line in enumerate(", "# read the file and count the words\n"]


def lru_reads(experts: np.ndarray, capacity: int, k: int = 0, accept: float = 0.0, seed: int = 0) -> dict:
    """Replay a trace [N, L, K] through an LRU cache of `capacity` experts: reads, experts
    computed and passes per generated token, plainly (k=0) or in verify passes of k+1 tokens
    (the pass's experts held together, so none evicts another of its own)."""
    rng = np.random.default_rng(seed)
    cache: OrderedDict = OrderedDict()
    reads = computed = n_passes = t = 0
    n, layers = experts.shape[0], experts.shape[1]
    while t + k + 1 <= n:
        for layer in range(layers):
            need = {(layer, int(e)) for e in experts[t:t + k + 1, layer].reshape(-1)}
            computed += len(need)
            for key in sorted(need):
                if key in cache:
                    cache.move_to_end(key)
                else:
                    reads += 1
                    cache[key] = True
            for key in [key for key in cache if key not in need][:max(0, len(cache) - max(capacity, len(need)))]:
                del cache[key]
        kept = 0
        while kept < k and rng.random() < accept:
            kept += 1
        t += kept + 1
        n_passes += 1
    return {"reads_per_token": reads / t, "computed_per_token": computed / t, "passes_per_token": n_passes / t}


def generate(model, ids: list[int], n: int, fresh: bool) -> list[int]:
    """One greedy generation; fresh: k adapting starts from nothing (what a new process knows)."""
    spec = model.speculator
    if fresh and spec is not None and spec.chooser.fixed is None:
        spec.chooser = KChooser(spec.chooser.k_max)
    return list(model.stream_ids(ids, n, temperature=0.0))


def run(model, prompt_ids: list[list[int]], n: int, fresh: bool = False) -> dict:
    """Greedy generations of n tokens from each prompt: tokens, decode tokens/s, bytes read."""
    before = model.stats()
    spec = model.speculator
    counts = dict(spec.counts) if spec else None
    tokens = [generate(model, ids, n, fresh) for ids in prompt_ids]
    after = model.stats()
    gen = after["generated_tokens"] - before["generated_tokens"]
    out = {"tokens": tokens, "tok_s": gen / (after["decode_seconds"] - before["decode_seconds"]), "generated": gen,
           "bytes_read": after["bytes_read"] - before["bytes_read"], "read_seconds": after["read_seconds"],
           "reads": after["reads"]}
    if spec:
        c = {key: spec.counts[key] - counts[key] for key in spec.counts}
        out.update(bytes_read=c["bytes_read"], acceptance=c["accepted"] / c["drafted"] if c["drafted"] else None,
                   tokens_per_pass=c["kept_tokens"] / max(1, c["rounds"] + c["plain_steps"]),
                   rounds=c["rounds"], plain_steps=c["plain_steps"], draft_step_seconds=spec.chooser.draft_cost,
                   recall=spec.stats()["draft_pick_recall"])
    prediction = after.get("prediction")
    if prediction:
        out["predictor_recall"] = (prediction["prediction_recall"] or [None])[0]  # the next layer, one ahead
    return out


def budget_for(model_dir: str, fraction: float) -> tuple[int, int]:
    """(the memory budget whose plain plan caches `fraction` of the expert bytes, one expert's bytes)."""
    with moeedge.load(model_dir, memory_budget="64GiB", max_context=512) as m:
        store = m.cache.store
        slot = store.slot_bytes(store.keys()[0])
        total = sum(store.slot_bytes(k) for k in store.keys())
        budget = budget_for_cache(m.plan, int(fraction * total) + (m.plan.prefill_borrow_bytes if fraction < 1 else 0))
    return budget, slot


def measure(args, fraction: float, draft: str, prompt_ids) -> dict:
    budget, slot = budget_for(args.model, fraction) if fraction < 1 else ("64GiB", None)
    models = {"plain": moeedge.load(args.model, memory_budget=budget, max_context=512),
              "spec": moeedge.load(args.model, memory_budget=budget, max_context=512, draft=draft)}
    if args.k:
        models[f"spec_k{args.k}"] = moeedge.load(args.model, memory_budget=budget, max_context=512, draft=draft)
        models[f"spec_k{args.k}"].speculator.chooser.fixed = args.k
    if fraction < 1:
        # Each load plans from the process's resident memory, which the models loaded before
        # inflate: set the caches as separate processes with this budget would get them, the
        # plain one `fraction` of the expert bytes, the speculative ones that less the draft's bytes.
        total = sum(slot for _ in models["plain"].cache.store.keys())
        for name, m in models.items():
            m.cache.set_budget(int(fraction * total) - m.plan.draft_bytes)
    try:
        for m in models.values():  # warm: the caches filled as a run leaves them
            run(m, prompt_ids[:1], 8)
        got = {name: [] for name in models}
        names = list(models)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate who goes first
                got[name].append(run(models[name], prompt_ids, args.tokens, args.fresh))
                print(f"  {fraction} {name}: {got[name][-1]['tok_s']:.3f} tok/s", file=sys.stderr, flush=True)
        same = all(r["tokens"] == got["plain"][0]["tokens"] for runs in got.values() for r in runs)
        caches = {name: m.cache.budget_bytes for name, m in models.items()}
        slot = slot or models["plain"].cache.store.slot_bytes(models["plain"].cache.store.keys()[0])
    finally:
        for m in models.values():
            m.close()
    out = {"fraction": fraction, "budget": budget, "draft": draft, "same_tokens": same,
           "cache_experts": {name: b // slot for name, b in caches.items()}}
    for name, runs in got.items():
        def med(key):
            vals = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(vals) if vals else None
        tokens = sum(r["generated"] for r in runs)
        out[name] = {"tok_s": med("tok_s"), "tok_s_runs": [round(r["tok_s"], 4) for r in runs],
                     "reads_per_token": sum(r["bytes_read"] for r in runs) / slot / tokens,
                     **{key: med(key) for key in ("acceptance", "tokens_per_pass", "recall", "draft_step_seconds")},
                     "predictor_recall": runs[-1].get("predictor_recall"),
                     "read_seconds_per_read": runs[-1]["read_seconds"] / runs[-1]["reads"] if runs[-1]["reads"] else None}
    return out


def predict(out: dict, resident: dict, experts: np.ndarray, k: int) -> dict:
    """Reads per token from the trace, and tokens/s from the resident run's costs (module docstring)."""
    layers = experts.shape[1]
    t1 = 1.0 / resident["plain"]["tok_s"]
    d = resident[f"spec_k{k}"]["draft_step_seconds"]
    c_e = (t1 - d) / layers   # the draft computes one expert per layer where plain computes two
    o = max(0.0, d - layers * c_e)
    r = out["plain"]["read_seconds_per_read"] or 0.0
    a = resident[f"spec_k{k}"]["acceptance"] or 0.0
    plain = lru_reads(experts, out["cache_experts"]["plain"])
    spec = lru_reads(experts, out["cache_experts"][f"spec_k{k}"], k, a)
    e = expected_tokens(a, k)
    t_plain = o + plain["computed_per_token"] * c_e + plain["reads_per_token"] * r
    t_spec = (k * d + (k + 1) * o) / e + spec["computed_per_token"] * c_e + spec["reads_per_token"] * r
    return {"acceptance": a, "k": k, "c_e": c_e, "o": o, "r": r, "plain": plain, "spec": spec,
            "plain_tok_s": 1.0 / t_plain, "spec_tok_s": 1.0 / t_spec}


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def table(report: dict) -> str:
    """The results as a markdown table (--show)."""
    rows = ["| experts cached | draft | mode | tok/s (median) | runs | x plain | reads/token | acceptance "
            "| tokens/pass | draft-pick recall | predictor recall (next layer) | predicted tok/s | predicted reads/token |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        pred = r.get("predicted") or {}
        for mode in [m for m in r if m == "plain" or m.startswith("spec")]:
            m = r[mode]
            guess = pred.get("plain" if mode == "plain" else "spec", {}) if mode != "spec" else {}
            tok = pred.get("plain_tok_s" if mode == "plain" else "spec_tok_s") if mode != "spec" else None

            def f(v, fmt="{:.2f}"):
                return "" if v is None else fmt.format(v)
            rows.append(f"| {r['fraction']:g} ({r['cache_experts'][mode]}) | {Path(r['draft']).name} | {mode} "
                        f"| {f(m['tok_s'])} | {', '.join(f(v) for v in m['tok_s_runs'])} "
                        f"| {f(m['tok_s'] / r['plain']['tok_s'])} | {f(m['reads_per_token'])} | {f(m['acceptance'])} "
                        f"| {f(m['tokens_per_pass'])} | {f(m['recall'])} | {f(m.get('predictor_recall'))} | {f(tok)} "
                        f"| {f(guess.get('reads_per_token'))} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--show":
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    p = argparse.ArgumentParser(prog="bench/speculative.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--draft", required=True, help="the draft for every fraction")
    p.add_argument("--resident-draft", default=None, help="also measure fully resident with this draft")
    p.add_argument("--fractions", default="1,0.5,0.25", help="expert-cache sizes, of the expert bytes")
    p.add_argument("--tokens", type=int, default=24, help="tokens per prompt per run")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--k", type=int, default=2, help="the fixed k measured beside the adaptive one (0: none)")
    p.add_argument("--fresh", action="store_true",
                   help="k adapting starts from nothing at every generation (else it learns across them)")
    p.add_argument("--trace", default=None, help="a routing trace (moeedge trace) for the predictions")
    p.add_argument("--resident-from", default=None,
                   help="a previous output whose fully resident run (with --draft) gives the costs for predictions")
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    with moeedge.load(args.model, memory_budget="64GiB", max_context=64) as m:
        prompt_ids = [m.tokenizer.encode(t) for t in PROMPTS[:args.prompts]]
    fractions = [float(f) for f in args.fractions.split(",")]
    configs = [(f, args.draft) for f in fractions]
    if args.resident_draft:
        configs.insert(0, (1.0, args.resident_draft))
    experts = np.load(args.trace)["experts"] if args.trace else None
    results, resident = [], None
    if args.resident_from:
        earlier = json.loads(Path(args.resident_from).read_text())["results"]
        resident = next(r for r in earlier if r["fraction"] == 1.0 and r["draft"] == args.draft)
        results.extend(earlier)
    for fraction, draft in configs:
        started = time.time()
        out = measure(args, fraction, draft, prompt_ids)
        if fraction == 1.0 and draft == args.draft:
            resident = out
        results = [r for r in results if (r["fraction"], r["draft"]) != (fraction, draft)]
        if experts is not None and resident is not None and f"spec_k{args.k}" in resident:
            out["predicted"] = predict(out, resident, experts, args.k)
        out["seconds"] = round(time.time() - started)
        results.append(out)
        print(json.dumps({key: v for key, v in out.items()}, default=str), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"model": args.model, "cpu": cpu(), "commit": commit, "threads": torch.get_num_threads(),
              "args": vars(args), "results": results}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
