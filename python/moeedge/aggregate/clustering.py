"""The merge tree of a layer's experts (HC-SMoE): each expert is represented by its average
output on the calibration states, and experts are joined bottom-up with average linkage on
Euclidean distance. The whole tree is kept, so every granularity from E experts down to 1
is one cut away: the first E - n joins give n clusters."""
from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import linkage

from moeedge.aggregate.layer import MoeLayer, Variant


def merge_tree(layer: MoeLayer) -> np.ndarray:
    """[E-1, 4] scipy linkage: row j joins clusters a and b (ids >= E name earlier rows) at a distance."""
    if "tree" not in layer.memo:
        points = layer.mean_outputs.double().numpy()   # [E, H]
        layer.memo["tree"] = linkage(points, method="average", metric="euclidean")
    return layer.memo["tree"]


def cut(tree: np.ndarray, n_experts: int, n_clusters: int) -> list[list[int]]:
    """The n_clusters clusters after the first n_experts - n_clusters joins, each a sorted
    list of experts, ordered by their first expert."""
    if not 1 <= n_clusters <= n_experts:
        raise ValueError(f"cannot cut {n_experts} experts into {n_clusters} clusters")
    members = {e: [e] for e in range(n_experts)}
    for j, (a, b) in enumerate(tree[:n_experts - n_clusters, :2].astype(int)):
        members[n_experts + j] = members.pop(a) + members.pop(b)
    return sorted(sorted(m) for m in members.values())


def table_of(clusters: list[list[int]], n_experts: int) -> list[int]:
    """Router output -> the index of its cluster."""
    table = [0] * n_experts
    for c, cluster in enumerate(clusters):
        for e in cluster:
            table[e] = c
    return table


def clustered_variant(layer: MoeLayer, n: int, combine) -> Variant:
    """The layer with its experts cut into n clusters, each stored as combine(layer, members)
    -> its parts (gate, up, down or wi, wo); a cluster of one keeps its expert as it is."""
    clusters = cut(merge_tree(layer), layer.n_experts, n)
    src = layer.experts
    stored = [tuple(t[c[0]] for t in src.parts) if len(c) == 1 else combine(layer, c) for c in clusters]
    return Variant(table_of(clusters, layer.n_experts), layer.rounded(src.stacked(stored)))
