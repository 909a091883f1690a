"""Hugging Face checkpoint directories: config.json, one or many .safetensors shards
(with model.safetensors.index.json), tokenizer files. Read where they lie."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moeedge.formats.checkpoint import Checkpoint, ExpertPart, StoredTensor
from moeedge.formats.errors import CheckpointError
from moeedge.formats.hf_config import DecoderConfig, decoder_config, read_config
from moeedge.formats.safetensors_file import TensorInfo, read_header, read_tensor
from moeedge.keys import ExpertKey

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
VARIANT_FILE = "moeedge_variant.json"  # written by `moeedge aggregate` (moeedge.aggregate.variant)
# Trained expert predictors kept beside the weights (moeedge.predict.bundle): not a shard.
PREDICTOR_FILE = "moeedge_predictor.safetensors"

# family -> (MoE block prefix, router, expert tensor pattern, (gate, up, down) names)
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", "experts.{e}.{w}.weight", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", "gate", "experts.{e}.{w}.weight", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", "gate", "experts.{e}.{w}.weight", ("gate_proj", "up_proj", "down_proj")),
}
# Low-rank variants (moeedge aggregate --method lowrank): a MoE layer whose base expert is
# stored among the dense weights (as expert "base") stores each expert's weights W as
# factors of W - base = b @ a, named as PEFT names LoRA factors: a [r, in], b [out, r].
LOWRANK_FACTORS = (("a", "lora_A"), ("b", "lora_B"))


def expert_tensor_names(cfg: DecoderConfig, moe_layer: int, e: int | str, lowrank: bool = False
                        ) -> list[tuple[str, str]]:
    """[(role, tensor name)] of stored expert e of a MoE layer, in packing order: gate, up,
    down, or with lowrank their factors gate_a, gate_b, up_a, ... (e="base": the base)."""
    block, _, pattern, names = EXPERT_NAMES[cfg.family]
    prefix = f"model.layers.{cfg.moe_layers[moe_layer]}.{block}."
    roles = list(zip(("gate", "up", "down"), names))
    if not lowrank:
        return [(role, prefix + pattern.format(e=e, w=w)) for role, w in roles]
    return [(f"{role}_{f}", prefix + pattern.format(e=e, w=f"{w}.{peft}"))
            for role, w in roles for f, peft in LOWRANK_FACTORS]


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
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != PREDICTOR_FILE)
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


def expert_table(tensors: dict[str, TensorInfo], files: list[str], shapes,
                 n_layers: int, n_experts: int | list[int], names, label):
    """Byte ranges and layouts of every expert. n_experts: per layer, or one count for all;
    names(moe_layer, expert) gives [(role, tensor name)] in packing order; shapes: role ->
    shape, or shapes(moe_layer) where layers differ; label(moe_layer) names the layer in
    errors. Checks presence, shapes against the config, and that a layer's experts share
    dtype and shape."""
    shapes_of = shapes if callable(shapes) else (lambda moe_layer: shapes)
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
                if info.shape != shapes_of(moe_layer)[role]:
                    raise CheckpointError(f"{info.path}: {name!r} has shape {list(info.shape)}, "
                                          f"config.json implies {list(shapes_of(moe_layer)[role])}")
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


def lowrank_rank(cfg, tensors: dict[str, TensorInfo], moe_layer: int, shapes: dict[str, tuple[int, int]],
                 label: str, names=expert_tensor_names) -> int | None:
    """The rank of a low-rank layer's factors (None: the layer stores plain experts).
    names: the format's expert_tensor_names (decoders' here, Switch's its own)."""
    base = names(cfg, moe_layer, "base")
    if base[0][1] not in tensors:
        return None
    for role, name in base:
        info = tensors.get(name)
        if info is None or info.shape != shapes[role]:
            raise CheckpointError(f"{label}: low-rank base {name!r} is missing or not {list(shapes[role])}")
    if cfg.expert_map is None or cfg.expert_map[moe_layer] != list(range(cfg.n_experts)):
        raise CheckpointError(f"{label}: a low-rank layer stores every expert (expert_map must be 0..E-1)")
    first = tensors.get(names(cfg, moe_layer, 0, lowrank=True)[0][1])
    return first.shape[0] if first is not None else 0  # missing: expert_table says which


def _expert_layout(cfg: DecoderConfig, tensors: dict[str, TensorInfo], files: list[str]):
    dense = {"gate": (cfg.expert_intermediate, cfg.hidden), "up": (cfg.expert_intermediate, cfg.hidden),
             "down": (cfg.hidden, cfg.expert_intermediate)}
    ranks = [lowrank_rank(cfg, tensors, i, dense, f"layer {layer}") for i, layer in enumerate(cfg.moe_layers)]

    def shapes(moe_layer: int) -> dict[str, tuple[int, ...]]:
        r = ranks[moe_layer]
        if r is None:
            return dense
        return {**{f"{role}_a": (r, s[1]) for role, s in dense.items()},
                **{f"{role}_b": (s[0], r) for role, s in dense.items()}}

    def names(moe_layer: int, e: int) -> list[tuple[str, str]]:
        return expert_tensor_names(cfg, moe_layer, e, lowrank=ranks[moe_layer] is not None)

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
                      locate=lambda name: StoredTensor(tensors[name]),
                      dense_numel=sum(math.prod(tensors[n].shape) for n in dense),
                      dense_nbytes=sum(tensors[n].nbytes for n in dense), tokenizer_files=tokenizer)
