"""Plain averaging (baseline): the same clusters as `merge`, each stored as the unweighted
mean of its members' weights as they are, neurons unaligned."""
from __future__ import annotations

import torch

from moeedge.aggregate.clustering import clustered_variant
from moeedge.aggregate.layer import MoeLayer, Variant


def mean_cluster(layer: MoeLayer, members: list[int]) -> tuple[torch.Tensor, ...]:
    return tuple(t.mean(0) for t in layer.experts.select(members).parts)


def build(layer: MoeLayer, n: int) -> Variant:
    return clustered_variant(layer, n, mean_cluster)
