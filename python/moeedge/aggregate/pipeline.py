"""`moeedge aggregate`: calibrate, choose experts per layer, build each layer's variant,
write the directory, and measure it against the source on held-out text."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

import moeedge
from moeedge.aggregate import average, merge, prune, variant
from moeedge.aggregate.calibration import DEFAULT_TOKENS, calibration_windows, gather
from moeedge.aggregate.clustering import merge_tree
from moeedge.aggregate.layer import read_layer
from moeedge.aggregate.targets import measure_sensitivity, split_budget
from moeedge.derived import check_output, open_decoder_source
from moeedge.evaluate import DEFAULT_WINDOW, evaluate
from moeedge.train.corpus import HELD_OUT

METHODS = {"merge": merge.build, "average": average.build, "prune": prune.build}
EVAL_TOKENS = 8192


def check_targets(n_experts: int, experts_per_layer: int | None, expert_memory: float | None) -> None:
    if (experts_per_layer is None) == (expert_memory is None):
        raise ValueError("give exactly one target: --experts-per-layer N or --expert-memory FRACTION")
    if experts_per_layer is not None and not 1 <= experts_per_layer <= n_experts:
        raise ValueError(f"--experts-per-layer must be between 1 and {n_experts} (the source's experts per layer), "
                         f"got {experts_per_layer}")
    if expert_memory is not None and not 0 < expert_memory <= 1:
        raise ValueError(f"--expert-memory must be a fraction in (0, 1] of the source's expert bytes, "
                         f"got {expert_memory}")


def aggregate(source, method: str, out, *, experts_per_layer: int | None = None, expert_memory: float | None = None,
              calibration_tokens: int = DEFAULT_TOKENS, eval_tokens: int = EVAL_TOKENS,
              window: int = DEFAULT_WINDOW, memory_budget: int | str = "auto", progress: bool = False) -> dict:
    """Write the variant to `out`; return its description (moeedge_variant.json)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if calibration_tokens < 2 or eval_tokens < 0:
        raise ValueError(f"--calibration-tokens must be at least 2 and --eval-tokens at least 0, "
                         f"got {calibration_tokens} and {eval_tokens}")
    out = Path(out)
    check_output(out)
    ckpt = open_decoder_source(source, "aggregate")
    cfg = ckpt.config
    check_targets(cfg.n_experts, experts_per_layer, expert_memory)
    n_layers = len(cfg.moe_layers)
    expert_bytes = [ckpt.layer_expert_nbytes(i) for i in range(n_layers)]
    if expert_memory is not None and expert_memory * ckpt.expert_nbytes < sum(expert_bytes):
        raise ValueError(f"--expert-memory {expert_memory}: one expert per layer already takes "
                         f"{sum(expert_bytes) / ckpt.expert_nbytes:.4g} of the expert bytes")

    with moeedge.load(ckpt.source, memory_budget=memory_budget, max_context=window) as model:
        if model.tokenizer is None:
            raise ValueError(f"{ckpt.source} has no tokenizer files: calibration needs one")
        windows = calibration_windows(model.tokenizer, calibration_tokens, model.runner.max_context)
        calibration = gather(model, windows, progress)
        layers = [read_layer(model, i, calibration[i]) for i in range(n_layers)]

    build = METHODS[method]
    sensitivity = None
    if experts_per_layer is not None:
        counts = [experts_per_layer] * n_layers
    else:
        sensitivity = measure_sensitivity(layers, build, progress)
        counts = split_budget(sensitivity, expert_bytes, int(expert_memory * ckpt.expert_nbytes))
    variants = [build(layer, n) for layer, n in tqdm(list(zip(layers, counts)), desc=method, unit="layer",
                                                       disable=not progress)]
    meta = {
        "method": method, "source": str(Path(ckpt.source).resolve()),
        "targets": {"experts_per_layer": experts_per_layer, "expert_memory": expert_memory},
        "calibration": {"tokens": sum(map(len, windows)), "windows": len(windows), "split": "train",
                        "held_out_packages_excluded": list(HELD_OUT)},
        "expert_bytes_source": ckpt.expert_nbytes,
        "expert_bytes": sum(n * b for n, b in zip(counts, expert_bytes)),
        "layer_error": [layer.relative_error(v) for layer, v in zip(layers, variants)],
        "sensitivity": sensitivity,
    }
    if method in ("merge", "average"):  # the whole tree: any other granularity is one cut away
        meta["merge_tree"] = [merge_tree(layer)[:, :3].tolist() for layer in layers]
    variant.write(out, ckpt, variants, meta)
    quality = None
    if eval_tokens:
        quality = evaluate(out, reference=ckpt.source, n_tokens=eval_tokens, window=window,
                           memory_budget=memory_budget).as_dict()
    return variant.update(out, quality=quality)
