"""`moeedge aggregate`: calibrate, choose each layer's level (experts kept, or the rank of
its low-rank factors), build each layer's variant (then distill it, for distill), write the
directory, and measure it against the source on held-out text. Sources: decoder-only
(Mixtral, Qwen2-MoE, OLMoE) and Switch Transformers checkpoints, whose MoE layers are the
encoder's and then the decoder's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeedge.progress import progress_bar

import moeedge
from moeedge.aggregate import average, distill, lowrank, merge, prune, targets, variant
from moeedge.aggregate.calibration import (DEFAULT_TOKENS, calibration_examples, calibration_windows, gather,
                                           gather_switch)
from moeedge.aggregate.clustering import merge_tree
from moeedge.aggregate.layer import MoeLayer, read_layer
from moeedge.aggregate.merge import usage_weights
from moeedge.aggregate.targets import choose_levels
from moeedge.formats.open import open_checkpoint, resolve_source
from moeedge.derived import check_output, open_decoder_source, publish
from moeedge.evaluate import DEFAULT_WINDOW, evaluate
from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.switch_config import SwitchConfig
from moeedge.runtime.measure import resolve_budget
from moeedge.data.corpus import HELD_OUT

METHODS = ("merge", "average", "prune", "lowrank", "distill")
BUILDERS = {"merge": merge.build, "average": average.build, "prune": prune.build, "lowrank": lowrank.build}
DISTILL_FROM = ("merge", "lowrank")
EVAL_TOKENS = 8192


def open_source(source) -> Checkpoint:
    """A Switch Transformers directory that is not already a variant, or a decoder source
    as moeedge.derived.open_decoder_source checks it (ValueError saying why not)."""
    source = resolve_source(source)
    if not source.is_dir():
        return open_decoder_source(source, "aggregate")
    ckpt = open_checkpoint(source)
    if not isinstance(ckpt.config, SwitchConfig):
        return open_decoder_source(source, "aggregate")
    if ckpt.config.expert_map is not None:
        raise ValueError(f"{ckpt.source}: an aggregated variant; aggregate its source instead")
    if "tokenizer.model" not in ckpt.tokenizer_files:
        raise ValueError(f"{ckpt.source} has no tokenizer.model: the corpus is encoded with the Switch "
                         f"model's sentencepiece model")
    return ckpt


def calibrate(model, n_tokens: int, progress: bool) -> tuple[list, int, int]:
    """(per MoE layer calibration, tokens (Switch: encoder inputs), windows) from the training split."""
    if model.tokenizer is None:
        raise ValueError(f"{model.checkpoint.source} has no tokenizer files: calibration needs one")
    if model.encoder_decoder:
        examples = calibration_examples(model.tokenizer, model.config.vocab, n_tokens, model.runner.max_context)
        return gather_switch(model, examples, progress), sum(len(i) for i, _ in examples), len(examples)
    windows = calibration_windows(model.tokenizer, n_tokens, model.runner.max_context)
    return gather(model, windows, progress), sum(map(len, windows)), len(windows)


def check_method(method: str, distill_from: str | None) -> str:
    """The method whose variant is built first: distill's starting point, else the method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if method != "distill":
        if distill_from is not None:
            raise ValueError(f"--from is for --method distill, not {method}")
        return method
    if distill_from not in DISTILL_FROM:
        raise ValueError("--method distill starts from a variant: give --from merge or --from lowrank"
                         + ("" if distill_from is None else f" (got {distill_from!r})"))
    return distill_from


