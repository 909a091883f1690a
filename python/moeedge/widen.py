"""A routing-realistic large checkpoint: a trained decoder MoE (default: the bundled model)
whose experts are widened to a requested size without changing what it computes.

    python -m moeedge.widen [SOURCE] --expert-bytes 64MiB -o /var/tmp/moeedge-models/default-64m

Random weights route tokens almost uniformly; this keeps the trained router and its
routing while every expert costs real bytes to read and to multiply. Each expert's
intermediate dimension grows from I to I' by pairs of new neurons: both neurons of a
pair get the same random rows of w1 and w3 (so the same activation h), and opposite
random columns of w2 (c and -c), so a pair adds c*h - c*h = 0 to the output, exact up to
the rounding of the sums they join. No new weight is zero, so no page of the file is one
a file system could skip.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moeedge.derived import check_output, open_decoder_source, publish
from moeedge.formats.variant_map import VARIANT_FILE
from moeedge.formats.decoder_tensors import EXPERT_NAMES
from moeedge.units import format_bytes, parse_bytes
from moeedge._core import ExpertStore
from moeedge.keys import ExpertKey


def widened_intermediate(hidden: int, intermediate: int, expert_bytes: int, itemsize: int) -> int:
    """I' for experts of about expert_bytes (3 matrices of H x I'), a multiple of 64 (whole
    blocks for every kernel), at least I and with an even number of new neurons."""
    wide = max(intermediate, round(expert_bytes / (3 * hidden * itemsize) / 64) * 64)
    return wide + (wide - intermediate) % 2


def widen_expert(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, wide: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[I, H], [I, H], [H, I] -> [I', H], [I', H], [H, I'] computing the same function."""
    pairs = (wide - w1.shape[0]) // 2
    hidden = w1.shape[1]

    def rand(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * like.float().std()).to(like.dtype)

    r1, r3, c = rand(pairs, hidden, w1), rand(pairs, hidden, w3), rand(hidden, pairs, w2)
    return torch.cat([w1, r1, r1]), torch.cat([w3, r3, r3]), torch.cat([w2, c, -c], dim=1)


def widen(source, out: Path, expert_bytes: int, seed: int = 0) -> Path:
    ckpt = open_decoder_source(source, "widen", variants=True)  # a merged draft is widened like its model
    cfg = ckpt.config
    if cfg.shared_expert_intermediate or (cfg.expert_map is not None and ckpt.expert_layouts):
        raise ValueError(f"{ckpt.source}: widen takes plain Mixtral/OLMoE-style experts")
    itemsize = ckpt.expert_parts[0][0].dtype.itemsize
    wide = widened_intermediate(cfg.hidden, cfg.expert_intermediate, expert_bytes, itemsize)
    n_experts = len(ckpt.expert_ranges)
    need = ckpt.dense_nbytes + n_experts * 3 * cfg.hidden * wide * itemsize
    check_output(out)
    free = shutil.disk_usage(out.parent).free
    if need > free // 2:
        raise ValueError(f"-o {out}: the widened model needs {format_bytes(need)}, more than half of the "
                         f"{format_bytes(free)} free there")
    with publish(out, ckpt) as staging:
        _write(ckpt, staging, wide, need, torch.Generator().manual_seed(seed))
        if cfg.expert_map is not None:  # an aggregated variant (a speculative draft) stays one
            shutil.copyfile(Path(ckpt.source) / VARIANT_FILE, staging / VARIANT_FILE)
    return out


def _write(ckpt, staging: Path, wide: int, need: int, gen: torch.Generator) -> None:
    cfg = ckpt.config
    block, _, pattern, roles = EXPERT_NAMES[cfg.family]
    n = len(cfg.moe_layers)
    shards = [f"model-{k + 1:05d}-of-{n + 1:05d}.safetensors" for k in range(n + 1)]
    weight_map = {}
    for moe_layer, layer in enumerate(tqdm(cfg.moe_layers, desc=f"widening to {format_bytes(need)}", unit="layer")):
        tensors = {}
        stored = sorted({e for e in cfg.expert_map[moe_layer] if e >= 0}) if cfg.expert_map else range(cfg.n_experts)
        for e in stored:
            names = [f"model.layers.{layer}.{block}." + pattern.format(e=e, w=w) for w in roles]  # gate, up, down
            w1, w3, w2 = (_read_expert_part(ckpt, moe_layer, e, role) for role in ("gate", "up", "down"))
            tensors.update(zip(names, (t.contiguous() for t in widen_expert(w1, w3, w2, wide, gen))))
        save_file(tensors, staging / shards[moe_layer], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shards[moe_layer]))
    dense = {name: ckpt.read_dense(name) for name in ckpt.dense_names}
    save_file(dense, staging / shards[-1], metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(dense, shards[-1]))
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": need},
                                                                      "weight_map": weight_map}, indent=1))
    config = json.loads((staging / "config.json").read_text())
    config["intermediate_size"] = wide
    (staging / "config.json").write_text(json.dumps(config, indent=1))


def _read_expert_part(ckpt, moe_layer: int, expert: int, role: str) -> torch.Tensor:
    key = ExpertKey(moe_layer, expert).packed
    store = ExpertStore(ckpt.files, {key: ckpt.expert_ranges[key]}, direct_io=False)
    raw = torch.frombuffer(bytearray(store.read(key)), dtype=torch.uint8)
    part = next(p for p in ckpt.parts_of(moe_layer, expert) if p.role == role)
    return raw[part.offset:part.offset + part.nbytes].view(part.dtype).view(part.shape).clone()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeedge.widen", description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=None, help="a decoder MoE directory (default: the bundled model)")
    p.add_argument("--expert-bytes", required=True, help="the size of each widened expert, e.g. 64MiB")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        path = widen(a.source, a.out, parse_bytes(a.expert_bytes), a.seed)
    except (ValueError, OSError) as e:
        print(f"moeedge widen: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
