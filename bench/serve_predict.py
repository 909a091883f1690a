"""Predict expert bytes read per generated token when N streams decode together, with the
trace simulator (moeedge.sim), before measuring it with bench/serve_load.py.

    python bench/serve_predict.py bench/traces/default-heldout.npz --cache-bytes 700MB \
        --expert-bytes 67092480 --streams 1,2,4,8 --tokens 64 --prompt-tokens 140 --policy lru

N held-out sequences (windows of the trace, as N users' requests) are interleaved the way
the server runs them: each prompt read in one prefill step per layer (the union of its
tokens' experts), then one decode step per token and layer whose experts are the union of
the N sequences' (the engine reads each once for all). A warm-up like the load
generator's comes first (the largest N, 8 tokens); misses are counted after it. The cache
holds what is left after N sequences' KV: --cache-bytes is the server's
moeedge_expert_cache_budget_bytes at that budget (serve_load.py prints it).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from moeedge.sim import Trace, load_trace
from moeedge.sim.policies import simulate
from moeedge.units import parse_bytes


def routing(trace: Trace) -> np.ndarray:
    """int [tokens, layers, E] bool: which experts each token picks at each layer."""
    picks = np.zeros((trace.n_tokens, trace.n_layers, trace.n_experts), dtype=bool)
    for j in range(trace.step_keys.shape[1]):
        k = trace.step_keys[:, j]
        ok = k >= 0
        picks[trace.step_token[ok], trace.step_layer[ok], k[ok] % trace.n_experts] = True
    return picks


def batched_steps(picks: np.ndarray, starts: list[int], prompt: int, tokens: int,
                  chunk: int) -> list[tuple[int, np.ndarray]]:
    """Per step, (its layer, the [E] experts it reads): each sequence's prefill chunks, then
    the decode steps."""
    steps = []
    for s in starts:
        for c in range(s, s + prompt, chunk):
            for layer in range(picks.shape[1]):
                steps.append((layer, picks[c:min(c + chunk, s + prompt), layer].any(axis=0)))
    for t in range(tokens):
        for layer in range(picks.shape[1]):
            steps.append((layer, np.any([picks[s + prompt + t, layer] for s in starts], axis=0)))
    return steps


def as_trace(steps, n_layers: int, n_experts: int) -> Trace:
    keys = np.full((len(steps), n_experts), -1, dtype=np.int64)
    for i, (layer, used) in enumerate(steps):
        e = np.flatnonzero(used)
        keys[i, :len(e)] = layer * n_experts + e
    layers = np.array([layer for layer, _ in steps], dtype=np.int64)
    return Trace(keys, layers, np.arange(len(steps), dtype=np.int64), n_layers, n_experts)


def predict(picks: np.ndarray, n: int, warm_n: int, window: int, prompt: int, tokens: int, capacity: int,
            policy: str, chunk: int) -> dict:
    starts = [i * window for i in range(max(n, warm_n))]
    warm = batched_steps(picks, starts[:warm_n], prompt, 8, chunk)
    measured = batched_steps(picks, starts[:n], prompt, tokens, chunk)
    n_layers, n_experts = picks.shape[1], picks.shape[2]
    run = simulate(as_trace(warm + measured, n_layers, n_experts), policy, capacity)
    keys = as_trace(warm + measured, n_layers, n_experts).step_keys
    after = slice(len(warm), None)
    misses = int(((keys[after] >= 0) & (run.hit[after] == 0)).sum())
    reads = int((keys[after] >= 0).sum())
    return {"streams": n, "expert_reads": reads, "misses": misses, "generated": n * tokens,
            "misses_per_token": misses / (n * tokens)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--cache-bytes", required=True, help="the expert cache's budget (moeedge_expert_cache_budget_bytes)")
    p.add_argument("--expert-bytes", required=True, help="one expert's bytes in the cache")
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=120, help="tokens of each prompt (the load generator's)")
    p.add_argument("--policy", default="lru")
    p.add_argument("--prefill-chunk", type=int, default=128, help="the plan's prefill chunk (the server prints it)")
    args = p.parse_args(argv)
    trace = load_trace(args.trace)
    picks = routing(trace)
    expert = parse_bytes(args.expert_bytes)
    capacity = parse_bytes(args.cache_bytes) // expert
    streams = [int(s) for s in args.streams.split(",")]
    window = trace.n_tokens // max(streams)
    if window < args.prompt_tokens + args.tokens:
        sys.exit(f"the trace's {trace.n_tokens} tokens are too few for {max(streams)} sequences of "
                 f"{args.prompt_tokens + args.tokens}")
    rows = [predict(picks, n, max(streams), window, args.prompt_tokens, args.tokens, capacity, args.policy,
                    args.prefill_chunk) for n in streams]
    for row in rows:
        row["bytes_read_per_token"] = row["misses_per_token"] * expert
    print(json.dumps({"trace": args.trace, "capacity_experts": capacity, "policy": args.policy, "rows": rows},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
