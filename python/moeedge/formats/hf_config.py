"""config.json of a Hugging Face decoder MoE checkpoint, as the hub has it (transformers 4.x:
`rope_theta`, `torch_dtype`) or as transformers 5.x writes it (`rope_parameters`, `dtype`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeedge.formats.config_fields import (MAX_CONTEXT, MAX_EXPERTS, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS,
                                           MAX_VOCAB, MAX_WIDTH, Fields)
from moeedge.formats.errors import CheckpointError, shown

DECODER_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")


@dataclass
class DecoderConfig:
    """A decoder-only MoE: Mixtral, Qwen2-MoE (shared expert) or OLMoE (q/k norms)."""

    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_experts: int
    top_k: int
    expert_intermediate: int
    moe_layers: list[int]            # decoder layers whose FFN is sparse, in order
    dense_intermediate: int = 0      # FFN of the other layers (Qwen2-MoE mlp_only_layers)
    shared_expert_intermediate: int = 0
    norm_topk_prob: bool = True
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 4096
    tie_embeddings: bool = False
    clip_qkv: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.bfloat16
    # Aggregated variants (moeedge aggregate): per MoE layer, router output -> stored expert,
    # -1 for an expert pruning dropped. None: the router's indices are the stored experts.
    expert_map: list[list[int]] | None = None


def rope_theta(f: Fields, path: Path) -> float:
    """The RoPE base; only the default RoPE is supported (no scaling)."""
    params, scaling = f.get("rope_parameters", {}), f.get("rope_scaling", {})
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise f.bad(key, value, "must be an object")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{path}: RoPE scaling {shown(rope_type)} is not supported (only the default RoPE)")
    if "rope_theta" in params:
        return Fields(params, f"{path}: rope_parameters", f"{path}: rope_parameters lacks").number("rope_theta")
    return f.number("rope_theta", 10000.0)


def attention_shape(f: Fields) -> tuple[int, int, int, int]:
    """(hidden, heads, kv heads, head dim), each checked and consistent."""
    hidden = f.count("hidden_size", MAX_WIDTH)
    n_heads = f.count("num_attention_heads", MAX_HEADS)
    n_kv = f.count("num_key_value_heads", n_heads, default=n_heads)
    if n_heads % n_kv:
        raise f.bad("num_key_value_heads", n_kv, f"must divide num_attention_heads ({n_heads})")
    if f.get("head_dim", None) is None and hidden < n_heads:
        raise f.bad("hidden_size", hidden, f"is smaller than num_attention_heads ({n_heads}) and no head_dim is given")
    head_dim = f.count("head_dim", MAX_HEAD_DIM, default=hidden // n_heads)
    if head_dim % 2:
        raise f.bad("head_dim", head_dim, "must be even (rotary embeddings turn pairs of values)")
    return hidden, n_heads, n_kv, head_dim


def experts(f: Fields, count_key: str, width_key: str) -> tuple[int, int, int]:
    """(experts, top-k, expert FFN width)."""
    f.require(count_key, "num_experts_per_tok", width_key)
    n_experts = f.count(count_key, MAX_EXPERTS)
    top_k = f.count("num_experts_per_tok", MAX_EXPERTS)
    if top_k > n_experts:
        raise f.bad("num_experts_per_tok", top_k, f"exceeds the number of experts ({count_key} = {n_experts})")
    return n_experts, top_k, f.count(width_key, MAX_WIDTH)


def qwen_moe_layers(f: Fields, n_layers: int) -> list[int]:
    """Qwen2-MoE's sparse layers: every decoder_sparse_step-th, less mlp_only_layers."""
    step = f.count("decoder_sparse_step", MAX_LAYERS, default=1)
    dense_only = f.get("mlp_only_layers", [])
    if not (isinstance(dense_only, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                 and 0 <= i < n_layers for i in dense_only)):
        raise f.bad("mlp_only_layers", dense_only, f"must list layers, each 0 to {n_layers - 1}")
    dense_only = set(dense_only)
    layers = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
    if not layers:
        raise CheckpointError(f"{f.where} no MoE layers (decoder_sparse_step = {step}, mlp_only_layers = "
                              f"{shown(sorted(dense_only))}); nothing to offload")
    return layers


def decoder_config(raw: dict, path: Path) -> DecoderConfig:
    """config.json of a decoder family, every value checked before anything is sized by it."""
    family = raw["model_type"]
    f = Fields(raw, f"{path}:", f"{path}: config.json lacks")
    f.require("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    n_layers = f.count("num_hidden_layers", MAX_LAYERS)
    vocab = f.count("vocab_size", MAX_VOCAB)
    hidden, n_heads, n_kv, head_dim = attention_shape(f)
    common = dict(family=family, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
                  head_dim=head_dim, vocab=vocab, rms_eps=f.number("rms_norm_eps", 1e-5),
                  rope_theta=rope_theta(f, path), max_position=f.count("max_position_embeddings", MAX_CONTEXT, 4096),
                  tie_embeddings=f.flag("tie_word_embeddings", False), bos_token_id=f.token_id("bos_token_id", vocab),
                  eos_token_ids=f.token_ids("eos_token_id", vocab), dtype=f.dtype())
    if family == "mixtral":
        n_experts, top_k, inter = experts(f, "num_local_experts", "intermediate_size")
        return DecoderConfig(n_experts=n_experts, top_k=top_k, expert_intermediate=inter,
                             moe_layers=list(range(n_layers)), norm_topk_prob=True, **common)
    if family == "qwen2_moe":
        n_experts, top_k, inter = experts(f, "num_experts", "moe_intermediate_size")
        return DecoderConfig(n_experts=n_experts, top_k=top_k, expert_intermediate=inter,
                             moe_layers=qwen_moe_layers(f, n_layers),
                             dense_intermediate=f.count("intermediate_size", MAX_WIDTH, 0, minimum=0),
                             shared_expert_intermediate=f.count("shared_expert_intermediate_size", MAX_WIDTH, 0,
                                                                minimum=0),
                             norm_topk_prob=f.flag("norm_topk_prob", False), **common)
    if family == "olmoe":
        n_experts, top_k, inter = experts(f, "num_experts", "intermediate_size")
        clip = f.number("clip_qkv") if f.get("clip_qkv", None) is not None else None
        return DecoderConfig(n_experts=n_experts, top_k=top_k, expert_intermediate=inter,
                             moe_layers=list(range(n_layers)), norm_topk_prob=f.flag("norm_topk_prob", False),
                             clip_qkv=clip, **common)
    raise AssertionError(family)
