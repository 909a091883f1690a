"""A Checkpoint built from safetensors headers: what the decoder, quantized and Switch
formats share. tensor_table merges the shards' headers, expert_table finds each expert's
byte ranges, check_dense checks the dense tensors the runner reads, and
safetensors_checkpoint assembles the Checkpoint."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeedge.formats.checkpoint import Checkpoint, ExpertPart, StoredTensor
from moeedge.formats.errors import CheckpointError, shown, shown_name
from moeedge.formats.safetensors_file import TensorInfo, read_header, read_tensor
from moeedge.keys import ExpertKey

# Weights are floats; an integer tensor where one is expected is a broken checkpoint.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class ExpertTable:
    ranges: dict[int, list[tuple[int, int, int]]]  # ExpertKey.packed -> [(file index, offset, length)]
    parts: dict[int, list[ExpertPart]]            # MoE layer -> layout of its experts
    names: set[str]                               # the tensors experts are made of (the rest is dense)
    layouts: dict[int, list[ExpertPart]] = field(default_factory=dict)  # experts laid out otherwise


def tensor_table(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of every shard, by name; a name in two shards is refused."""
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {shown_name(name)} appears in both {tensors[name].path} and {path}")
            tensors[name] = info
    return tensors


def check_weight(info: TensorInfo, shape: tuple[int, ...], implied_by: str = "config.json") -> None:
    if info.shape != shape:
        raise CheckpointError(f"{info.path}: {shown_name(info.name)} has shape {shown(list(info.shape))}, "
                              f"{implied_by} implies {list(shape)}")
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{info.path}: {shown_name(info.name)} is {str(info.dtype).removeprefix('torch.')}, "
                              f"not a float dtype (F32, F16, BF16, F64) as a weight must be")


def check_dense(tensors: dict[str, TensorInfo], needed: dict[str, tuple[int, ...]], source: str,
                optional: dict[str, tuple[int, ...]] | None = None) -> None:
    """The dense tensors the runner reads: present, of the shape the config implies, floats."""
    for name, shape in needed.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{source}: tensor {shown_name(name)} is missing")
        check_weight(info, shape)
    for name, shape in (optional or {}).items():
        if name in tensors:
            check_weight(tensors[name], shape)


def check_layer_count(tensors: dict[str, TensorInfo], pattern: str, n_layers: int, field: str) -> None:
    """No tensor of a layer past the config's count (pattern's group 1: the layer number):
    a config describing fewer layers than the file holds would run a truncated model.
    field: how errors name the count ("x/config.json: num_hidden_layers =")."""
    for name, info in tensors.items():
        m = re.match(pattern, name)
        if m and (len(m.group(1)) > 9 or int(m.group(1)) >= n_layers):
            raise CheckpointError(f"{field} {n_layers}, but {info.path} holds {shown(name)} "
                                  f"of layer {shown(m.group(1))}: "
                                  f"the config describes fewer layers than the checkpoint has")


def expert_table(tensors: dict[str, TensorInfo], files: list[str], shapes,
                 n_layers: int, n_experts: int | list[int], names, label) -> ExpertTable:
    """Byte ranges and layouts of every expert. n_experts: per layer, or one count for all;
    names(moe_layer, expert) gives [(role, tensor name)] in packing order; shapes(moe_layer):
    role -> shape; label(moe_layer) names the layer in errors. Checks presence, shapes
    against the config, float dtypes, and that a layer's experts share dtype and shape."""
    file_index = {p: i for i, p in enumerate(files)}
    counts = n_experts if isinstance(n_experts, list) else [n_experts] * n_layers
    table = ExpertTable({}, {}, set())
    for moe_layer in range(n_layers):
        for e in range(counts[moe_layer]):
            segments, layout, offset = [], [], 0
            for role, name in names(moe_layer, e):
                info = tensors.get(name)
                if info is None:
                    raise CheckpointError(f"{files[0]}: expert tensor {shown_name(name)} is missing")
                check_weight(info, shapes(moe_layer)[role])
                table.names.add(name)
                segments.append((file_index[info.path], info.offset, info.nbytes))
                layout.append(ExpertPart(role, info.dtype, info.shape, offset, info.nbytes))
                offset += info.nbytes
            table.ranges[ExpertKey(moe_layer, e).packed] = segments
            if moe_layer not in table.parts:
                table.parts[moe_layer] = layout
            elif layout != table.parts[moe_layer]:
                raise CheckpointError(f"{label(moe_layer)}: experts differ in dtype or shape")
    return table


