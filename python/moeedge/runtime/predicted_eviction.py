"""policy="predicted" at run time: the native cache's "score" policy, fed before every MoE
layer with scores that make it evict as moeedge.sim.predicted does (the expert whose
discounted expected uses are fewest, from the layer schedule, each expert's online pick
rate and the predictor's guesses for this token's next layers). The simulator measures
the rule; this class only keeps the same estimates and hands them to the cache."""
from __future__ import annotations

from typing import Callable

import torch

from moeedge._core import ExpertCache
from moeedge.keys import ExpertKey, split_key
from moeedge.policies import PICK_RATE_ALPHA as ALPHA
from moeedge.policies import PREDICTED_DISCOUNT as DISCOUNT
from moeedge.policies import later_visits


class PredictedEviction:
    def __init__(self, cache: ExpertCache, n_layers: int, n_experts: int, pick_rate: torch.Tensor,
                 room: Callable[[], int], key: Callable[[int, int], int] | None = None):
        self.cache = cache
        # (layer, expert) -> cache key, in the representation the layer is read in
        self.key = key or (lambda layer, e: ExpertKey(layer, e).packed)
        self.room = room  # experts the cache holds now
        self.n_layers, self.n_experts = n_layers, n_experts
        self.p = pick_rate.double().clone()           # [L, E] chance a token picks each expert
        self.q = torch.full((n_layers, n_experts), -1.0, dtype=torch.float64)  # this token's guesses
        self.later = later_visits(n_layers)  # every visit after the next

    def on_step(self, layer: int, picked: list[int], guesses: dict[int, torch.Tensor], learn: bool = True) -> None:
        """Layer `layer` is about to get `picked`; guesses: target layer -> [E] chances.
        learn=False: only score (a speculative verify pass, whose tokens may be rejected)."""
        q = self.q if learn else self.q.clone()
        q[layer] = -1.0  # this token's visit is now: its guesses are spent
        for target, chances in guesses.items():  # target == layer: the next token's visit
            q[target] = chances.double()
        n = self.n_layers
        layers = torch.arange(n, dtype=torch.float64)[:, None]
        delta = torch.where(layers > layer, layers - layer, layers - layer + n)
        chance = torch.where(q >= 0, q, self.p)
        self.worth = ((chance + self.p * self.later) * DISCOUNT ** delta).tolist()  # [L][E]: discounted uses
        self.now = {self.key(layer, e) for e in picked}
        resident = self.cache.resident_keys()
        # The runtime pins this step's experts one at a time: the rest must stay meanwhile,
        # those being read too, which land unpinned (scored now: a score left from an
        # earlier stay made a guess read early evict them before their use).
        scores = dict.fromkeys(self.now, float("inf"))
        if len(resident) + len(picked) > self.room():  # else nothing would be evicted: spare the work
            scores.update({key: self._worth(key) for key in resident if key not in self.now})
        self.cache.set_scores(scores)
        if not learn:
            return
        used = torch.zeros(self.n_experts, dtype=torch.float64)
        used[picked] = 1.0
        self.p[layer] = (1.0 - ALPHA) * self.p[layer] + ALPHA * used

    def _worth(self, key: int) -> float:
        layer, e, _ = split_key(key)
        # a representation its layer is no longer read in (a live switch left it): first out
        return self.worth[layer][e] if key == self.key(layer, e) else -1.0

    def worth_reading(self, wanted: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Of the (layer, expert) guesses in `wanted` (most wanted first), those worth reading
        early after this step: each takes a free slot, or else the slot of the resident
        expert worth least, and only when it is worth more than that one. Reading a guess
        worth less would evict a would-be hit, which is how early reads used to cost more
        than they hid."""
        resident = set(self.cache.resident_keys())
        free = self.room() - len(resident | self.now)
        victims = sorted(self._worth(key) for key in resident - self.now)
        chosen = []
        for layer, e in wanted:
            key = self.key(layer, e)
            if key in resident or key in self.now:
                continue
            if free > 0:
                free -= 1
            elif victims and self.worth[layer][e] > victims[0]:
                victims.pop(0)
            else:
                break
            chosen.append((layer, e))
        if chosen:  # scored by its worth when it lands, not by whatever score it had when last resident
            self.cache.set_scores({self.key(layer, e): self.worth[layer][e] for layer, e in chosen})
        return chosen