def check_targets(cfg, built: str, experts_per_layer: int | None, rank: int | None,
                  expert_memory: float | None) -> None:
    """built: the method whose knob the target sets (lowrank: a rank; the others: experts)."""
    if sum(t is not None for t in (experts_per_layer, rank, expert_memory)) != 1:
        raise ValueError("give exactly one target: --experts-per-layer N, --rank R or --expert-memory FRACTION")
    if rank is not None and built != "lowrank":
        raise ValueError("--rank is a target of lowrank and distill --from lowrank only: "
                         "give --experts-per-layer N or --expert-memory FRACTION")
    if experts_per_layer is not None and built == "lowrank":
        raise ValueError("--experts-per-layer is not a target of lowrank (nor of distill --from lowrank): "
                         "give --rank R or --expert-memory FRACTION")
    if experts_per_layer is not None and not 1 <= experts_per_layer <= cfg.n_experts:
        raise ValueError(f"--experts-per-layer must be between 1 and {cfg.n_experts} (the source's experts per "
                         f"layer), got {experts_per_layer}")
    top = min(cfg.expert_intermediate, cfg.hidden)
    if rank is not None and not 0 <= rank <= top:
        raise ValueError(f"--rank must be between 0 and {top} (full rank: the smaller of the experts' "
                         f"intermediate {cfg.expert_intermediate} and hidden {cfg.hidden} sizes), got {rank}")
    if expert_memory is not None and not 0 < expert_memory <= 1:
        raise ValueError(f"--expert-memory must be a fraction in (0, 1] of the source's expert bytes, "
                         f"got {expert_memory}")


def level_nbytes(built: str, layer: MoeLayer, level: int, expert_bytes: int) -> tuple[int, int]:
    """(offloadable expert bytes, resident base bytes) of a layer at a level of the knob."""
    return lowrank.memory_nbytes(layer, level) if built == "lowrank" else (level * expert_bytes, 0)


def layer_levels(built: str, layer: MoeLayer) -> list[int]:
    """The knob's values a memory target chooses among: ranks, or experts per layer."""
    return lowrank.levels(layer) if built == "lowrank" else list(range(1, layer.n_experts + 1))


def layer_sensitivity(layer: MoeLayer, built: str, expert_bytes: int) -> tuple[list[int], list[float], list[int]]:
    """(the knob's levels, the layer's output error at each, its bytes at each)."""
    grid = layer_levels(built, layer)
    return (grid, targets.sensitivity(layer, BUILDERS[built], grid),
            [sum(level_nbytes(built, layer, n, expert_bytes)) for n in grid])


# What aggregating one layer holds beside the source model, in multiples of the layer's
# experts in fp32: its copy, the variant and what the method computes from them (seen on
# Switch-Base-128 with prune: 9.0 GB peak for a 3 GiB model and 2.4 GB layers).
LAYER_WORKING_SET = 3
# Distillation's refinement also holds, per stored weight, its fp32 copy being fitted, its
# gradient, Adam's two moments and the best state so far (full-size Switch-Base-128 from
# merge at 38 experts: 15.1 GiB peak RSS in a 12 GiB budget before this was reserved).
REFINE_COPIES = 5


def layer_working_set(ckpt: Checkpoint, layer: int, built: str, refined: float = 0.0) -> int:
    """Bytes aggregating MoE layer `layer` holds beside the source model: LAYER_WORKING_SET
    fp32 copies of its experts, and for lowrank (distill from it too) the float64 SVD of
    each matrix's difference from the base, kept for every rank the layer tries (U, S and Vh
    of all E experts), with one matrix's difference in float64 and LAPACK's workspace while
    it is decomposed (gesdd: about 4k^2 + 8k + max(rows, cols) doubles, k = min(rows, cols);
    without it a 3 GiB budget peaked 1.4 MiB above 3 GiB on mixtral-medium). refined: for
    distillation, what the variant stores as a share of the layer's experts (REFINE_COPIES
    of it)."""
    n = ckpt.config.n_experts
    shapes = [part.shape for part in ckpt.expert_parts[layer]]
    layer_bytes = n * sum(rows * cols for rows, cols in shapes) * 4
    total = LAYER_WORKING_SET * layer_bytes + int(REFINE_COPIES * refined * layer_bytes)
    if built == "lowrank":
        total += sum(n * 8 * min(rows, cols) * (rows + 1 + cols) for rows, cols in shapes)
        total += max(8 * (n * rows * cols + 4 * min(rows, cols) ** 2 + 8 * min(rows, cols) + max(rows, cols))
                     for rows, cols in shapes)
    return total


