"""Switch Transformers (encoder-decoder, top-1 routing) checkpoints as transformers 5.x
save_pretrained writes them: `{encoder,decoder}.block.B.layer.L.mlp.experts.expert_E.wi/wo`
with L = 1 in the encoder and 2 in the decoder (after cross-attention).

Aggregated variants (`moeedge aggregate`) are read as the decoder's are
(moeedge.formats.hf_checkpoint): moeedge_variant.json's `expert_map` maps router outputs
to the n stored experts `expert_0..expert_{n-1}`; a low-rank layer keeps its base as the
dense `...mlp.experts.base.wi/wo.weight` and each expert's factors as
`...expert_E.wi.lora_A.weight` / `lora_B`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.errors import CheckpointError
from moeedge.formats.hf_checkpoint import (LOWRANK_FACTORS, TOKENIZER_FILES, _tensor_table, expert_table,
                                           lowrank_rank, read_variant_map, shard_files)
from moeedge.formats.hf_config import _dtype, _eos, _require
from moeedge.formats.safetensors_file import TensorInfo, read_tensor

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
ROUTER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative positions have no hard limit: past max_distance they share the last bucket.
MAX_POSITION = 1 << 20
SPIECE = "spiece.model"  # T5's sentencepiece file, read as a tokenizer.model


@dataclass
class SwitchConfig:
    """An encoder-decoder Switch Transformer. MoE layers are numbered in execution
    order: the encoder's sparse blocks, then the decoder's."""

    n_encoder_layers: int
    n_decoder_layers: int
    hidden: int                      # d_model
    n_heads: int
    head_dim: int                    # d_kv
    ff: int                          # d_ff, of dense blocks and of every expert
    vocab: int
    n_experts: int
    expert_capacity: int             # tokens an expert takes per forward call, in sequence order
    encoder_moe_blocks: list[int]    # encoder blocks whose feed-forward is sparse
    decoder_moe_blocks: list[int]
    top_k: int = 1
    rel_buckets: int = 32
    rel_max_distance: int = 128
    eps: float = 1e-6
    act: str = "relu"
    router_bias: bool = False
    router_dtype: torch.dtype = torch.float32
    tie_embeddings: bool = True      # shared embedding as lm_head, output scaled by hidden ** -0.5
    decoder_start_token_id: int = 0
    pad_token_id: int | None = 0
    eos_token_ids: list[int] = field(default_factory=list)
    max_position: int = MAX_POSITION
    dtype: torch.dtype = torch.float32
    family: str = "switch_transformers"
    # Aggregated variants: per MoE layer, router output -> stored expert, -1: dropped (pruned).
    expert_map: list[list[int]] | None = None

    # The names the memory planner shares with DecoderConfig.
    @property
    def moe_layers(self) -> int:
        return len(self.encoder_moe_blocks) + len(self.decoder_moe_blocks)

    @property
    def expert_intermediate(self) -> int:
        return self.ff

    @property
    def dense_intermediate(self) -> int:
        return self.ff

    @property
    def shared_expert_intermediate(self) -> int:
        return 0

    @property
    def inner(self) -> int:
        return self.n_heads * self.head_dim

    def moe_blocks(self) -> list[tuple[str, int]]:
        """(stack, block) of each MoE layer, in MoE-layer order."""
        return [("encoder", b) for b in self.encoder_moe_blocks] + [("decoder", b) for b in self.decoder_moe_blocks]


def sparse_blocks(n_layers: int, n_sparse: int) -> list[int]:
    """The blocks transformers makes sparse (SwitchTransformersConfig.__post_init__ and
    SwitchTransformersStack): every `step`-th block from block 1, or all when step is 1."""
    step = n_layers // n_sparse if n_sparse > 0 else n_layers
    if step <= 0:
        return []
    return [i for i in range(n_layers) if i % step == 1 or step == 1]


def switch_config(raw: dict, path: Path) -> SwitchConfig:
    d_model, d_kv, d_ff, n_heads, vocab, n_layers, n_experts, capacity = _require(
        raw, path, "d_model", "d_kv", "d_ff", "num_heads", "vocab_size", "num_layers", "num_experts", "expert_capacity")
    n_dec = raw.get("num_decoder_layers") or n_layers
    act = raw.get("dense_act_fn", "relu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: dense_act_fn {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    router_dtype = ROUTER_DTYPES.get(str(raw.get("router_dtype", "float32")))
    if router_dtype is None:
        raise CheckpointError(f"{path}: router_dtype {raw.get('router_dtype')!r} is not supported; "
                              f"supported: {', '.join(ROUTER_DTYPES)}")
    if capacity < 1:
        raise CheckpointError(f"{path}: expert_capacity must be at least 1, got {capacity}")
    pad = raw.get("pad_token_id", 0)
    start = raw.get("decoder_start_token_id")
    return SwitchConfig(
        n_encoder_layers=n_layers, n_decoder_layers=n_dec, hidden=d_model, n_heads=n_heads, head_dim=d_kv, ff=d_ff,
        vocab=vocab, n_experts=n_experts, expert_capacity=capacity,
        # transformers' defaults for the sparse counts are 3 each
        encoder_moe_blocks=sparse_blocks(n_layers, raw.get("num_sparse_encoder_layers", 3)),
        decoder_moe_blocks=sparse_blocks(n_dec, raw.get("num_sparse_decoder_layers", 3)),
        rel_buckets=int(raw.get("relative_attention_num_buckets", 32)),
        rel_max_distance=int(raw.get("relative_attention_max_distance", 128)),
        eps=float(raw.get("layer_norm_epsilon", 1e-6)), act=act, router_bias=bool(raw.get("router_bias", False)),
        router_dtype=router_dtype, tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        decoder_start_token_id=int(start if start is not None else (pad or 0)), pad_token_id=pad,
        eos_token_ids=_eos({"eos_token_id": raw.get("eos_token_id", 1)}), dtype=_dtype(raw))


def _block_prefix(stack: str, block: int) -> str:
    return f"{stack}.block.{block}.layer."


def ff_prefix(stack: str, block: int) -> str:
    """The feed-forward sublayer: layer.1 in the encoder, layer.2 in the decoder."""
    return _block_prefix(stack, block) + ("1." if stack == "encoder" else "2.")


def expected_dense(cfg: SwitchConfig) -> dict[str, tuple[int, ...]]:
    """Every dense tensor the runner reads, with its shape."""
    d, inner, ff = cfg.hidden, cfg.inner, cfg.ff
    attn = {"q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner)}
    shapes: dict[str, tuple[int, ...]] = {}
    for stack, n, moe in (("encoder", cfg.n_encoder_layers, cfg.encoder_moe_blocks),
                          ("decoder", cfg.n_decoder_layers, cfg.decoder_moe_blocks)):
        for b in range(n):
            p = _block_prefix(stack, b)
            shapes[p + "0.layer_norm.weight"] = (d,)
            shapes.update({f"{p}0.SelfAttention.{m}.weight": s for m, s in attn.items()})
            if b == 0:
                shapes[p + "0.SelfAttention.relative_attention_bias.weight"] = (cfg.rel_buckets, cfg.n_heads)
            if stack == "decoder":
                shapes[p + "1.layer_norm.weight"] = (d,)
                shapes.update({f"{p}1.EncDecAttention.{m}.weight": s for m, s in attn.items()})
            f = ff_prefix(stack, b)
            shapes[f + "layer_norm.weight"] = (d,)
            if b in moe:
                shapes[f + "mlp.router.classifier.weight"] = (cfg.n_experts, d)
                if cfg.router_bias:
                    shapes[f + "mlp.router.classifier.bias"] = (cfg.n_experts,)
            else:
                shapes[f + "mlp.wi.weight"] = (ff, d)
                shapes[f + "mlp.wo.weight"] = (d, ff)
        shapes[f"{stack}.final_layer_norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab, d)
    return shapes


def _check_dense(cfg: SwitchConfig, tensors: dict[str, TensorInfo], source: str) -> None:
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{source}: the embedding 'shared.weight' is missing")
    needed = expected_dense(cfg)
    needed["shared.weight" if "shared.weight" in tensors else "encoder.embed_tokens.weight"] = (cfg.vocab, cfg.hidden)
    for name, shape in needed.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{source}: tensor {name!r} is missing")
        if info.shape != shape:
            raise CheckpointError(f"{info.path}: {name!r} has shape {list(info.shape)}, "
                                  f"config.json implies {list(shape)}")


def expert_tensor_names(cfg: SwitchConfig, moe_layer: int, e: int | str, lowrank: bool = False
                        ) -> list[tuple[str, str]]:
    """[(role, tensor name)] of stored expert e of a MoE layer in packing order: wi, wo, or
    with lowrank their factors wi_a, wi_b, wo_a, wo_b (e="base": the low-rank base)."""
    prefix = ff_prefix(*cfg.moe_blocks()[moe_layer]) + "mlp.experts." + ("base" if e == "base" else f"expert_{e}")
    if not lowrank:
        return [(role, f"{prefix}.{role}.weight") for role in ("wi", "wo")]
    return [(f"{role}_{f}", f"{prefix}.{role}.{peft}.weight") for role in ("wi", "wo") for f, peft in LOWRANK_FACTORS]


def _expert_layout(cfg: SwitchConfig, tensors: dict[str, TensorInfo], files: list[str]):
    blocks = cfg.moe_blocks()
    dense = {"wi": (cfg.ff, cfg.hidden), "wo": (cfg.hidden, cfg.ff)}

    def label(moe_layer: int) -> str:
        return "{} block {}".format(*blocks[moe_layer])

    ranks = [lowrank_rank(cfg, tensors, i, dense, label(i), expert_tensor_names) for i in range(len(blocks))]

    def shapes(moe_layer: int) -> dict[str, tuple[int, ...]]:
        r = ranks[moe_layer]
        if r is None:
            return dense
        return {**{f"{role}_a": (r, s[1]) for role, s in dense.items()},
                **{f"{role}_b": (s[0], r) for role, s in dense.items()}}

    def names(moe_layer: int, e: int) -> list[tuple[str, str]]:
        return expert_tensor_names(cfg, moe_layer, e, lowrank=ranks[moe_layer] is not None)

    counts = [max(row) + 1 for row in cfg.expert_map] if cfg.expert_map else cfg.n_experts
    return expert_table(tensors, files, shapes, len(blocks), counts, names, label)


def open_switch(directory: Path, raw: dict) -> Checkpoint:
    directory = Path(directory)
    cfg = switch_config(raw, directory / "config.json")
    if cfg.moe_layers == 0:
        raise CheckpointError(f"{directory / 'config.json'}: no sparse blocks; nothing to offload")
    # read_variant_map checks one row of n_experts router outputs per MoE layer
    cfg.expert_map = read_variant_map(directory, SimpleNamespace(moe_layers=cfg.moe_blocks(), n_experts=cfg.n_experts))
    files = shard_files(directory)
    tensors = _tensor_table(files)
    paths = [str(p) for p in files]
    ranges, parts, expert_names = _expert_layout(cfg, tensors, paths)
    _check_dense(cfg, tensors, paths[0])
    dense = sorted(n for n in tensors if n not in expert_names)
    tokenizer = {n: str(directory / n) for n in TOKENIZER_FILES if (directory / n).is_file()}
    if "tokenizer.model" not in tokenizer and (directory / SPIECE).is_file():
        tokenizer["tokenizer.model"] = str(directory / SPIECE)
    return Checkpoint(source=str(directory), config=cfg, files=paths, expert_ranges=ranges, expert_parts=parts,
                      dense_names=dense, read_dense=lambda name: read_tensor(tensors[name]),
                      dense_numel=sum(math.prod(tensors[n].shape) for n in dense),
                      dense_nbytes=sum(tensors[n].nbytes for n in dense), tokenizer_files=tokenizer)