def lowrank_rank(cfg, tensors: dict[str, TensorInfo], moe_layer: int, shapes: dict[str, tuple[int, int]],
                 label: str, names) -> int | None:
    """The rank of a low-rank layer's factors (None: the layer stores plain experts).
    names: the format's expert_tensor_names (decoders' or Switch's)."""
    base = names(cfg, moe_layer, "base")
    if base[0][1] not in tensors:
        return None
    for role, name in base:
        info = tensors.get(name)
        if info is None or info.shape != shapes[role]:
            raise CheckpointError(f"{label}: low-rank base {shown_name(name)} is missing or not {list(shapes[role])}")
    if cfg.expert_map is None or cfg.expert_map[moe_layer] != list(range(cfg.n_experts)):
        raise CheckpointError(f"{label}: a low-rank layer stores every expert (expert_map must be 0..E-1)")
    first = tensors.get(names(cfg, moe_layer, 0, lowrank=True)[0][1])
    return first.shape[0] if first is not None else 0  # missing: expert_table says which


def lowrank_shapes(dense: dict[str, tuple[int, int]], rank: int | None) -> dict[str, tuple[int, ...]]:
    """Role -> shape of a layer's expert tensors: dense's, or with a rank its factors'."""
    if rank is None:
        return dense
    return {**{f"{role}_a": (rank, s[1]) for role, s in dense.items()},
            **{f"{role}_b": (s[0], rank) for role, s in dense.items()}}


def variant_expert_table(cfg, tensors: dict[str, TensorInfo], files: list[str], dense: dict[str, tuple[int, int]],
                         n_layers: int, names, label) -> ExpertTable:
    """The experts of a plain checkpoint or of an aggregated variant (cfg.expert_map: fewer
    stored experts; low-rank layers). dense: role -> shape of an expert matrix; names: the
    format's expert_tensor_names; label(moe_layer) names a layer in errors."""
    ranks = [lowrank_rank(cfg, tensors, i, dense, label(i), names) for i in range(n_layers)]
    counts = [max(row) + 1 for row in cfg.expert_map] if cfg.expert_map else cfg.n_experts
    return expert_table(tensors, files, lambda moe_layer: lowrank_shapes(dense, ranks[moe_layer]), n_layers, counts,
                        lambda moe_layer, e: names(cfg, moe_layer, e, lowrank=ranks[moe_layer] is not None), label)


def safetensors_checkpoint(source: Path, cfg, files: list[str], tensors: dict[str, TensorInfo],
                           experts: ExpertTable, tokenizer_files: dict[str, str]) -> Checkpoint:
    """The Checkpoint: experts as the table lays them out, every other tensor dense."""
    dense = sorted(n for n in tensors if n not in experts.names)
    return Checkpoint(source=str(source), config=cfg, files=files, expert_ranges=experts.ranges,
                      expert_parts=experts.parts, dense_names=dense,
                      read_dense=lambda name: read_tensor(tensors[name]),
                      locate=lambda name: StoredTensor(tensors[name]),
                      dense_numel=sum(math.prod(tensors[n].shape) for n in dense),
                      dense_nbytes=sum(tensors[n].nbytes for n in dense), tokenizer_files=tokenizer_files,
                      expert_layouts=experts.layouts)
