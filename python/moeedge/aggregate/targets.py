"""What each MoE layer keeps: the same level everywhere, or a share of the expert bytes
split across layers by measured sensitivity. A level is a method's knob: experts per layer
(merge, average, prune) or the rank of the low-rank factors (lowrank).

A layer's sensitivity is its curve of output error (layer.relative_error on the calibration
states) over the method's levels. Starting from every layer's largest level, the budget is
reached by stepping down, one level at a time, the layer whose error grows least per byte
saved, so the layers whose error grows fastest keep more.
"""
from __future__ import annotations

from typing import Callable

from moeedge.aggregate.layer import MoeLayer, Variant


def sensitivity(layer: MoeLayer, build: Callable[[MoeLayer, int], Variant], levels: list[int]) -> list[float]:
    """errors[i]: the layer's relative output error at levels[i]."""
    return [layer.relative_error(build(layer, level)) for level in levels]


def choose_levels(errors: list[list[float]], level_bytes: list[list[int]], budget_bytes: int) -> list[int]:
    """Per layer, the index of its level, all within budget_bytes, by greedy stepping down.
    errors[l][i], level_bytes[l][i]: layer l at its i-th level (bytes increasing with i)."""
    chosen = [len(e) - 1 for e in errors]
    floor = sum(b[0] for b in level_bytes)
    if budget_bytes < floor:
        raise ValueError(f"the smallest level of every layer already takes {floor} bytes, "
                         f"more than the {budget_bytes} asked")

    def growth(layer: int) -> float:
        i = chosen[layer]
        saved = level_bytes[layer][i] - level_bytes[layer][i - 1]
        return (errors[layer][i - 1] - errors[layer][i]) / max(saved, 1)

    while sum(b[i] for b, i in zip(level_bytes, chosen)) > budget_bytes:
        layer = min((l for l, i in enumerate(chosen) if i > 0), key=growth)
        chosen[layer] -= 1
    return chosen


def split_budget(errors: list[list[float]], expert_bytes: list[int], budget_bytes: int) -> list[int]:
    """Experts per layer (each at least 1) within budget_bytes.
    errors[l][n - 1]: layer l's error with n experts; expert_bytes[l]: one expert of layer l."""
    if budget_bytes < sum(expert_bytes):
        raise ValueError(f"one expert per layer already takes {sum(expert_bytes)} bytes, "
                         f"more than the {budget_bytes} asked")
    level_bytes = [[n * b for n in range(1, len(e) + 1)] for e, b in zip(errors, expert_bytes)]
    return [i + 1 for i in choose_levels(errors, level_bytes, budget_bytes)]