def source_budget(memory_budget: int | str, ckpt: Checkpoint, built: str = "merge", refined: float = 0.0) -> int | str:
    """The source model's budget when the whole process may use `memory_budget`: what is
    left after the largest layer's working set ("min" where that leaves too little)."""
    if isinstance(memory_budget, str) and memory_budget.strip().lower() == "min":
        return "min"
    largest = max(layer_working_set(ckpt, i, built, refined) for i in range(len(ckpt.expert_parts)))
    left = resolve_budget(memory_budget) - largest
    return left if left > 0 else "min"


def stored_share(ckpt: Checkpoint, built: str, experts_per_layer: int | None, rank: int | None) -> float:
    """What a variant stores per layer as a share of the source's experts: at most all of
    them under --expert-memory, whose split across layers is not known yet."""
    n = ckpt.config.n_experts
    if experts_per_layer is not None:
        return experts_per_layer / n
    if rank is not None:  # one base, and per expert a and b of each part
        return min(1.0, max(1 / n + rank * (rows + cols) / (rows * cols)
                            for i in range(len(ckpt.expert_parts)) for rows, cols in (p.shape for p in ckpt.expert_parts[i])))
    return 1.0


@dataclass
class BuiltLayer:
    """What the variant keeps of one MoE layer once the layer's fp32 copy is gone."""
    table: list[int]                  # router output -> stored expert, -1: dropped
    count: int                        # stored experts
    nbytes: tuple[int, int]           # (offloadable expert bytes, resident base bytes)
    error: float                      # relative output error on the calibration states
    report: dict | None               # distillation's
    base_weights: list[float] | None  # lowrank's usage weights
    merge_tree: list | None           # merge's and average's clustering tree


def build_layer(ckpt: Checkpoint, layer: MoeLayer, built: str, level: int, expert_bytes: int,
                shards: variant.ShardWriter, *, distilled: bool) -> BuiltLayer:
    """The layer's variant, written as its shard; what the description needs of it."""
    v = BUILDERS[built](layer, level)
    if distilled:
        v = distill.distill(layer, v)
    dtype = ckpt.expert_parts[layer.index][0].dtype
    shards.write({name: t.to(dtype).contiguous() for name, t in variant.stored_tensors(ckpt, layer.index, v).items()})
    return BuiltLayer(v.table, len(v.experts), level_nbytes(built, layer, level, expert_bytes),
                      layer.relative_error(v), v.report,
                      usage_weights(layer, list(range(layer.n_experts))).tolist() if built == "lowrank" else None,
                      merge_tree(layer)[:, :3].tolist() if built in ("merge", "average") else None)


def description(ckpt: Checkpoint, method: str, built: str, distill_from: str | None, targets_given: dict,
                calibration: dict, built_layers: list[BuiltLayer], levels: list[int], sensitivity, grids,
                held) -> dict:
    """moeedge_variant.json's fields, less the per-layer tables variant.write_meta adds."""
    stored = [bl.nbytes for bl in built_layers]
    meta = {
        "method": method, "source": str(Path(ckpt.source).resolve()), "targets": targets_given,
        "calibration": calibration,
        "expert_bytes_source": ckpt.expert_nbytes,
        "expert_bytes": sum(e for e, _ in stored),   # offloadable: what the runtime caches and fetches
        "base_bytes": sum(b for _, b in stored),     # low-rank bases, resident with the dense weights
        "layer_error": [bl.error for bl in built_layers],
        "sensitivity": sensitivity,
    }
    if built == "lowrank":
        meta["ranks"] = levels
        meta["sensitivity_ranks"] = grids
        meta["base_weights"] = [bl.base_weights for bl in built_layers]
    if method == "distill":
        meta["distill"] = {"from": distill_from, "fitted_tokens": int((~held).sum()), "held_out_tokens": int(held.sum()),
                           **{k: [bl.report[k] for bl in built_layers] for k in built_layers[0].report}}
    if built in ("merge", "average"):  # the whole tree: any other granularity is one cut away
        meta["merge_tree"] = [bl.merge_tree for bl in built_layers]
    return meta


