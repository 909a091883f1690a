"""The representations of one MoE layer a ladder holds, built with the project's own
quantization (moeedge.formats.group_quant, moeedge.quantize.bits) and aggregation
(moeedge.aggregate: lowrank, merge) code, each with its bytes and its measured cost:
the layer's relative output error on the calibration states
(moeedge.aggregate.layer.MoeLayer.relative_error).

Loadable variants (written as files the runtime reads, moeedge.ladder.compose): "int8",
"int4" (group-wise, groups of GROUP) and "bits6" (per expert 8 or 4 bits, the most
sensitive half at 8, as `moeedge quantize --per-expert-bits auto` chooses them, within
the layer). Measured only (bytes and error, no file): low-rank ranks and merged
granularities; the runtime reads those as whole `moeedge aggregate` checkpoints, and a
per-layer plan cannot mix them in yet. "stored" is the source as it is (variant id 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moeedge.aggregate import lowrank, merge
from moeedge.aggregate.layer import MoeLayer, Variant
from moeedge.formats.group_quant import dequantize, quantize
from moeedge.formats.quant_checkpoint import expert_matrices
from moeedge.quantize import bits as quantize_bits

GROUP = 64
# Stable ids: the id is part of each expert's cache key (moeedge.keys.VariantKey).
LOADABLE = {"stored": 0, "int8": 1, "int4": 2, "bits6": 3}
MIXED_TARGET_BITS = 6.0
ROLES = ("gate", "up", "down")


@dataclass
class Built:
    name: str
    expert_bytes: list[int]               # per expert, as the cache reads it
    error: float                          # the layer's relative output error
    bits: list[int] | None = None         # per expert, quantized variants
    tensors: dict[str, torch.Tensor] | None = None  # what the file holds (loadable variants)
    resident_bytes: int = 0               # a low-rank layer's base
    stored_experts: int = 0               # merged: experts kept

    def describe(self) -> dict:
        return {"id": LOADABLE.get(self.name), "loadable": self.name in LOADABLE,
                "expert_bytes": self.expert_bytes, "bytes": sum(self.expert_bytes) + self.resident_bytes,
                "resident_bytes": self.resident_bytes, "error": self.error, "bits": self.bits,
                **({"stored_experts": self.stored_experts} if self.stored_experts else {})}


def expert_dicts(layer: MoeLayer) -> list[dict[str, torch.Tensor]]:
    return [dict(zip(ROLES, (t[e] for t in layer.experts.parts))) for e in range(layer.n_experts)]


def quantized(cfg, layer: MoeLayer, name: str, bits: list[int]) -> Built:
    """The layer's experts at these bits each: the file's tensors, bytes and error."""
    tensors, sizes, rounded = {}, [], []
    for e, w in enumerate(expert_dicts(layer)):
        nbytes, back = 0, []
        for role, base, _ in expert_matrices(cfg, layer.index, e):
            q, s = quantize(w[role], bits[e], GROUP)
            tensors[base + ".qweight"], tensors[base + ".scales"] = q, s
            nbytes += q.numel() * q.element_size() + s.numel() * s.element_size()
            back.append(dequantize(q, s, bits[e], GROUP))
        sizes.append(nbytes)
        rounded.append(tuple(back))
    variant = Variant(list(range(layer.n_experts)), layer.experts.stacked(rounded))
    return Built(name, sizes, layer.relative_error(variant), bits, tensors)


def mixed_bits(layer: MoeLayer, routing: quantize_bits.LayerCalibration) -> list[int]:
    """8 bits for the layer's most sensitive experts, the average MIXED_TARGET_BITS."""
    sensitivity = quantize_bits.layer_sensitivity(routing, expert_dicts(layer), GROUP)
    return quantize_bits.choose_bits([sensitivity], MIXED_TARGET_BITS)[0]


def lowrank_variant(layer: MoeLayer, rank: int) -> Built:
    offloaded, base = lowrank.memory_nbytes(layer, rank)
    error = layer.relative_error(lowrank.build(layer, rank))
    return Built(f"lowrank_r{rank}", [offloaded // layer.n_experts] * layer.n_experts, error, resident_bytes=base)


def merged_variant(layer: MoeLayer, n: int, expert_bytes: int) -> Built:
    return Built(f"merge_{n}", [expert_bytes] * n, layer.relative_error(merge.build(layer, n)), stored_experts=n)


def build_layer(cfg, layer: MoeLayer, routing: quantize_bits.LayerCalibration, ranks: list[int],
                merge_counts: list[int], expert_bytes: int) -> list[Built]:
    """Every variant of the layer but "stored" (which needs no building)."""
    n = layer.n_experts
    out = [quantized(cfg, layer, "int8", [8] * n), quantized(cfg, layer, "int4", [4] * n),
           quantized(cfg, layer, "bits6", mixed_bits(layer, routing))]
    out += [lowrank_variant(layer, r) for r in ranks if 0 < r < lowrank.max_rank(layer)]
    out += [merged_variant(layer, m, expert_bytes) for m in merge_counts if 1 <= m < n]
    return out
