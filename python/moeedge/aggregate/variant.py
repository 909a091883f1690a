"""The variant directory: a Hugging Face checkpoint that `moeedge.load` reads.

- config.json: the source's, unchanged (the router keeps its E outputs);
- model.safetensors: the source's dense tensors and, per MoE layer, its n stored experts
  under the family's usual names (`...experts.{0..n-1}.w1.weight`; Switch:
  `...mlp.experts.expert_{0..n-1}.wi.weight`, moeedge.formats.switch_checkpoint), in the
  source's dtype;
  a low-rank layer stores its base as `...experts.base.w1.weight` (resident: not an expert
  tensor) and each expert's factors as `...experts.{e}.w1.lora_A.weight` / `lora_B`
  (moeedge.formats.hf_checkpoint.expert_tensor_names);
- the tokenizer files, copied;
- moeedge_variant.json: `expert_map` (per MoE layer, router output -> stored expert, -1:
  dropped; moeedge.formats.hf_checkpoint reads it), `expert_counts`, the method, source,
  targets, calibration, bytes, and the measured quality.

The directory is assembled beside OUT and renamed into place when complete. The variant's
tensors (not the source's experts) are held in memory while the file is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeedge.aggregate.layer import Variant
from moeedge.derived import publish
from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats import switch_checkpoint
from moeedge.formats.hf_checkpoint import VARIANT_FILE, expert_tensor_names
from moeedge.formats.switch_checkpoint import SwitchConfig

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


def write(out: Path, ckpt: Checkpoint, layers: list, meta: dict) -> None:
    """layers: per MoE layer, its stored tensors (by name, as stored), `count` and `table`
    (moeedge.aggregate.pipeline.BuiltLayer)."""
    tensors = {name: ckpt.read_dense(name) for name in ckpt.dense_names}
    for layer in layers:
        tensors.update(layer.tensors)
    with publish(out, ckpt) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, **meta, "expert_counts": [layer.count for layer in layers],
                "expert_map": [layer.table for layer in layers]}
        (staging / VARIANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def update(out: Path, **fields) -> dict:
    """Add fields (the measured quality) to a written variant's description."""
    path = out / VARIANT_FILE
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta
