"""Switch Transformers (encoder-decoder, top-1 routing) checkpoints as transformers 5.x
save_pretrained writes them: `{encoder,decoder}.block.B.layer.L.mlp.experts.expert_E.wi/wo`
with L = 1 in the encoder and 2 in the decoder (after cross-attention).

Aggregated variants (`moeedge aggregate`) are read as the decoder's are
(moeedge.formats.variant_map): moeedge_variant.json's `expert_map` maps router outputs
to the n stored experts `expert_0..expert_{n-1}`; a low-rank layer keeps its base as the
dense `...mlp.experts.base.wi/wo.weight` and each expert's factors as
`...expert_E.wi.lora_A.weight` / `lora_B`."""
from __future__ import annotations

import re

from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.decoder_tensors import LOWRANK_FACTORS
from moeedge.formats.errors import CheckpointError, shown
from moeedge.formats.hf_directory import CONFIG_FILE, HFDirectory
from moeedge.formats.safetensors_checkpoint import (check_dense, check_layer_count, safetensors_checkpoint,
                                                    tensor_table, variant_expert_table)
from moeedge.formats.safetensors_file import TensorInfo
from moeedge.formats.switch_config import SwitchConfig, sparse_blocks, switch_config
from moeedge.formats.variant_map import read_variant_map

__all__ = ["SwitchConfig", "sparse_blocks", "switch_config", "expected_dense", "expert_tensor_names", "ff_prefix",
           "open_switch"]
SPIECE = "spiece.model"  # T5's sentencepiece file, read as a tokenizer.model


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
    embedding = "shared.weight" if "shared.weight" in tensors else "encoder.embed_tokens.weight"
    check_dense(tensors, {**expected_dense(cfg), embedding: (cfg.vocab, cfg.hidden)}, source)


def expert_tensor_names(cfg: SwitchConfig, moe_layer: int, e: int | str, lowrank: bool = False
                        ) -> list[tuple[str, str]]:
    """[(role, tensor name)] of stored expert e of a MoE layer in packing order: wi, wo, or
    with lowrank their factors wi_a, wi_b, wo_a, wo_b (e="base": the low-rank base)."""
    prefix = ff_prefix(*cfg.moe_blocks()[moe_layer]) + "mlp.experts." + ("base" if e == "base" else f"expert_{e}")
    if not lowrank:
        return [(role, f"{prefix}.{role}.weight") for role in ("wi", "wo")]
    return [(f"{role}_{f}", f"{prefix}.{role}.{peft}.weight") for role in ("wi", "wo") for f, peft in LOWRANK_FACTORS]


def _check_sparse_blocks(cfg: SwitchConfig, tensors: dict[str, TensorInfo], config) -> None:
    """The blocks with a router in the file are those the config makes sparse: else
    transformers would initialize the missing feed-forwards at random."""
    for stack, blocks in (("encoder", cfg.encoder_moe_blocks), ("decoder", cfg.decoder_moe_blocks)):
        router = rf"{stack}\.block\.(\d{{1,9}})\.layer\.\d+\.mlp\.router\.classifier\.weight"
        found = sorted({int(m.group(1)) for name in tensors if (m := re.fullmatch(router, name))})
        if found != blocks:
            raise CheckpointError(f"{config}: num_sparse_{stack}_layers / {stack}_sparse_step make {stack} blocks "
                                  f"{shown(blocks)} sparse, but the file has routers in blocks {shown(found)}")


def open_switch(directory: HFDirectory, raw: dict) -> Checkpoint:
    config = directory.path / CONFIG_FILE
    cfg = switch_config(raw, config)
    if cfg.moe_layers == 0:
        raise CheckpointError(f"{config}: no sparse blocks; nothing to offload")
    blocks = cfg.moe_blocks()
    cfg.expert_map = read_variant_map(directory, len(blocks), cfg.n_experts)
    shards = directory.shard_files()
    tensors = tensor_table(shards)
    files = [str(p) for p in shards]
    for stack, n, field in (("encoder", cfg.n_encoder_layers, "num_layers"),
                            ("decoder", cfg.n_decoder_layers, "num_decoder_layers")):
        check_layer_count(tensors, rf"{stack}\.block\.(\d+)\.", n, f"{config}: {field} =")
    _check_sparse_blocks(cfg, tensors, config)
    shapes = {"wi": (cfg.ff, cfg.hidden), "wo": (cfg.hidden, cfg.ff)}
    experts = variant_expert_table(cfg, tensors, files, shapes, len(blocks), expert_tensor_names,
                                   lambda moe_layer: "{} block {}".format(*blocks[moe_layer]))
    _check_dense(cfg, tensors, files[0])
    return safetensors_checkpoint(directory.path, cfg, files, tensors, experts,
                                  directory.tokenizer_files({"tokenizer.model": SPIECE}))
