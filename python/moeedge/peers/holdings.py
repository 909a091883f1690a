"""Which experts a peer holds: named (LAYER:E,E,...), or "auto": the most used first, by a
routing trace (moeedge trace) or uniformly, skipping what other peers hold, as many as fit."""
from __future__ import annotations

import numpy as np


def parse_experts(spec: list[str], n_layers: int, n_experts: int) -> dict[int, list[int]]:
    """['0:1,2', '3:0'] -> {0: [1, 2], 3: [0]}; ValueError naming the bad part."""
    held: dict[int, set[int]] = {}
    for part in spec:
        layer_text, sep, experts_text = part.partition(":")
        try:
            layer = int(layer_text)
            experts = [int(e) for e in experts_text.split(",")] if sep else []
        except ValueError:
            raise ValueError(f"--experts {part!r}: expected LAYER:E,E,... (integers)") from None
        if not sep or not experts:
            raise ValueError(f"--experts {part!r}: expected LAYER:E,E,...")
        if not 0 <= layer < n_layers:
            raise ValueError(f"--experts {part!r}: MoE layer {layer} out of range (the model has {n_layers})")
        bad = [e for e in experts if not 0 <= e < n_experts]
        if bad:
            raise ValueError(f"--experts {part!r}: expert {bad[0]} out of range (layers have {n_experts})")
        held.setdefault(layer, set()).update(experts)
    return {layer: sorted(experts) for layer, experts in sorted(held.items())}


def usage(trace_path: str | None, n_layers: int, n_experts: int) -> np.ndarray:
    """[layers, experts] how often each expert was picked in a trace (uniform without one)."""
    if trace_path is None:
        return np.ones((n_layers, n_experts))
    with np.load(trace_path) as trace:
        if "experts" not in trace:
            raise ValueError(f"{trace_path}: not a routing trace (no 'experts'; make one with moeedge trace)")
        picks = trace["experts"]
    if picks.ndim != 3 or picks.shape[1] != n_layers or picks.min() < 0 or picks.max() >= n_experts:
        raise ValueError(f"{trace_path}: a trace of {list(picks.shape)} picks does not fit this model "
                         f"({n_layers} MoE layers of {n_experts} experts)")
    counts = np.zeros((n_layers, n_experts))
    for layer in range(n_layers):
        counts[layer] = np.bincount(picks[:, layer].ravel(), minlength=n_experts)
    return counts


def choose_auto(counts: np.ndarray, taken: set[tuple[int, int]], slot_bytes, budget_bytes: int,
                skip_most_used: int = 0) -> dict[int, list[int]]:
    """The most used experts not in taken whose slots fit budget_bytes together (ties: the
    lower layer, then the lower expert, so that peers started alike agree), after the
    skip_most_used most used of all (those a client caches itself)."""
    ranked = sorted(((layer, e) for layer in range(counts.shape[0]) for e in range(counts.shape[1])),
                    key=lambda k: (-counts[k], k))
    order = [k for k in ranked[skip_most_used:] if k not in taken]
    held: dict[int, list[int]] = {}
    for layer, e in order:
        size = slot_bytes(layer, e)
        if size <= budget_bytes:
            budget_bytes -= size
            held.setdefault(layer, []).append(e)
    return {layer: sorted(experts) for layer, experts in sorted(held.items())}
