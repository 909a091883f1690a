"""How many experts each MoE layer keeps: the same n everywhere, or a share of the expert
bytes split across layers by measured sensitivity.

A layer's sensitivity is its curve of output error (layer.relative_error on the calibration
states) against its expert count, for the method at hand. Starting from every expert, the
budget is reached by removing one expert at a time from the layer whose error grows least
per byte saved, so the layers whose error grows fastest keep more.
"""
from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from moeedge.aggregate.layer import MoeLayer, Variant


def sensitivity(layer: MoeLayer, build: Callable[[MoeLayer, int], Variant]) -> list[float]:
    """[E] errors[n - 1]: the layer's relative output error with n experts."""
    return [layer.relative_error(build(layer, n)) for n in range(1, layer.n_experts + 1)]


def split_budget(errors: list[list[float]], expert_bytes: list[int], budget_bytes: int) -> list[int]:
    """Experts per layer (each at least 1) within budget_bytes, by greedy removal.
    errors[l][n - 1]: layer l's error with n experts; expert_bytes[l]: one expert of layer l."""
    counts = [len(e) for e in errors]
    floor = sum(expert_bytes)
    if budget_bytes < floor:
        raise ValueError(f"one expert per layer already takes {floor} bytes, more than the {budget_bytes} asked")

    def growth(layer: int) -> float:
        n = counts[layer]
        return (errors[layer][n - 2] - errors[layer][n - 1]) / expert_bytes[layer]

    while sum(c * b for c, b in zip(counts, expert_bytes)) > budget_bytes:
        layer = min((i for i, c in enumerate(counts) if c > 1), key=growth)
        counts[layer] -= 1
    return counts


def measure_sensitivity(layers: list[MoeLayer], build, progress: bool = False) -> list[list[float]]:
    return [sensitivity(layer, build) for layer in tqdm(layers, desc="sensitivity", unit="layer",
                                                        disable=not progress)]
