"""`moeedge ladder SOURCE [-o PACK]`: calibrate the source on training text, build every
MoE layer's variants (moeedge.ladder.variants), then measure each loadable variant end to
end: the model with only that layer changed against the source, on held-out text (KL,
top-1 agreement, perplexity ratio). Both phases go layer by layer and record each layer
in the manifest when it is done (moeedge.ladder.pack), so a build that is interrupted
resumes at the first layer not recorded, with the same calibration (the same training
windows, run again) and the same results."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

import moeedge
from moeedge.aggregate.calibration import calibration_windows, from_routing
from moeedge.aggregate.layer import read_layer
from moeedge.data.corpus import HELD_OUT
from moeedge.derived import open_decoder_source, record_routing
from moeedge.evaluate import corpus_windows, measure
from moeedge.ladder import pack
from moeedge.ladder.variants import LOADABLE, build_layer
from moeedge.quantize import bits as quantize_bits
from moeedge.quantize.writer import write_safetensors

CALIBRATION_TOKENS = 2048
EVAL_TOKENS = 2048
WINDOW = 256
HIT_POLICY = "lru"


def settings(calibration_tokens: int, eval_tokens: int, window: int, ranks: list[int], merge_counts: list[int]) -> dict:
    return {"calibration_tokens": calibration_tokens, "eval_tokens": eval_tokens, "window": window,
            "ranks": sorted(ranks), "merge_counts": sorted(merge_counts), "group": 64,
            "calibration_split": "train", "held_out_packages_excluded": list(HELD_OUT)}


def default_levels(ckpt) -> tuple[list[int], list[int]]:
    """Ranks at 1/2, 1/4 and 1/8 of full, merged layers of E/2 and E/4 experts."""
    cfg = ckpt.config
    top = min(cfg.expert_intermediate, cfg.hidden)
    return [top // 2, top // 4, top // 8], sorted({cfg.n_experts // 2, cfg.n_experts // 4} - {0})


def open_pack(ckpt, out, wanted: dict) -> tuple[Path, dict]:
    out = Path(out) if out is not None else pack.default_dir(ckpt)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest = pack.read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise ValueError(f"-o {out}: not empty and not a ladder (no {pack.MANIFEST})")
        manifest = {"format": pack.FORMAT, "version": pack.VERSION, "source": str(Path(ckpt.source).resolve()),
                    "identity": pack.source_identity(ckpt), "settings": wanted, "layers": {}, "quality": {}}
        pack.write_manifest(out, manifest)
        return out, manifest
    pack.check_source(manifest, ckpt, out)
    if manifest["settings"] != wanted:
        raise ValueError(f"{out}: a ladder built with other settings ({manifest['settings']}); give the same ones "
                         f"to resume it, or another --output")
    return out, manifest


def write_file(path: Path, tensors: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_safetensors(tmp, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], tensors.values())
    os.replace(tmp, path)


def hit_curve(experts: np.ndarray, n_experts: int, policy: str = HIT_POLICY) -> dict:
    """The simulator's hit rate at every cache size (in experts) on a routing trace
    (experts [N, L, K]) under a policy; "predicted" starts from the trace's own pick rates
    (as the runtime starts from its predictor's training counts) without guesses."""
    from moeedge.sim import from_experts
    from moeedge.sim.policies import pick_rate, simulate

    trace = from_experts(experts, n_experts)
    sizes = list(range(trace.step_size, trace.n_keys + 1))
    extra = {"pick_rate": pick_rate(trace, trace.n_keys)} if policy == "predicted" else {}
    return {"policy": policy, "tokens": trace.n_tokens, "capacity_experts": sizes,
            "hit_rate": [simulate(trace, policy, c, **extra).hit_rate for c in sizes]}


def policy_curve(directory: Path, manifest: dict, policy: str) -> dict:
    """The pack's hit-rate curve under the runtime's policy, worked out once from routing.npz."""
    curves = manifest.setdefault("hit_curves", {})
    if policy not in curves:
        with np.load(Path(directory) / pack.ROUTING, allow_pickle=False) as data:
            curves[policy] = hit_curve(data["experts"], int(data["n_experts"]), policy)
        pack.write_manifest(directory, manifest)
    return curves[policy]


def build_layers(model, ckpt, out: Path, manifest: dict, progress: bool, on_layer: Callable | None) -> None:
    s, cfg = manifest["settings"], ckpt.config
    windows = calibration_windows(model.tokenizer, s["calibration_tokens"], s["window"])
    routing = record_routing(model, windows, progress)
    if "hit_curve" not in manifest:
        experts = np.stack([e.numpy() for _, e, _ in routing], axis=1)   # [N, L, K]
        manifest["hit_curve"] = hit_curve(experts, cfg.n_experts)
        np.savez(out / pack.ROUTING, experts=experts, n_experts=cfg.n_experts)
    calibration = from_routing(routing, cfg.n_experts, [len(w) for w in windows])
    expert_bytes = ckpt.layer_expert_nbytes(0)
    for i in range(len(cfg.moe_layers)):
        if str(i) in manifest["layers"]:
            continue
        layer = read_layer(model, i, calibration[i])
        built = build_layer(cfg, layer, quantize_bits.LayerCalibration(*routing[i]), s["ranks"], s["merge_counts"],
                            expert_bytes)
        for b in built:
            if b.tensors is not None:
                write_file(out / pack.layer_file(i, b.name), b.tensors)
        stored = {"id": 0, "loadable": True, "error": 0.0, "bits": None, "resident_bytes": 0,
                  "expert_bytes": [sum(n for _, _, n in ckpt.expert_ranges[ckpt.expert_key(i, e)])
                                   for e in range(cfg.n_experts)]}
        stored["bytes"] = sum(stored["expert_bytes"])
        manifest["layers"][str(i)] = {"variants": {"stored": stored, **{b.name: b.describe() for b in built}}}
        pack.write_manifest(out, manifest)
        if on_layer is not None:
            on_layer("build", i)


def measure_layers(ckpt, out: Path, manifest: dict, memory_budget, progress: bool, on_layer: Callable | None) -> None:
    """Each loadable variant with only its layer changed, against the source, held out."""
    s, n = manifest["settings"], len(ckpt.config.moe_layers)
    if s["eval_tokens"] == 0 or all(str(i) in manifest["quality"] for i in range(n)):
        return
    with moeedge.load(ckpt.source, memory_budget=memory_budget, max_context=s["window"]) as ref:
        windows = corpus_windows(ref.tokenizer, "heldout", s["eval_tokens"], s["window"])
        for i in range(n):
            if str(i) in manifest["quality"]:
                continue
            row = {"stored": {"kl_mean": 0.0, "top1_agreement": 1.0, "ppl_ratio": 1.0}}
            for name in LOADABLE:
                if name == "stored":
                    continue
                plan = {"ladder": str(out), "variants": [name if j == i else "stored" for j in range(n)]}
                with moeedge.load(ckpt.source, memory_budget=memory_budget, max_context=s["window"],
                                  plan=plan) as model:
                    q = measure(model, windows, ref)
                row[name] = {"kl_mean": q.kl_mean, "kl_p99": q.kl_p99, "top1_agreement": q.top1_agreement,
                             "ppl_ratio": q.ppl_ratio, "tokens": q.tokens}
            manifest["quality"][str(i)] = row
            pack.write_manifest(out, manifest)
            if on_layer is not None:
                on_layer("measure", i)


def build_ladder(source=None, out=None, *, calibration_tokens: int = CALIBRATION_TOKENS,
                 eval_tokens: int = EVAL_TOKENS, window: int = WINDOW, ranks: list[int] | None = None,
                 merge_counts: list[int] | None = None, memory_budget: int | str = "auto", progress: bool = False,
                 on_layer: Callable[[str, int], None] | None = None) -> tuple[Path, dict]:
    """Build (or resume) the ladder of `source` in `out` (default: pack.default_dir);
    on_layer(phase, layer) is called after each layer is recorded ("build", "measure")."""
    if calibration_tokens < 2 or eval_tokens < 0 or window < 2:
        raise ValueError(f"--calibration-tokens and --window must be at least 2 and --eval-tokens at least 0, "
                         f"got {calibration_tokens}, {window} and {eval_tokens}")
    ckpt = open_decoder_source(source, "ladder")
    default_ranks, default_merges = default_levels(ckpt)
    wanted = settings(calibration_tokens, eval_tokens, window, default_ranks if ranks is None else ranks,
                      default_merges if merge_counts is None else merge_counts)
    out, manifest = open_pack(ckpt, out, wanted)
    if len(manifest["layers"]) < len(ckpt.config.moe_layers):
        with moeedge.load(ckpt.source, memory_budget=memory_budget, max_context=window) as model:
            if model.tokenizer is None:
                raise ValueError(f"{ckpt.source} has no tokenizer files: calibration needs one")
            build_layers(model, ckpt, out, manifest, progress, on_layer)
    measure_layers(ckpt, out, manifest, memory_budget, progress, on_layer)
    return out, manifest
