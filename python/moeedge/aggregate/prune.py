"""Pruning (NAEE-style baseline): keep the n experts the router picked most often on the
calibration text (ties: the larger gate mass, then the lower index) and drop the rest.

A dropped expert leaves the router, as NAEE removes it: its logit is masked before the
softmax, so each token's top-k is taken over the kept experts and every token still gets
k experts (fewer only when fewer than k are kept). The alternative, renormalising over
whichever of the original top-k survive, would run some tokens on one expert or none.
"""
from __future__ import annotations

from moeedge.aggregate.layer import MoeLayer, Variant


def build(layer: MoeLayer, n: int) -> Variant:
    cal = layer.calibration
    ranked = sorted(range(layer.n_experts), key=lambda e: (-int(cal.counts[e]), -float(cal.gate_mass[e]), e))
    kept = sorted(ranked[:n])
    table = [-1] * layer.n_experts
    for stored, e in enumerate(kept):
        table[e] = stored
    return Variant(table, layer.experts.select(kept))
