"""moeedge's quantized checkpoint: a Hugging Face directory written by `moeedge quantize`
(moeedge.quantize) that `moeedge.load` reads like any other.

- config.json (and generation_config.json): the source's, unchanged; tokenizer files and
  the trained expert predictors (moeedge_predictor.safetensors), where present, copied.
- model.safetensors: the dense tensors as the source stores them (bf16, fp32); each expert
  matrix `<name>.weight` is stored instead as `<name>.qweight` and `<name>.scales`:
  int8 [out, in] (8 bits) or uint8 [out, in / 2] (4 bits), and fp16 [out, ceil(in / G)],
  group-wise symmetric, weight = scale * q (moeedge.formats.group_quant has the details).
  No pickle anywhere.
- moeedge_quant.json: {"format": "moeedge-groupwise", "version": 1, "group_size": G,
  "bits": per MoE layer a list of each expert's bits (4 or 8), "source", how the bits were
  chosen ("selection": calibration and per-expert sensitivity, for --per-expert-bits auto)
  and "quality" (held-out perplexity ratio, KL, top-1 agreement against the source, or
  null when not measured).

Experts of one layer may have different bit-widths, so their layouts differ: the layer's
most common layout is Checkpoint.expert_parts[layer], the others go to
Checkpoint.expert_layouts.
"""
from __future__ import annotations

from collections import Counter

import torch

from moeedge.formats.checkpoint import Checkpoint, ExpertPart
from moeedge.formats.decoder_tensors import (EXPERT_NAMES, LAYER_TENSOR, check_attention_biases, expected_dense,
                                             expert_shapes, optional_dense)
from moeedge.formats.errors import CheckpointError, shown_name
from moeedge.formats.group_quant import GROUP_SIZES, qweight_shape, quant_name, scales_shape
from moeedge.formats.hf_config import DecoderConfig, decoder_config
from moeedge.formats.hf_directory import CONFIG_FILE, HFDirectory
from moeedge.formats.safetensors_checkpoint import (ExpertTable, check_dense, check_layer_count,
                                                    safetensors_checkpoint, tensor_table)
from moeedge.formats.safetensors_file import TensorInfo
from moeedge.formats.variant_map import VARIANT_FILE
from moeedge.keys import ExpertKey

FORMAT = "moeedge-groupwise"
VERSION = 1
QUANT_FILE = "moeedge_quant.json"


def expert_matrices(cfg: DecoderConfig, moe_layer: int, e: int) -> list[tuple[str, str, tuple[int, int]]]:
    """[(role, tensor name without ".weight", [out, in])] of one expert, in packing order."""
    block, _, pattern, roles = EXPERT_NAMES[cfg.family]
    prefix = f"model.layers.{cfg.moe_layers[moe_layer]}.{block}."
    shapes = expert_shapes(cfg)
    return [(role, prefix + pattern.format(e=e, w=w).removesuffix(".weight"), shapes[role])
            for role, w in zip(("gate", "up", "down"), roles)]


def read_quant_info(directory: HFDirectory, cfg: DecoderConfig) -> dict:
    """moeedge_quant.json, checked against the config."""
    path = directory.file(QUANT_FILE)
    info = directory.read_json(path, "valid JSON")
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} description")
    if info.get("group_size") not in GROUP_SIZES:
        raise CheckpointError(f"{path}: group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                              f"got {info.get('group_size')!r}")
    bits = info.get("bits")
    if not (isinstance(bits, list) and len(bits) == len(cfg.moe_layers)
            and all(isinstance(row, list) and len(row) == cfg.n_experts and all(b in (4, 8) for b in row)
                    for row in bits)):
        raise CheckpointError(f"{path}: bits must list, for each of the {len(cfg.moe_layers)} MoE layers, "
                              f"4 or 8 for each of its {cfg.n_experts} experts")
    if directory.find(VARIANT_FILE) is not None:
        raise CheckpointError(f"{directory.path}: a quantized aggregated variant ({VARIANT_FILE} beside {QUANT_FILE}) "
                              f"is not supported")
    return info


def _check(info: TensorInfo | None, name: str, dtype: torch.dtype, shape: tuple[int, int], why: str) -> None:
    if info is None:
        raise CheckpointError(f"expert tensor {shown_name(name)} is missing")
    if info.dtype != dtype or info.shape != shape:
        raise CheckpointError(f"{info.path}: {shown_name(name)} is {str(info.dtype).removeprefix('torch.')}"
                              f"{list(info.shape)}; {why} imply {str(dtype).removeprefix('torch.')}{list(shape)}")


def quant_expert(cfg: DecoderConfig, tensors: dict[str, TensorInfo], file_index: dict[str, int], moe_layer: int,
                 e: int, bits: int, group: int):
    """One expert's segments (qweight then scales of each matrix), layout, and tensor names."""
    why = f"{QUANT_FILE}'s {bits} bits in groups of {group}"
    segments, layout, names, offset = [], [], [], 0
    for role, base, shape in expert_matrices(cfg, moe_layer, e):
        q, s = tensors.get(base + ".qweight"), tensors.get(base + ".scales")
        _check(q, base + ".qweight", torch.int8 if bits == 8 else torch.uint8, qweight_shape(bits, shape), why)
        _check(s, base + ".scales", torch.float16, scales_shape(group, shape), why)
        names += [q.name, s.name]
        segments += [(file_index[q.path], q.offset, q.nbytes), (file_index[s.path], s.offset, s.nbytes)]
        layout.append(ExpertPart(role, torch.uint8, shape, offset, q.nbytes + s.nbytes, quant_name(bits, group)))
        offset += q.nbytes + s.nbytes
    return segments, layout, names


def quant_expert_table(cfg: DecoderConfig, info: dict, tensors: dict[str, TensorInfo], files: list[str]) -> ExpertTable:
    """Each layer's most common layout is its parts; the experts laid out otherwise go to layouts."""
    file_index = {p: i for i, p in enumerate(files)}
    table, every = ExpertTable({}, {}, set()), {}
    for moe_layer, layer_bits in enumerate(info["bits"]):
        for e, bits in enumerate(layer_bits):
            key = ExpertKey(moe_layer, e).packed
            table.ranges[key], every[key], names = quant_expert(cfg, tensors, file_index, moe_layer, e, bits,
                                                           info["group_size"])
            table.names.update(names)
    for moe_layer in range(len(cfg.moe_layers)):
        counts = Counter(tuple(every[ExpertKey(moe_layer, e).packed]) for e in range(cfg.n_experts))
        table.parts[moe_layer] = list(counts.most_common(1)[0][0])
    table.layouts = {key: layout for key, layout in every.items() if layout != table.parts[ExpertKey.unpack(key).layer]}
    return table


def open_quant_directory(directory: HFDirectory, raw: dict) -> Checkpoint:
    config = directory.path / CONFIG_FILE
    cfg = decoder_config(raw, config)
    info = read_quant_info(directory, cfg)
    shards = directory.shard_files()
    tensors = tensor_table(shards)
    files = [str(p) for p in shards]
    check_layer_count(tensors, LAYER_TENSOR, cfg.n_layers, f"{config}: num_hidden_layers =")
    experts = quant_expert_table(cfg, info, tensors, files)
    check_attention_biases(cfg, tensors, config)
    check_dense(tensors, expected_dense(cfg), files[0], optional_dense(cfg))
    return safetensors_checkpoint(directory.path, cfg, files, tensors, experts, directory.tokenizer_files())
