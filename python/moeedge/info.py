"""`moeedge info`: what a checkpoint is and the smallest memory budget that runs it."""
from __future__ import annotations

import json
import math

from moeedge._core import ExpertStore
from moeedge.formats.open import open_checkpoint
from moeedge.models.family import plan_for, runner_class
from moeedge.keys import ExpertKey
from moeedge.runtime.embedding import embedding_on_disk
from moeedge.runtime.measure import rss_bytes
from moeedge.units import format_bytes


def facts(source, max_context: int) -> dict:
    """What `moeedge info --json` prints: the checkpoint's shape, sizes and minimum budget."""
    fixed = rss_bytes()
    if max_context < 1:
        raise ValueError(f"--max-context must be positive, got {max_context}")
    ckpt = open_checkpoint(source)
    cfg = ckpt.config
    dtype = runner_class(cfg).compute_dtype(ckpt)
    store = ExpertStore(ckpt.files, ckpt.expert_ranges)
    max_context = min(max_context, cfg.max_position)
    plan = plan_for(ckpt, store, 1 << 62, fixed, max_context, dtype, embedding_on_disk(ckpt))
    # per stored expert: aggregated variants store fewer than the router's E per layer
    expert_params = sum(math.prod(p.shape) for key in ckpt.expert_ranges
                        for p in ckpt.parts_of(*ExpertKey.unpack(key)))
    return {
        "source": ckpt.source,
        "architecture": cfg.family,
        # Switch: encoder and decoder blocks; its moe_layers is already a count
        "layers": getattr(cfg, "n_layers", None) or cfg.n_encoder_layers + cfg.n_decoder_layers,
        "moe_layers": cfg.moe_layers if isinstance(cfg.moe_layers, int) else len(cfg.moe_layers),
        "experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "hidden": cfg.hidden,
        "vocab": cfg.vocab,
        "dtype": ckpt.expert_parts[0][0].quant or str(ckpt.expert_parts[0][0].dtype).removeprefix("torch."),
        "params": ckpt.dense_numel + expert_params,
        "expert_params": expert_params,
        "expert_bytes": ckpt.expert_nbytes,
        "dense_bytes": plan.dense_bytes,
        "kv_cache_bytes": plan.kv_cache_bytes,
        "buffer_bytes": plan.buffer_bytes,
        "fixed_bytes": plan.fixed_bytes,
        "max_context": max_context,
        "min_budget_bytes": plan.min_budget_bytes,
        "files": ckpt.files,
    }


def describe(source, max_context: int, json_out: bool = False) -> str:
    f = facts(source, max_context)
    if json_out:
        return json.dumps(f)
    return "\n".join([
        f"{f['source']}",
        f"  architecture   {f['architecture']}, {f['layers']} layers ({f['moe_layers']} MoE), "
        f"{f['experts']} experts, top-{f['top_k']}, hidden {f['hidden']}, vocab {f['vocab']}, {f['dtype']}",
        f"  parameters     {f['params'] / 1e6:.1f}M ({f['expert_params'] / 1e6:.1f}M in experts)",
        f"  expert bytes   {format_bytes(f['expert_bytes'])}",
        f"  dense bytes    {format_bytes(f['dense_bytes'])}",
        f"  KV cache       {format_bytes(f['kv_cache_bytes'])} for {f['max_context']} tokens",
        f"  buffers        {format_bytes(f['buffer_bytes'])} (one decode step's activations, allocator headroom)",
        f"  fixed cost     {format_bytes(f['fixed_bytes'])} (this process: Python, torch, libraries)",
        f"  minimum budget {format_bytes(f['min_budget_bytes'])} ({f['min_budget_bytes']} bytes)",
    ])
