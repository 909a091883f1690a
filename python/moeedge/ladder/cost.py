"""Expected seconds per token of a plan, from measurements (moeedge.ladder.machine) and
the simulator's hit-rate curve on the model's own routing (moeedge.ladder.build).

Decode, one token: each MoE layer l computes top_k experts in its variant's format
(ffn[format].decode_s each, measured), and of those a share 1 - h misses and is read at
the cache's measured bandwidth B; h is the LRU hit rate of the whole cache at its
capacity in experts (cache bytes / the plan's mean expert slot), read off the curve;
the rest of the step (attention, router, dense layers) is dense_s, measured on the
source and the same for every plan:

    t_decode = dense_s + sum_l top_k * (compute_l + (1 - h) * (latency + bytes_l / B))

where latency is what a miss measurably waits beyond its bytes at B (the runtime's own
counters: wait seconds per miss, moeedge.ladder.machine.miss_wait_seconds).

Prefill, per token of a chunk of C tokens: compute at the chunk rate (prefill_s), and
each layer reads the distinct experts the chunk routes to, E (1 - (1 - k/E)^C) of
them, less the share the cache holds (capacity / all experts):

    t_prefill = sum_l top_k * compute_l + E_l (1 - (1 - k/E)^C) (1 - r) bytes_l / (B C)

Quality: the sum of the layers' end-to-end KL (each measured with only that layer
changed, moeedge.ladder.build); checked end to end on the chosen plan (`--check`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAGE = 4096


@dataclass(frozen=True)
class Option:
    """One variant of one layer, as the planner weighs it."""
    name: str
    expert_bytes: tuple[int, ...]   # per expert
    bits: tuple[int, ...] | None    # per expert (quantized variants), None: as stored
    kl: float                       # end-to-end KL with only this layer in this variant

    @property
    def mean_bytes(self) -> float:
        return float(np.mean(self.expert_bytes))

    @property
    def mean_slot(self) -> float:
        return float(np.mean([-(-b // PAGE) * PAGE for b in self.expert_bytes]))

    @property
    def max_slot(self) -> int:
        return max(-(-b // PAGE) * PAGE for b in self.expert_bytes)


@dataclass(frozen=True)
class Machine:
    read_bps: float        # the cache's cold read bandwidth
    ffn: dict              # format -> {"decode_s", "prefill_s"} per expert
    dense_s: float         # the rest of a decode step, per token
    miss_latency_s: float = 0.0  # a miss's measured wait beyond its bytes at read_bps


@dataclass(frozen=True)
class Curve:
    capacity: np.ndarray   # experts
    hit_rate: np.ndarray

    @classmethod
    def of(cls, manifest_curve: dict) -> Curve:
        return cls(np.asarray(manifest_curve["capacity_experts"], dtype=float),
                   np.asarray(manifest_curve["hit_rate"], dtype=float))

    def at(self, capacity: float) -> float:
        """The hit rate at this capacity; 1 where every expert fits (once read, decoding
        never misses again: the curve's cold misses are a one-off)."""
        if capacity < self.capacity[0]:
            return 0.0
        if capacity >= self.capacity[-1]:
            return 1.0
        return float(np.interp(capacity, self.capacity, self.hit_rate))


def compute_s(option: Option, ffn: dict, phase: str) -> float:
    """Mean seconds of one of the layer's experts, each in its format."""
    key = f"{phase}_s"
    if option.bits is None:
        return ffn["stored"][key]
    return float(np.mean([ffn[f"int{b}"][key] for b in option.bits]))


def capacity_experts(plan: list[Option], cache_bytes: int) -> float:
    return cache_bytes / float(np.mean([o.mean_slot for o in plan]))


def decode_seconds(plan: list[Option], cache_bytes: int, machine: Machine, curve: Curve, top_k: int) -> dict:
    h = curve.at(capacity_experts(plan, cache_bytes))
    compute = sum(top_k * compute_s(o, machine.ffn, "decode") for o in plan)
    read = sum(top_k * (1 - h) * (machine.miss_latency_s + o.mean_bytes / machine.read_bps) for o in plan)
    return {"seconds": machine.dense_s + compute + read, "compute_s": compute, "read_s": read,
            "dense_s": machine.dense_s, "hit_rate": h}


def prefill_seconds(plan: list[Option], cache_bytes: int, machine: Machine, top_k: int, chunk: int) -> float:
    n_experts = len(plan[0].expert_bytes)
    resident = min(1.0, capacity_experts(plan, cache_bytes) / (n_experts * len(plan)))
    touched = n_experts * (1 - (1 - top_k / n_experts) ** chunk)
    return sum(top_k * compute_s(o, machine.ffn, "prefill")
               + touched * (1 - resident) * (machine.miss_latency_s + o.mean_bytes / machine.read_bps) / chunk
               for o in plan)


def fits(plan: list[Option], cache_bytes: int, top_k: int) -> bool:
    """The cache holds one layer's top-k experts of every layer's variant."""
    return cache_bytes >= top_k * max(o.max_slot for o in plan)
