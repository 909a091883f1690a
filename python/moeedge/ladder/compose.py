"""A source checkpoint read with some MoE layers in a ladder's variants.

The result is the source's Checkpoint with, for each layer a plan moves off "stored",
its experts' byte ranges pointing into the pack's file for that (layer, variant) and
keyed by VariantKey(layer, expert, variant id), its layout the quantized one, and
layer_variants saying so. Everything else (dense weights, tokenizer, predictors) is the
source's, read where it lies. A layer left "stored" keeps its ExpertKeys, so the
all-"stored" plan is the source exactly as moeedge.load opens it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.hf_config import DecoderConfig
from moeedge.formats.quant_checkpoint import quant_expert
from moeedge.formats.safetensors_checkpoint import tensor_table
from moeedge.keys import ExpertKey, VariantKey
from moeedge.ladder import pack
from moeedge.ladder.variants import GROUP, LOADABLE


def check_assignment(manifest: dict, n_layers: int, variants: list[str]) -> None:
    if len(variants) != n_layers:
        raise ValueError(f"a plan names one variant per MoE layer: {n_layers}, got {len(variants)}")
    for layer, name in enumerate(variants):
        if name == "stored":
            continue
        if name not in LOADABLE:
            raise ValueError(f"layer {layer}: variant {name!r} cannot be loaded in a plan (loadable: "
                             f"{', '.join(LOADABLE)})")
        built = manifest["layers"].get(str(layer))
        if built is None or name not in built["variants"]:
            raise ValueError(f"layer {layer}: the ladder has no {name!r} variant of it (an unfinished build? "
                             f"run `moeedge ladder` again to resume it)")


def _open(ckpt: Checkpoint, directory: Path, variants: list[str]) -> dict:
    manifest = pack.read_manifest(directory)
    if manifest is None:
        raise ValueError(f"{directory}: no ladder here (no {pack.MANIFEST}); build one with `moeedge ladder`")
    pack.check_source(manifest, ckpt, directory)
    if not isinstance(ckpt.config, DecoderConfig):
        raise ValueError(f"{ckpt.source}: plans of variants are for decoder-only models")
    check_assignment(manifest, len(ckpt.config.moe_layers), variants)
    return manifest


def _variant_ranges(ckpt: Checkpoint, directory: Path, manifest: dict, files: list, layer: int, name: str):
    """{VariantKey: byte ranges} and {VariantKey: layout} of one layer in one variant, its
    file appended to files."""
    path = str(directory / pack.layer_file(layer, name))
    files.append(path)
    tensors = tensor_table([Path(path)])
    bits = manifest["layers"][str(layer)]["variants"][name]["bits"]
    ranges, layouts = {}, {}
    for e in range(ckpt.config.n_experts):
        key = VariantKey(layer, e, LOADABLE[name]).packed
        ranges[key], layouts[key], _ = quant_expert(ckpt.config, tensors, {path: len(files) - 1}, layer, e,
                                                    bits[e], GROUP)
    return ranges, layouts


def compose(ckpt: Checkpoint, directory: str | Path, variants: list[str]) -> Checkpoint:
    """ckpt read with MoE layer i in variants[i] ("stored": as it is)."""
    directory = Path(directory)
    manifest = _open(ckpt, directory, variants)
    if all(v == "stored" for v in variants):
        return ckpt
    files = list(ckpt.files)
    ranges = dict(ckpt.expert_ranges)
    parts, layouts, layer_variants = dict(ckpt.expert_parts), dict(ckpt.expert_layouts), {}
    for layer, name in enumerate(variants):
        if name == "stored":
            continue
        for e in range(ckpt.config.n_experts):
            old = ExpertKey(layer, e).packed
            ranges.pop(old, None)
            layouts.pop(old, None)
        new_ranges, every = _variant_ranges(ckpt, directory, manifest, files, layer, name)
        ranges.update(new_ranges)
        common = list(Counter(tuple(v) for v in every.values()).most_common(1)[0][0])
        parts[layer] = common
        layouts.update((k, v) for k, v in every.items() if v != common)
        layer_variants[layer] = LOADABLE[name]
    return replace(ckpt, files=files, expert_ranges=ranges, expert_parts=parts, expert_layouts=layouts,
                   layer_variants=layer_variants)


def compose_all(ckpt: Checkpoint, directory: str | Path, variants: list[str]) -> tuple[Checkpoint, list[list[str]]]:
    """ckpt with every loadable variant the ladder built of every layer in its store, each
    under its own keys with its own layout, read in variants[i] for now: a plan switches by
    changing layer_variants (moeedge.ladder.switch). Also each layer's variants."""
    directory = Path(directory)
    manifest = _open(ckpt, directory, variants)
    files, ranges, layouts = list(ckpt.files), dict(ckpt.expert_ranges), dict(ckpt.expert_layouts)
    same: dict[tuple, list] = {}  # equal layouts shared: one native FFN each (ExpertAccess.ffn)
    available = []
    for layer in range(len(ckpt.config.moe_layers)):
        built = manifest["layers"][str(layer)]["variants"]
        names = ["stored"] + [n for n in LOADABLE if n != "stored" and n in built]
        for name in names[1:]:
            new_ranges, every = _variant_ranges(ckpt, directory, manifest, files, layer, name)
            ranges.update(new_ranges)
            layouts.update((k, same.setdefault(tuple(v), v)) for k, v in every.items())
        available.append(names)
    chosen = {layer: LOADABLE[name] for layer, name in enumerate(variants) if name != "stored"}
    return replace(ckpt, files=files, expert_ranges=ranges, expert_layouts=layouts, layer_variants=chosen), available


def read_plan(plan) -> tuple[Path, list[str]]:
    """(ladder directory, variant per MoE layer) from a plan file `moeedge plan -o` wrote
    (a relative ladder path is taken from the file's directory) or such a dict."""
    import json

    base = Path(".")
    if not isinstance(plan, dict):
        path = Path(plan)
        try:
            plan = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"plan {path}: no such file") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"plan {path}: not a plan file (JSON: {e})") from None
        base = path.parent
    ladder, variants = (plan.get("ladder"), plan.get("variants")) if isinstance(plan, dict) else (None, None)
    if not isinstance(ladder, str) or not (isinstance(variants, list) and all(isinstance(v, str) for v in variants)):
        raise ValueError("a plan needs 'ladder' (its directory) and 'variants' (one name per MoE layer)")
    return base / ladder, variants


def apply_plan(ckpt: Checkpoint, plan) -> tuple[Checkpoint, list[str]]:
    directory, variants = read_plan(plan)
    return compose(ckpt, directory, variants), variants
