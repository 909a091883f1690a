"""config.json of a Hugging Face MoE checkpoint, as the hub has it (transformers 4.x:
`rope_theta`, `torch_dtype`) or as transformers 5.x writes it (`rope_parameters`, `dtype`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeedge.formats.errors import CheckpointError

DECODER_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
SUPPORTED = DECODER_FAMILIES + ("switch_transformers",)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def _rope_theta(raw: dict, path: Path) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{path}: RoPE scaling {rope_type!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _dtype(raw: dict) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    return _DTYPES.get(str(name).replace("torch.", ""), torch.bfloat16)


def _eos(raw: dict) -> list[int]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [int(eos)]


def _require(raw: dict, path: Path, *keys: str):
    missing = [k for k in keys if raw.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: config.json lacks {', '.join(missing)}")
    return [raw[k] for k in keys]


def decoder_config(raw: dict, path: Path) -> DecoderConfig:
    family = raw["model_type"]
    n_layers, hidden, n_heads, vocab = _require(raw, path, "num_hidden_layers", "hidden_size",
                                                "num_attention_heads", "vocab_size")
    n_kv = raw.get("num_key_value_heads") or n_heads
    head_dim = raw.get("head_dim") or hidden // n_heads
    common = dict(family=family, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
                  head_dim=head_dim, vocab=vocab, rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
                  rope_theta=_rope_theta(raw, path), max_position=int(raw.get("max_position_embeddings", 4096)),
                  tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                  bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos(raw), dtype=_dtype(raw))
    if family == "mixtral":
        n_experts, top_k, inter = _require(raw, path, "num_local_experts", "num_experts_per_tok", "intermediate_size")
        return DecoderConfig(n_experts=n_experts, top_k=top_k, expert_intermediate=inter,
                             moe_layers=list(range(n_layers)), norm_topk_prob=True, **common)
    if family == "qwen2_moe":
        n_experts, top_k, inter = _require(raw, path, "num_experts", "num_experts_per_tok", "moe_intermediate_size")
        step = raw.get("decoder_sparse_step", 1) or 1
        dense_only = set(raw.get("mlp_only_layers") or [])
        moe_layers = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
        return DecoderConfig(n_experts=n_experts, top_k=top_k, expert_intermediate=inter, moe_layers=moe_layers,
                             dense_intermediate=int(raw.get("intermediate_size", 0)),
                             shared_expert_intermediate=int(raw.get("shared_expert_intermediate_size", 0)),
                             norm_topk_prob=bool(raw.get("norm_topk_prob", False)), **common)
    if family == "olmoe":
        n_experts, top_k, inter = _require(raw, path, "num_experts", "num_experts_per_tok", "intermediate_size")
        return DecoderConfig(n_experts=n_experts, top_k=top_k, expert_intermediate=inter,
                             moe_layers=list(range(n_layers)), norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                             clip_qkv=raw.get("clip_qkv"), **common)
    raise AssertionError(family)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (a Hugging Face checkpoint directory has one)")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED)}")
    return raw
