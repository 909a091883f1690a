"""config.json of a Switch Transformers checkpoint (encoder-decoder, top-1 routing), as
transformers 5.x save_pretrained writes it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeedge.formats.config_fields import (MAX_CONTEXT, MAX_EXPERTS, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS,
                                           MAX_VOCAB, MAX_WIDTH, REQUIRED, Fields)
from moeedge.formats.errors import CheckpointError, shown

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
ROUTER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative positions have no hard limit: past max_distance they share the last bucket.
MAX_POSITION = 1 << 20


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
    """The blocks transformers makes sparse for n_sparse sparse layers (SwitchTransformersConfig.__post_init__)."""
    return step_blocks(n_layers, n_layers // n_sparse if n_sparse > 0 else n_layers)


def step_blocks(n_layers: int, step: int) -> list[int]:
    """SwitchTransformersStack's sparse blocks: every `step`-th block from block 1, or all when step is 1."""
    if step <= 0:
        return []
    return [i for i in range(n_layers) if i % step == 1 or step == 1]


def _stack(f: Fields, layers_key: str, sparse_key: str, step_key: str,
           default_layers: int | None = None) -> tuple[int, list[int]]:
    """A stack's block count and its sparse blocks (transformers' default: 3 sparse blocks). A
    config.json that gives {encoder,decoder}_sparse_step overrides the step transformers
    derives from the sparse count (it is set after __post_init__): read as it is."""
    n_layers = f.count(layers_key, MAX_LAYERS, default_layers if default_layers is not None else REQUIRED)
    blocks = sparse_blocks(n_layers, f.count(sparse_key, n_layers, 3, minimum=0))
    step = f.get(step_key, None)
    if step is None:
        return n_layers, blocks
    if isinstance(step, bool) or not isinstance(step, int):
        raise f.bad(step_key, step, "must be an integer")
    return n_layers, step_blocks(n_layers, step)


def switch_config(raw: dict, path: Path) -> SwitchConfig:
    """Every value checked before anything is sized by it."""
    f = Fields(raw, f"{path}:", f"{path}: config.json lacks")
    f.require("d_model", "d_kv", "d_ff", "num_heads", "vocab_size", "num_layers", "num_experts", "expert_capacity")
    act = raw.get("dense_act_fn", "relu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: dense_act_fn {shown(act)} is not supported; "
                              f"supported: {', '.join(ACTIVATIONS)}")
    router_dtype = ROUTER_DTYPES.get(str(raw.get("router_dtype", "float32")))
    if router_dtype is None:
        raise CheckpointError(f"{path}: router_dtype {shown(raw.get('router_dtype'))} is not supported; "
                              f"supported: {', '.join(ROUTER_DTYPES)}")
    capacity = raw.get("expert_capacity")
    if isinstance(capacity, int) and not isinstance(capacity, bool) and capacity < 1:
        raise CheckpointError(f"{path}: expert_capacity must be at least 1, got {capacity}")
    if not f.flag("is_encoder_decoder", True):  # the model is an encoder and a decoder; nothing else is read
        raise f.bad("is_encoder_decoder", False, "a Switch Transformer is an encoder-decoder")
    vocab = f.count("vocab_size", MAX_VOCAB)
    n_enc, encoder_moe = _stack(f, "num_layers", "num_sparse_encoder_layers", "encoder_sparse_step")
    n_dec, decoder_moe = _stack(f, "num_decoder_layers", "num_sparse_decoder_layers", "decoder_sparse_step", n_enc)
    pad = f.token_id("pad_token_id", vocab) if "pad_token_id" in raw else 0
    start = f.token_id("decoder_start_token_id", vocab)
    return SwitchConfig(
        n_encoder_layers=n_enc, n_decoder_layers=n_dec, hidden=f.count("d_model", MAX_WIDTH),
        n_heads=f.count("num_heads", MAX_HEADS), head_dim=f.count("d_kv", MAX_HEAD_DIM), ff=f.count("d_ff", MAX_WIDTH),
        vocab=vocab, n_experts=f.count("num_experts", MAX_EXPERTS),
        expert_capacity=f.count("expert_capacity", MAX_CONTEXT),
        encoder_moe_blocks=encoder_moe, decoder_moe_blocks=decoder_moe,
        rel_buckets=f.count("relative_attention_num_buckets", MAX_CONTEXT, 32),
        rel_max_distance=f.count("relative_attention_max_distance", MAX_CONTEXT, 128),
        eps=f.number("layer_norm_epsilon", 1e-6), act=act, router_bias=f.flag("router_bias", False),
        router_dtype=router_dtype, tie_embeddings=f.flag("tie_word_embeddings", True),
        decoder_start_token_id=start if start is not None else (pad or 0), pad_token_id=pad,
        eos_token_ids=f.token_ids("eos_token_id", vocab) if "eos_token_id" in raw else [1], dtype=f.dtype())
