"""Hugging Face decoder MoE directories (Mixtral, Qwen2-MoE, OLMoE), and the aggregated
variants `moeedge aggregate` writes of them: config.json, one or many .safetensors
shards, tokenizer files, read where they lie."""
from __future__ import annotations

from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.decoder_tensors import (LAYER_TENSOR, check_attention_biases, expected_dense, expert_shapes,
                                             expert_tensor_names, optional_dense)
from moeedge.formats.hf_config import decoder_config
from moeedge.formats.hf_directory import CONFIG_FILE, HFDirectory
from moeedge.formats.safetensors_checkpoint import (check_dense, check_layer_count, safetensors_checkpoint,
                                                    tensor_table, variant_expert_table)
from moeedge.formats.variant_map import read_variant_map


def open_decoder(directory: HFDirectory, raw: dict) -> Checkpoint:
    config = directory.path / CONFIG_FILE
    cfg = decoder_config(raw, config)
    cfg.expert_map = read_variant_map(directory, len(cfg.moe_layers), cfg.n_experts)
    shards = directory.shard_files()
    tensors = tensor_table(shards)
    files = [str(p) for p in shards]
    check_layer_count(tensors, LAYER_TENSOR, cfg.n_layers, f"{config}: num_hidden_layers =")
    experts = variant_expert_table(cfg, tensors, files, expert_shapes(cfg), len(cfg.moe_layers), expert_tensor_names,
                                   lambda moe_layer: f"layer {cfg.moe_layers[moe_layer]}")
    check_attention_biases(cfg, tensors, config)
    check_dense(tensors, expected_dense(cfg), files[0], optional_dense(cfg))
    return safetensors_checkpoint(directory.path, cfg, files, tensors, experts, directory.tokenizer_files())
