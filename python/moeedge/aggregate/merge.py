"""Merging (HC-SMoE clusters, M-SMoE-style merging): in each cluster of the merge tree, the
most-used expert is the representative; every other member's intermediate neurons are
first permuted to line up with the representative's (the Hungarian method on weight
similarity), then the members are averaged with weights proportional to how often the
router picked them on the calibration text.

Permuting rows of gate/up (Switch: wi) and the matching columns of down (wo) together
leaves an expert's function unchanged (silu(x G^T) * (x U^T), or relu(x Wi^T), is
elementwise over neurons, and D sums over them): it only decides which neurons get
averaged together. Shapes: I = intermediate, H = hidden.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from scipy.optimize import linear_sum_assignment

from moeedge.aggregate.clustering import clustered_variant, cut, merge_tree
from moeedge.aggregate.layer import ExpertSet, MoeLayer, Variant


def alignment(experts: ExpertSet, rep: int, member: int) -> torch.Tensor:
    """[I] perm: member's neuron perm[i] best matches rep's neuron i, maximising the summed
    dot products of their input rows (gate and up, or wi) and output columns (down, wo)."""
    *ins, down = experts.parts
    sim = sum(t[rep] @ t[member].T for t in ins) + down[rep].T @ down[member]   # [I, I]
    _, cols = linear_sum_assignment(sim.double().numpy(), maximize=True)
    return torch.from_numpy(cols)


def permuted(experts: ExpertSet, e: int, perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Expert e's parts with its intermediate neurons reordered: the same function."""
    *ins, down = experts.parts
    return (*(t[e][perm] for t in ins), down[e][:, perm])


def usage_weights(layer: MoeLayer, members: list[int]) -> torch.Tensor:
    """[M] each member's share of the cluster's router picks (equal shares if none was picked)."""
    counts = layer.calibration.counts[members].double()
    return counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / len(members))


def representative(layer: MoeLayer, members: list[int]) -> int:
    return members[int(usage_weights(layer, members).argmax())]


def merge_cluster(layer: MoeLayer, members: list[int]) -> tuple[torch.Tensor, ...]:
    weights = usage_weights(layer, members)
    rep = representative(layer, members)
    merged = [torch.zeros_like(t[0]) for t in layer.experts.parts]
    for m, w in zip(members, weights.tolist()):
        key = ("align", rep, m)
        if m != rep and key not in layer.memo:
            layer.memo[key] = alignment(layer.experts, rep, m)
        perm = layer.memo[key] if m != rep else torch.arange(layer.experts.parts[0].shape[1])
        for acc, part in zip(merged, permuted(layer.experts, m, perm)):
            acc.add_(part, alpha=w)
    return tuple(merged)


def build(layer: MoeLayer, n: int) -> Variant:
    # The alignments first, one per thread: scipy's Hungarian method releases the GIL, and
    # on Switch-Base-128 (90 of 3,072 x 3,072 per layer) it was three quarters of merging.
    pairs = [(rep, m) for c in cut(merge_tree(layer), layer.n_experts, n) if len(c) > 1
             for rep in [representative(layer, c)] for m in c if m != rep and ("align", rep, m) not in layer.memo]
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for (rep, m), perm in zip(pairs, pool.map(lambda pair: alignment(layer.experts, *pair), pairs)):
            layer.memo[("align", rep, m)] = perm
    return clustered_variant(layer, n, merge_cluster)
