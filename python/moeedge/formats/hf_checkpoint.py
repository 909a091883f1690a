"""Hugging Face checkpoint directories: config.json, one or many .safetensors shards
(with model.safetensors.index.json), tokenizer files. Read where they lie."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moeedge.formats.checkpoint import Checkpoint, ExpertPart
from moeedge.formats.errors import CheckpointError
from moeedge.formats.hf_config import DecoderConfig, decoder_config, read_config
from moeedge.formats.safetensors_file import TensorInfo, read_header, read_tensor
from moeedge.keys import ExpertKey

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
VARIANT_FILE = "moeedge_variant.json"  # written by `moeedge aggregate` (moeedge.aggregate.variant)

# family -> (MoE block prefix, router, expert tensor pattern, (gate, up, down) names)
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", "experts.{e}.{w}.weight", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", "gate", "experts.{e}.{w}.weight", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", "gate", "experts.{e}.{w}.weight", ("gate_proj", "up_proj", "down_proj")),
}


def shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{directory}: found {', '.join(pickles)}, a pickle checkpoint; moeedge never "
                              f"unpickles. Supported: .safetensors (Hugging Face) or .gguf")
    raise CheckpointError(f"{directory}: no .safetensors files")


def _tensor_table(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].path} and {path}")
            tensors[name] = info
    return tensors


def expert_table(tensors: dict[str, TensorInfo], files: list[str], shapes: dict[str, tuple[int, ...]],
                 n_layers: int, n_experts: int | list[int], names, label):
    """Byte ranges and layouts of every expert. n_experts: per layer, or one count for all;
    names(moe_layer, expert) gives [(role, tensor name)] in packing order; label(moe_layer)
    names the layer in errors. Checks presence, shapes against the config, and that a
    layer's experts share dtype and shape."""
    file_index = {p: i for i, p in enumerate(files)}
    counts = n_experts if isinstance(n_experts, list) else [n_experts] * n_layers
    ranges, parts, expert_names = {}, {}, set()
    for moe_layer in range(n_layers):
        for e in range(counts[moe_layer]):
            segments, layout, offset = [], [], 0
            for role, name in names(moe_layer, e):
                info = tensors.get(name)
                if info is None:
                    raise CheckpointError(f"{files[0]}: expert tensor {name!r} is missing")
                if info.shape != shapes[role]:
                    raise CheckpointError(f"{info.path}: {name!r} has shape {list(info.shape)}, "
                                          f"config.json implies {list(shapes[role])}")
                expert_names.add(name)
                segments.append((file_index[info.path], info.offset, info.nbytes))
                layout.append(ExpertPart(role, info.dtype, info.shape, offset, info.nbytes))
                offset += info.nbytes
            ranges[ExpertKey(moe_layer, e).packed] = segments
            if moe_layer not in parts:
                parts[moe_layer] = layout
            elif layout != parts[moe_layer]:
                raise CheckpointError(f"{label(moe_layer)}: experts differ in dtype or shape")
    return ranges, parts, expert_names


def read_variant_map(directory: Path, cfg: DecoderConfig) -> list[list[int]] | None:
    """An aggregated variant's router-to-stored-expert table per MoE layer (None: not a
    variant). Each entry is a stored expert 0..n-1 or -1 (dropped); every stored expert is
    some router output's."""
    path = directory / VARIANT_FILE
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())["expert_map"]
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid variant description ({e})") from None
    if not isinstance(table, list) or len(table) != len(cfg.moe_layers):
        raise CheckpointError(f"{path}: expert_map must list {len(cfg.moe_layers)} MoE layers")
    for i, row in enumerate(table):
        if not (isinstance(row, list) and len(row) == cfg.n_experts and all(isinstance(e, int) for e in row)):
            raise CheckpointError(f"{path}: expert_map[{i}] must be {cfg.n_experts} integers (the router's outputs)")
        stored = {e for e in row if e >= 0}
        if min(row) < -1 or not stored or stored != set(range(max(stored) + 1)):
            raise CheckpointError(f"{path}: expert_map[{i}] must map onto stored experts 0..n-1, each used, "
                                  f"or -1 (dropped); got {row}")
    return table


def _expert_layout(cfg: DecoderConfig, tensors: dict[str, TensorInfo], files: list[str]):
    block, _, pattern, roles = EXPERT_NAMES[cfg.family]
    shapes = {"gate": (cfg.expert_intermediate, cfg.hidden), "up": (cfg.expert_intermediate, cfg.hidden),
              "down": (cfg.hidden, cfg.expert_intermediate)}

    def names(moe_layer: int, e: int) -> list[tuple[str, str]]:
        layer = cfg.moe_layers[moe_layer]
        return [(role, f"model.layers.{layer}.{block}." + pattern.format(e=e, w=w))
                for role, w in zip(("gate", "up", "down"), roles)]

    counts = [max(row) + 1 for row in cfg.expert_map] if cfg.expert_map else cfg.n_experts
    return expert_table(tensors, files, shapes, len(cfg.moe_layers), counts, names,
                        lambda moe_layer: f"layer {cfg.moe_layers[moe_layer]}")


def open_hf_directory(directory: str | os.PathLike) -> Checkpoint:
    directory = Path(directory)
    raw = read_config(directory)
    if raw["model_type"] == "switch_transformers":
        from moeedge.formats.switch_checkpoint import open_switch  # noqa: PLC0415 (only Switch needs it)

        return open_switch(directory, raw)
    if (directory / "moeedge_quant.json").is_file():  # written by `moeedge quantize`
        from moeedge.formats.quant_checkpoint import open_quant_directory  # noqa: PLC0415 (it imports this module)

        return open_quant_directory(directory, raw)
    cfg = decoder_config(raw, directory / "config.json")
    cfg.expert_map = read_variant_map(directory, cfg)
    files = shard_files(directory)
    tensors = _tensor_table(files)
    paths = [str(p) for p in files]
    ranges, parts, expert_names = _expert_layout(cfg, tensors, paths)
    dense = sorted(n for n in tensors if n not in expert_names)
    tokenizer = {n: str(directory / n) for n in TOKENIZER_FILES if (directory / n).is_file()}
    return Checkpoint(source=str(directory), config=cfg, files=paths, expert_ranges=ranges, expert_parts=parts,
                      dense_names=dense, read_dense=lambda name: read_tensor(tensors[name]),
                      dense_numel=sum(math.prod(tensors[n].shape) for n in dense),
                      dense_nbytes=sum(tensors[n].nbytes for n in dense), tokenizer_files=tokenizer)
