"""One decode measurement in this process, printed as one JSON object: run it under a
memory cgroup (moeedge.cgroup.run_limited) to measure a budget for real.

    python -m moeedge.decode_bench SOURCE --memory-budget B [--prefetch] [--tokens 64] [--warm]

The prompt is `prompt_ids(vocab, n)`, the same ids every engine of the benchmark harness
(moeedge.harness) decodes greedily from. The record carries the routing of every token
(prompt and generated), from which the harness computes the physical bound, and each
generated token's time split into waiting for experts and the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from moeedge.decode_measures import latency_summary, prompt_ids, storage_read_bytes
from moeedge.units import parse_bytes


class _Routing:
    """The experts each MoE layer picked for each token, in call order."""

    def __init__(self):
        self.layers: dict[int, list[np.ndarray]] = {}

    def __call__(self, layer: int, experts: torch.Tensor, gates: torch.Tensor, x: torch.Tensor) -> None:
        self.layers.setdefault(layer, []).append(experts.detach().to(torch.int64).cpu().numpy())

    def experts(self, first: int = 0) -> list:
        """[tokens, layers, k] as nested lists, layers from ``first`` (the decoder's, for Switch)."""
        chosen = [np.concatenate(self.layers[i]) for i in sorted(self.layers) if i >= first]
        return np.stack(chosen, axis=1).tolist() if chosen else []


def measure(source: str, memory_budget, prefetch: bool, tokens: int, prompt_tokens: int, policy: str,
            threads: int, predictor: str | None = "auto", max_context: int = 1024, warm: bool = False) -> dict:
    """warm: read every expert first (as many as the cache holds) and decode the prompt once
    untimed, so that a budget that holds the model measures compute alone."""
    from moeedge._core import kernel_busy_seconds
    from moeedge.api import load  # lazy: the harness imports this module and must not map torch

    start = time.perf_counter()
    model = load(source, memory_budget=memory_budget, prefetch=prefetch, policy=policy, max_context=max_context,
                 predictor=predictor if prefetch or policy in ("auto", "predicted") else None, threads=threads)
    load_s = time.perf_counter() - start
    routing = _Routing()
    with model.recording(routing):
        prompt = prompt_ids(model.config.vocab, prompt_tokens)
        if warm:
            for key in model.cache.store.keys():
                del_ = model.cache.get(key)
                del del_  # unpinned: a cache too small for all of them keeps the last it read
            other = prompt_ids(model.config.vocab, prompt_tokens, seed=1)  # no shared prefix: the timed
            other[0] = 3 if prompt[0] != 3 else 4                         # prompt is prefilled whole
            for _ in model.stream_ids(other, max_new_tokens=tokens, temperature=0):
                pass
            routing.layers.clear()
            model.cache.reset_stats()
        times, waits = [], []
        last = time.perf_counter()
        waited = model.cache.stats()["wait_seconds"]
        out = []
        window: dict = {}  # the decode steps after the first token: what the bound covers
        for token in model.stream_ids(prompt, max_new_tokens=tokens, temperature=0):
            now = time.perf_counter()
            cache = model.cache.stats()
            w = cache["wait_seconds"]
            if not out:
                window.update(storage=storage_read_bytes(), cache_bytes=cache["bytes_read"],
                              busy=cache["read_busy_seconds"], kernel=kernel_busy_seconds())
            times.append(now - last)
            waits.append(w - waited)
            out.append(int(token))
            last, waited = now, w
    stats = model.stats()
    model.close()
    decode_reads = {"decode_read_bytes": storage_read_bytes() - window["storage"],
                    "decode_cache_read_bytes": stats["bytes_read"] - window["cache_bytes"],
                    "decode_read_busy_s": stats["read_busy_seconds"] - window["busy"],
                    "decode_kernel_s": kernel_busy_seconds() - window["kernel"]} if window else {}
    steps, step_waits = times[1:], waits[1:]  # the first includes the prefill
    first_decoder_layer = len(model.config.encoder_moe_blocks) if model.encoder_decoder else 0
    return {
        "source": source, "memory_budget": model.plan.budget_bytes, "warm": warm, "prefetch": prefetch,
        "policy": stats["policy"],
        "predictor": stats.get("prediction", {}).get("predictor"),
        "tokens": len(times), "prompt_tokens": prompt_tokens, "threads": threads,
        **latency_summary(steps),
        "prefill_tok_s": prompt_tokens / times[0] if times else 0.0,
        "load_s": load_s,
        "wall_s": time.perf_counter() - start,
        "hit_rate": stats["hit_rate"],
        "generated": out,
        # Per generated token after the first: seconds waiting for experts, and the rest (compute, Python).
        "token_wait_s": step_waits,
        "token_other_s": [t - w for t, w in zip(steps, step_waits)],
        **decode_reads,
        "routing": routing.experts(first_decoder_layer),
        "plan": stats["plan"], "stats": {k: v for k, v in stats.items() if k not in ("plan",)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.decode_bench")
    parser.add_argument("source")
    parser.add_argument("--memory-budget", default="auto",
                        help="bytes (4096, 1.5GiB), 'auto', or 'min' (the smallest workable)")
    parser.add_argument("--prefetch", action="store_true")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--predictor", default="auto", help="with --prefetch or --policy auto|predicted (default auto)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-context", type=int, default=1024, help="tokens the KV cache holds (default 1024)")
    parser.add_argument("--warm", action="store_true",
                        help="read every expert and decode once first: measure compute, not the disk")
    args = parser.parse_args(argv)
    try:
        budget = args.memory_budget if args.memory_budget in ("auto", "min") else parse_bytes(args.memory_budget)
    except ValueError as e:
        parser.error(f"--memory-budget: {e}")
    print(json.dumps(measure(args.source, budget, args.prefetch, args.tokens, args.prompt_tokens, args.policy,
                             args.threads, args.predictor, args.max_context, args.warm), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