def aggregate(source, method: str, out, *, experts_per_layer: int | None = None, rank: int | None = None,
              expert_memory: float | None = None, distill_from: str | None = None,
              calibration_tokens: int = DEFAULT_TOKENS, eval_tokens: int = EVAL_TOKENS,
              window: int = DEFAULT_WINDOW, memory_budget: int | str = "auto", progress: bool = False) -> dict:
    """Write the variant to `out`; return its description (moeedge_variant.json)."""
    built = check_method(method, distill_from)
    if calibration_tokens < 2 or eval_tokens < 0:
        raise ValueError(f"--calibration-tokens must be at least 2 and --eval-tokens at least 0, "
                         f"got {calibration_tokens} and {eval_tokens}")
    out = Path(out)
    check_output(out)
    ckpt = open_source(source)
    cfg = ckpt.config
    check_targets(cfg, built, experts_per_layer, rank, expert_memory)
    n_layers = len(ckpt.expert_parts)
    expert_bytes = [ckpt.layer_expert_nbytes(i) for i in range(n_layers)]
    if expert_memory is not None and expert_memory * ckpt.expert_nbytes < sum(expert_bytes):
        raise ValueError(f"--expert-memory {expert_memory}: one expert per layer already takes "
                         f"{sum(expert_bytes) / ckpt.expert_nbytes:.4g} of the expert bytes")

    # One layer's fp32 copy at a time (Switch-Base-128's are 2.4 GB each, 29 GB in all): the
    # sensitivity pass and the build pass each read the layers one by one from the model,
    # and each layer's shard is written as soon as it is built.
    refined = stored_share(ckpt, built, experts_per_layer, rank) if method == "distill" else 0.0
    with publish(out, ckpt) as staging, moeedge.load(ckpt.source,
                                                    memory_budget=source_budget(memory_budget, ckpt, built, refined),
                                                    max_context=window) as model:
        calibration, calibration_total, n_windows = calibrate(model, calibration_tokens, progress)

        def layer(i: int) -> MoeLayer:  # passed straight to its user, so it is freed before the next is read
            return read_layer(model, i, calibration[i])

        def each_layer(desc: str):
            return progress_bar(range(n_layers), desc=desc, unit="layer", show=progress)

        sensitivity, grids = None, None
        if expert_memory is None:
            levels = [experts_per_layer if rank is None else rank] * n_layers
        else:  # distill: split by its starting method's errors (distilling every level would cost too much)
            measured = [layer_sensitivity(layer(i), built, expert_bytes[i]) for i in each_layer("sensitivity")]
            grids, sensitivity, level_bytes = (list(m) for m in zip(*measured))
            chosen = choose_levels(sensitivity, level_bytes, int(expert_memory * ckpt.expert_nbytes))
            levels = [grid[i] for grid, i in zip(grids, chosen)]
        shards = variant.ShardWriter(staging, 1 + n_layers)
        variant.write_dense(shards, ckpt)
        built_layers = [build_layer(ckpt, layer(i), built, levels[i], expert_bytes[i], shards,
                                    distilled=method == "distill") for i in each_layer(method)]
        shards.finish()
        held = calibration[0].held_out
        meta = description(ckpt, method, built, distill_from,
                           {"experts_per_layer": experts_per_layer, "rank": rank, "expert_memory": expert_memory},
                           {"tokens": calibration_total, "windows": n_windows, "split": "train",
                            "held_out_packages_excluded": list(HELD_OUT)},
                           built_layers, levels, sensitivity, grids, held)
        variant.write_meta(staging, built_layers, meta)
    quality = None
    if eval_tokens:
        quality = evaluate(out, reference=ckpt.source, n_tokens=eval_tokens, window=window,
                           memory_budget=memory_budget, progress=progress).as_dict()
    return variant.update(out, quality=quality)
