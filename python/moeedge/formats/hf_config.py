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
    qkv_bias: bool = False           # q/k/v projections have biases (Qwen2-MoE's qkv_bias)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.bfloat16
    # Aggregated variants (moeedge aggregate): per MoE layer, router output -> stored expert,
    # -1 for an expert pruning dropped. None: the router's indices are the stored experts.
    expert_map: list[list[int]] | None = None


# transformers' default RoPE base of each family when config.json gives none (MixtralConfig.default_theta)
DEFAULT_ROPE_THETA = {"mixtral": 1e6, "qwen2_moe": 10000.0, "olmoe": 10000.0}
# ACT2FN names of SiLU, the only activation the decoder's experts compute
SILU = ("silu", "swish")


def rope_theta(f: Fields, path: Path, default: float) -> float:
    """The RoPE base, read as transformers 5 reads it (RotaryEmbeddingConfigMixin): a non-empty
    rope_scaling replaces rope_parameters; rope_theta in that object, else top-level, else the
    family's default. Only the default RoPE over the whole head is supported: any other
    rope_type or a partial_rotary_factor is refused, not ignored."""
    params, scaling = f.get("rope_parameters", {}), f.get("rope_scaling", {})
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise f.bad(key, value, "must be an object")
    key, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    if any(isinstance(v, dict) for v in rope.values()):
        raise f.bad(key, rope, "per-layer-type RoPE parameters are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{path}: {key} rope_type {shown(rope_type)} is not supported (only the default RoPE)")
    partial = rope.get("partial_rotary_factor", f.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise f.bad("partial_rotary_factor", partial, "partial rotary embeddings are not supported")
    if "rope_theta" in rope:
        return Fields(rope, f"{path}: {key}", f"{path}: {key} lacks").number("rope_theta")
    return f.number("rope_theta", default)


def sliding_window(f: Fields, family: str, n_layers: int) -> int | None:
    """The attention window transformers applies (None: attention over every position).
    Mixtral: sliding_window on every layer; Qwen2-MoE: on the layers layer_types (or
    use_sliding_window and max_window_layers) names sliding; OLMoE: never."""
    if family == "olmoe":  # OlmoeModel builds a plain causal mask whatever sliding_window says
        return None
    if family == "qwen2_moe":
        use = f.flag("use_sliding_window", False)
        types = f.get("layer_types", None)
        if types is None:  # Qwen2MoeConfig.__post_init__: every other layer below max_window_layers
            below = f.get("max_window_layers", 28)
            if isinstance(below, bool) or not isinstance(below, int):
                raise f.bad("max_window_layers", below, "must be an integer")
            types = ["sliding_attention" if i % 2 == 0 and i < below and use else "full_attention"
                     for i in range(n_layers)]
        if not (isinstance(types, list) and len(types) == n_layers
                and all(t in ("full_attention", "sliding_attention") for t in types)):
            raise f.bad("layer_types", types, f"must list {n_layers} of 'full_attention', 'sliding_attention'")
        if "sliding_attention" not in types:
            return None
        if not use:  # Qwen2MoeConfig sets sliding_window to 0 then: a window of nothing
            raise f.bad("use_sliding_window", False, "but layer_types names sliding layers")
    window = f.get("sliding_window", None)
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise f.bad("sliding_window", window, "must be a positive integer or null")
    return window


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
    act = f.get("hidden_act", "silu")
    if act not in SILU:
        raise f.bad("hidden_act", act, f"is not supported; the experts compute SiLU ({', '.join(SILU)})")
    max_position = f.count("max_position_embeddings", MAX_CONTEXT, 4096)
    window = sliding_window(f, family, n_layers)
    if window is not None:
        # moeedge attends to every earlier position. Within the window that is what sliding-window
        # attention computes too, so the context allowed is capped at the window: no position
        # past it is ever attended.
        max_position = min(max_position, window)
    common = dict(family=family, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
                  head_dim=head_dim, vocab=vocab, rms_eps=f.number("rms_norm_eps", 1e-5),
                  rope_theta=rope_theta(f, path, DEFAULT_ROPE_THETA[family]), max_position=max_position,
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
                             norm_topk_prob=f.flag("norm_topk_prob", False), qkv_bias=f.flag("qkv_bias", True),
                             **common)
    if family == "olmoe":
        n_experts, top_k, inter = experts(f, "num_experts", "intermediate_size")
        clip = f.number("clip_qkv") if f.get("clip_qkv", None) is not None else None
        if f.flag("attention_bias", False):  # biases on q, k, v and o: the decoder has none on o
            raise f.bad("attention_bias", True, "attention biases are not supported for olmoe")
        return DecoderConfig(n_experts=n_experts, top_k=top_k, expert_intermediate=inter,
                             moe_layers=list(range(n_layers)), norm_topk_prob=f.flag("norm_topk_prob", False),
                             clip_qkv=clip, **common)
    raise AssertionError(family)
