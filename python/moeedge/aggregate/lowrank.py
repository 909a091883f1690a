"""Shared base plus low-rank deltas (D²-MoE style): per MoE layer one base expert, the
usage-weighted mean of the experts (shares of the router's picks on the calibration text,
as merge weighs them), and per expert and weight a truncated SVD of its difference from
the base at rank r.

r is a continuous memory knob. At min(I, H) the factors hold each difference exactly, so
the variant is the source up to rounding; at 0 every expert is the base, and the layer is
stored as one merged expert (what merging all of them into the base gives). For r > 0 the
base is resident (a dense weight of the variant) and only the factors are expert bytes,
offloaded and fetched; the runtime computes base(x) + b (a x) (moeedge.models.decoder).
The differences are taken from the base as stored (rounded), so the factors also carry
the base's rounding. Shapes: E = experts, I = intermediate, H = hidden, r = rank.
"""
from __future__ import annotations

import torch

from moeedge.aggregate.layer import LowRank, MoeLayer, Variant
from moeedge.aggregate.merge import usage_weights

LEVELS = 32  # ranks tried per layer when a memory target is split by sensitivity


def max_rank(layer: MoeLayer) -> int:
    return min(layer.experts.parts[0].shape[1:])


def base_expert(layer: MoeLayer) -> tuple[torch.Tensor, ...]:
    """(gate, up, down) or (wi, wo): the usage-weighted mean of the layer's experts, rounded as stored."""
    w = usage_weights(layer, list(range(layer.n_experts))).float()
    return tuple(torch.einsum("e,eij->ij", w, t).to(layer.dtype).float() for t in layer.experts.parts)


def decomposition(layer: MoeLayer) -> tuple[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The base, and per weight (gate, up, down or wi, wo) the SVD (U [E, out, m], S [E, m], Vh [E, m, in])
    of every expert's difference from it, m = min(out, in). Kept: every rank is a slice."""
    if "lowrank" not in layer.memo:
        base = base_expert(layer)
        svd = [torch.linalg.svd((t - b).double(), full_matrices=False) for t, b in zip(layer.experts.parts, base)]
        layer.memo["lowrank"] = base, svd
    return layer.memo["lowrank"]


def factors(layer: MoeLayer, rank: int) -> LowRank:
    """The rank-r factors, as stored; sqrt(S) goes to both sides so neither is badly scaled."""
    base, svd = decomposition(layer)
    a, b = [], []
    for u, s, vh in svd:
        root = s[:, :rank].sqrt()
        a.append((root[:, :, None] * vh[:, :rank]).to(layer.dtype).float())
        b.append((u[:, :, :rank] * root[:, None, :]).to(layer.dtype).float())
    return LowRank(base, tuple(a), tuple(b), layer.experts)


def build(layer: MoeLayer, rank: int) -> Variant:
    if rank == 0:
        base, _ = decomposition(layer)
        return Variant([0] * layer.n_experts, layer.experts.like(t[None] for t in base))
    lowrank = factors(layer, rank)
    return Variant(list(range(layer.n_experts)), lowrank.experts(), lowrank)


def levels(layer: MoeLayer) -> list[int]:
    """The ranks a memory target chooses among: 0 to full rank in about LEVELS steps."""
    top = max_rank(layer)
    return sorted(set(range(0, top, max(1, top // LEVELS))) | {top})


def expert_nbytes(layer: MoeLayer, rank: int) -> int:
    """One expert's bytes: its factors (rank 0: the one stored expert, the base)."""
    inter, hidden = layer.experts.parts[0].shape[1:]
    n_parts = len(layer.experts.parts)
    return n_parts * (rank * (inter + hidden) if rank else inter * hidden) * layer.dtype.itemsize


def memory_nbytes(layer: MoeLayer, rank: int) -> tuple[int, int]:
    """(offloadable expert bytes, resident base bytes) of the layer at this rank."""
    if rank == 0:
        return expert_nbytes(layer, 0), 0
    return layer.n_experts * expert_nbytes(layer, rank), expert_nbytes(layer, 0)
