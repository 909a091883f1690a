"""policy="predicted" at run time: the native cache's "score" policy, fed before every MoE
layer with scores that make it evict as moeedge.sim.predicted does (the expert whose
expected next use is furthest away, from the layer schedule, each expert's online pick
rate and the predictor's guesses for this token's next layers). The simulator measures
the rule; this class only keeps the same estimates and hands them to the cache."""
from __future__ import annotations

from typing import Callable

import torch

from moeedge._core import ExpertCache
from moeedge.keys import ExpertKey
from moeedge.sim import PICK_RATE_ALPHA as ALPHA


class PredictedEviction:
    def __init__(self, cache: ExpertCache, n_layers: int, n_experts: int, pick_rate: torch.Tensor,
                 room: Callable[[], int]):
        self.cache = cache
        self.room = room  # experts the cache holds now
        self.n_layers, self.n_experts = n_layers, n_experts
        self.p = pick_rate.double().clone()           # [L, E] chance a token picks each expert
        self.q = torch.full((n_layers, n_experts), -1.0, dtype=torch.float64)  # this token's guesses
        self.key_of = {ExpertKey(layer, e).packed: (layer, e) for layer in range(n_layers) for e in range(n_experts)}

    def on_step(self, layer: int, picked: list[int], guesses: dict[int, torch.Tensor]) -> None:
        """Layer `layer` is about to get `picked`; guesses: target layer -> [E] chances."""
        for target, chances in guesses.items():
            self.q[target] = chances.double()
        self.q[layer] = -1.0
        resident = self.cache.resident_keys()
        if len(resident) + len(picked) > self.room():  # nothing would be evicted: spare the work
            n = self.n_layers
            layers = torch.arange(n, dtype=torch.float64)[:, None]
            delta = torch.where(layers > layer, layers - layer, layers - layer + n)
            chance = torch.where(self.q >= 0, self.q, self.p)
            when = (delta + (1.0 - chance) * n / self.p.clamp(min=1e-6)).tolist()
            now = {ExpertKey(layer, e).packed for e in picked}
            # the runtime pins this step's experts one at a time: the rest must stay meanwhile
            self.cache.set_scores({key: float("inf") if key in now else -when[self.key_of[key][0]][self.key_of[key][1]]
                                   for key in resident})
        used = torch.zeros(self.n_experts, dtype=torch.float64)
        used[picked] = 1.0
        self.p[layer] = (1.0 - ALPHA) * self.p[layer] + ALPHA * used
