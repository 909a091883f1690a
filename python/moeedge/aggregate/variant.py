"""The variant directory: a Hugging Face checkpoint that `moeedge.load` reads.

- config.json: the source's, unchanged (the router keeps its E outputs);
- model-NNNNN-of-MMMMM.safetensors and model.safetensors.index.json: the source's dense
  tensors in the first shard, then one shard per MoE layer, written as the layer is built,
  holding its n stored experts under the family's usual names (`...experts.{0..n-1}.w1.weight`;
  Switch: `...mlp.experts.expert_{0..n-1}.wi.weight`, moeedge.formats.switch_checkpoint), in
  the source's dtype;
  a low-rank layer stores its base as `...experts.base.w1.weight` (resident: not an expert
  tensor) and each expert's factors as `...experts.{e}.w1.lora_A.weight` / `lora_B`
  (moeedge.formats.decoder_tensors.expert_tensor_names);
- the tokenizer files, copied;
- moeedge_variant.json: `expert_map` (per MoE layer, router output -> stored expert, -1:
  dropped; moeedge.formats.variant_map reads it), `expert_counts`, the method, source,
  targets, calibration, bytes, and the measured quality.

The directory is assembled beside OUT and renamed into place when complete. Only one
layer's tensors are in memory at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeedge.aggregate.layer import Variant
from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats import switch_checkpoint
from moeedge.formats.decoder_tensors import expert_tensor_names
from moeedge.formats.switch_config import SwitchConfig
from moeedge.formats.variant_map import VARIANT_FILE

FORMAT_VERSION = 1


def stored_tensors(ckpt: Checkpoint, moe_layer: int, v: Variant) -> dict[str, torch.Tensor]:
    """A layer's stored experts (and base) by tensor name, fp32."""
    cfg = ckpt.config
    names = switch_checkpoint.expert_tensor_names if isinstance(cfg, SwitchConfig) else expert_tensor_names
    if v.lowrank is None:
        return {name: t[e] for e in range(len(v.experts))
                for (_, name), t in zip(names(cfg, moe_layer, e), v.experts.parts)}
    lr = v.lowrank
    out = {name: t for (_, name), t in zip(names(cfg, moe_layer, "base"), lr.base)}
    for e in range(len(v.experts)):
        parts = [t[e] for a, b in zip(lr.a, lr.b) for t in (a, b)]  # gate_a, gate_b, up_a, ... (wi_a, wi_b, ...)
        out.update((name, t) for (_, name), t in zip(names(cfg, moe_layer, e, lowrank=True), parts))
    return out


class ShardWriter:
    """A checkpoint's safetensors shards written one at a time, then their index."""

    def __init__(self, directory: Path, count: int):
        self.directory, self.count = directory, count
        self.weight_map: dict[str, str] = {}
        self.total = self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.written == self.count:
            raise ValueError(f"all {self.count} shards are written already")
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.count:05d}.safetensors"
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        if self.written != self.count:
            raise ValueError(f"{self.written} of {self.count} shards written")
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def write_dense(shards: ShardWriter, ckpt: Checkpoint) -> None:
    shards.write({name: ckpt.read_dense(name) for name in ckpt.dense_names})


def write_meta(directory: Path, layers: list, meta: dict) -> None:
    """layers: per MoE layer, its `count` of stored experts and `table` (pipeline.BuiltLayer)."""
    meta = {"format_version": FORMAT_VERSION, **meta, "expert_counts": [layer.count for layer in layers],
            "expert_map": [layer.table for layer in layers]}
    (directory / VARIANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def update(out: Path, **fields) -> dict:
    """Add fields (the measured quality) to a written variant's description."""
    path = out / VARIANT_FILE
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta
