"""Expert-cache hit rate of the runtime (not the simulator) by policy and predictor.

    python bench/policies_runtime.py [SOURCE] [--capacities 8,12,16] [--tokens 200]

Greedy decoding from a held-out prompt of the default model's corpus, the cache budget
forced to N experts; reads are asynchronous, so counts move a little from run to run.
"""
from __future__ import annotations

import argparse
import random

import moeedge
from moeedge.data.corpus import collect

# (policy, predictor, read guesses early): under LRU a predictor acts only through prefetch;
# under "predicted" it feeds eviction (the default set-up: nothing read early).
COMBINATIONS = (("lru", None, False), ("lru", "stale-gate", True), ("lru", "learned", True),
                ("predicted", None, False), ("predicted", "learned", False))


def measure(source, capacity: int, policy: str, predictor: str | None, prefetch: bool, prompt: str,
            tokens: int) -> dict:
    with moeedge.load(source, policy=policy, predictor=predictor, prefetch=prefetch, max_context=1024) as model:
        slot = model.cache.store.slot_bytes(model.cache.store.keys()[0])
        model.cache.set_budget(capacity * slot)
        ids = model.tokenizer.encode(prompt)[:200]
        list(model.stream_ids(ids, max_new_tokens=1, temperature=0))  # the prompt's reads are not counted
        model.cache.reset_stats()
        list(model.stream_ids(ids, max_new_tokens=tokens, temperature=0))
        return model.stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=None)
    p.add_argument("--capacities", default="8,12,16")
    p.add_argument("--tokens", type=int, default=200)
    args = p.parse_args()
    texts = collect().texts("heldout")
    random.Random(1).shuffle(texts)
    prompt = texts[0][:600]
    print(f"{'experts':>7} {'policy':10} {'predictor':16} {'hit rate':>8} {'misses':>6} {'prefetched':>10} "
          f"{'used':>5} {'recall':>6}")
    for capacity in (int(c) for c in args.capacities.split(",")):
        for policy, predictor, prefetch in COMBINATIONS:
            s = measure(args.source, capacity, policy, predictor, prefetch, prompt, args.tokens)
            recall = (s.get("prediction", {}).get("prediction_recall") or [None])[0]
            name = f"{predictor} early" if prefetch else str(predictor)
            print(f"{capacity:7d} {policy:10} {name:16} {s['hit_rate']:8.3f} {s['misses']:6d} "
                  f"{s['prefetch_issued']:10d} {s['prefetch_hits']:5d} {'-' if recall is None else f'{recall:.3f}':>6}")


if __name__ == "__main__":
    main()
