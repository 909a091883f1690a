"""`moeedge plan`: per MoE layer the variant, and the expert cache's bytes, that minimise
the expected seconds per decoded token (moeedge.ladder.cost) within a memory budget and
a quality tolerance (the sum of the layers' measured KL, nats per token).

The budget is split by the single memory planner (moeedge.runtime.plan): fixed cost,
dense weights, KV cache and buffers first, the expert cache in the rest, whatever the
variants; smaller variants fit more experts in it. Plans are enumerated whole where
there are at most EXHAUSTIVE of them, else along a greedy path from the lossless plan
(each step the layer change with the most time saved per KL added). A lossy plan is
chosen only where it is at least LOSSY_GAIN faster than the lossless one: quality is
not given up for noise. The cache is one LRU-like pool shared by all layers, so a
layer's share of it is its share of the plan's expert bytes. Prefetch stays as the
runtime sets it (decoders: off); the plan does not choose it yet.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from moeedge.ladder.cost import (
    Curve,
    Machine,
    Option,
    decode_seconds,
    fits,
    prefill_seconds,
)
from moeedge.ladder.variants import LOADABLE

EXHAUSTIVE = 20000
LOSSY_GAIN = 1.05


@dataclass
class Point:
    variants: list[str]
    kl: float
    seconds: float
    detail: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return 1.0 / self.seconds

    def as_dict(self) -> dict:
        return {"variants": self.variants, "kl_sum": self.kl, "tok_s": self.tok_s, **self.detail}


def layer_options(manifest: dict, n_layers: int) -> list[list[Option]]:
    """Each layer's loadable variants that were built and measured end to end."""
    out = []
    for i in range(n_layers):
        built = manifest["layers"].get(str(i))
        quality = manifest.get("quality", {}).get(str(i))
        if built is None or quality is None:
            raise ValueError(f"the ladder's layer {i} is not built and measured yet: run `moeedge ladder` to "
                             f"finish it")
        row = []
        for name in LOADABLE:
            v = built["variants"].get(name)
            if v is not None and name in quality:
                row.append(Option(name, tuple(v["expert_bytes"]), None if v["bits"] is None else tuple(v["bits"]),
                                  float(quality[name]["kl_mean"])))
        out.append(row)
    return out


def evaluate(plan: tuple[Option, ...], cache_bytes: int, machine: Machine, curve: Curve, top_k: int,
             chunk: int) -> Point | None:
    if not fits(list(plan), cache_bytes, top_k):
        return None
    d = decode_seconds(list(plan), cache_bytes, machine, curve, top_k)
    d["prefill_tok_s"] = 1.0 / prefill_seconds(list(plan), cache_bytes, machine, top_k, chunk)
    d["expert_bytes"] = sum(sum(o.expert_bytes) for o in plan)
    d["layer_cache_share"] = [sum(o.expert_bytes) / d["expert_bytes"] for o in plan]
    return Point([o.name for o in plan], sum(o.kl for o in plan), d.pop("seconds"), d)


def candidates(options: list[list[Option]], score) -> list[Point]:
    """Every plan where they are few, else the greedy path from the lossless one."""
    total = 1
    for row in options:
        total *= len(row)
    if total <= EXHAUSTIVE:
        return [p for p in map(score, itertools.product(*options)) if p is not None]
    current = [row[0] for row in options]  # "stored" first (LOADABLE's order)
    path = [score(tuple(current))]
    while True:
        best, best_ratio = None, 0.0
        base = path[-1]
        for i, row in enumerate(options):
            for o in row:
                if o.kl <= current[i].kl:
                    continue
                trial = score(tuple(current[:i] + [o] + current[i + 1:]))
                if trial is None:
                    continue
                gain = (base.seconds if base is not None else float("inf")) - trial.seconds
                ratio = gain / (o.kl - current[i].kl)
                if best is None or ratio > best_ratio:
                    best, best_ratio = (i, o, trial), ratio
        if best is None or (base is not None and best_ratio <= 0):
            return [p for p in path if p is not None]
        current[best[0]] = best[1]
        path.append(best[2])


def frontier(points: list[Point]) -> list[Point]:
    """The plans no other plan beats on both speed and quality, fastest last."""
    out = []
    for p in sorted(points, key=lambda p: (p.kl, p.seconds)):
        if not out or p.seconds < out[-1].seconds:
            out.append(p)
    return out


@dataclass
class Choice:
    chosen: Point
    lossless: Point | None
    frontier: list[Point]
    binds: str
    cache_bytes: int


def choose(options: list[list[Option]], cache_bytes: int, machine: Machine, curve: Curve, top_k: int, chunk: int,
           max_kl: float) -> Choice:
    if max_kl < 0:
        raise ValueError(f"--max-kl must be at least 0, got {max_kl}")
    points = candidates(options, lambda plan: evaluate(plan, cache_bytes, machine, curve, top_k, chunk))
    if not points:
        raise ValueError(f"no plan fits an expert cache of {cache_bytes} bytes: it must hold one layer's top-"
                         f"{top_k} experts even in the smallest variant; give a larger --memory-budget")
    lossless = next((p for p in points if p.kl == 0.0), None)
    within = [p for p in points if p.kl <= max_kl]
    if not within:
        raise ValueError(f"no plan that fits the budget is within --max-kl {max_kl} (the lossless plan does not "
                         f"fit the expert cache); allow more KL or give a larger --memory-budget")
    best = min(within, key=lambda p: (p.seconds, p.kl))
    chosen = lossless if lossless is not None and lossless.seconds <= best.seconds * LOSSY_GAIN else best
    fastest = min(points, key=lambda p: p.seconds)
    if fastest.seconds < chosen.seconds / LOSSY_GAIN:
        binds = (f"quality: a faster plan ({fastest.tok_s:.1f} tok/s) needs KL {fastest.kl:.2e} > --max-kl "
                 f"{max_kl:g}")
    elif chosen.detail["hit_rate"] < 1.0:
        binds = (f"memory: the cache holds {chosen.detail['hit_rate']:.1%} of the experts the text routes to; "
                 f"more budget would read less")
    else:
        binds = "neither: every expert of the plan fits in the cache"
    return Choice(chosen, lossless, frontier(points), binds, cache_bytes)
