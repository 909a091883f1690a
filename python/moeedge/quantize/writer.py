"""`moeedge quantize SOURCE --bits 8|4 [--group G] [--per-expert-bits auto --target-bits B] -o OUT`:
a Hugging Face decoder MoE directory with its experts in moeedge's group-wise int8/int4
(the directory's format: moeedge.formats.quant_checkpoint; the weights':
moeedge.formats.group_quant; how per-expert bits are chosen: moeedge.quantize.bits).

The output is assembled beside OUT and renamed into place when complete; model.safetensors
is written one tensor at a time (its header is planned first), so only one expert is in
memory at once. Afterwards the new model is measured against the source on held-out text
(moeedge.evaluate), and the figures go into moeedge_quant.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from moeedge.progress import progress_bar

from moeedge.derived import check_output, open_decoder_source, publish
from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.group_quant import BITS, GROUP_SIZES, qweight_shape, quantize, scales_shape
from moeedge.formats.hf_config import DecoderConfig
from moeedge.formats.quant_checkpoint import FORMAT, QUANT_FILE, VERSION, expert_matrices
from moeedge.formats.safetensors_file import DTYPES
from moeedge.formats.quant_tensor import QuantTensor
from moeedge.units import format_bytes
from moeedge._core import ExpertStore

DEFAULT_GROUP = 64
CALIBRATION_TOKENS = 4096
EVAL_TOKENS = 8192
WINDOW = 256
# The routers stay as they are, so the source's trained expert predictors still apply.
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def check_options(bits: int | None, group: int, per_expert_bits: str | None, target_bits: float | None) -> None:
    if per_expert_bits is None:
        if bits not in BITS:
            raise ValueError(f"--bits must be 8 or 4, got {bits}")
        if target_bits is not None:
            raise ValueError("--target-bits goes with --per-expert-bits auto")
    else:
        if per_expert_bits != "auto":
            raise ValueError(f"--per-expert-bits must be 'auto', got {per_expert_bits!r}")
        if bits is not None:
            raise ValueError("--bits and --per-expert-bits auto exclude each other (auto gives each expert 4 or 8)")
        if target_bits is None or not 4 <= target_bits <= 8:
            raise ValueError(f"--per-expert-bits auto needs --target-bits between 4 and 8, got {target_bits}")
    if group not in GROUP_SIZES:
        raise ValueError(f"--group must be one of {', '.join(map(str, GROUP_SIZES))}, got {group}")


def open_source(source) -> Checkpoint:
    return open_decoder_source(source, "quantize")


class ExpertReader:
    """Each expert's matrices by role, in fp32 (dequantized where stored quantized), read
    one expert at a time."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.store = ExpertStore(ckpt.files, ckpt.expert_ranges)

    def __call__(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        raw = torch.frombuffer(bytearray(self.store.read(self.ckpt.expert_key(layer, expert))), dtype=torch.uint8)
        out = {}
        for p in self.ckpt.parts_of(layer, expert):
            b = raw[p.offset:p.offset + p.nbytes]
            if p.quant is not None:
                out[p.role] = QuantTensor(b, p.quant, p.shape).dequantize(torch.float32)
            else:
                out[p.role] = b.view(p.dtype).view(p.shape).float()
        return out


# --------------------------------------------------------------------------- writing

def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors) -> None:
    """A .safetensors file of the planned entries (name, dtype, shape), in that order, taking
    the tensors one at a time from the iterable `tensors`."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for (name, dtype, shape), t in zip(entries, tensors, strict=True):
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise RuntimeError(f"{name}: planned {dtype}{list(shape)}, got {t.dtype}{list(t.shape)}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _entries(dense: dict[str, torch.Tensor], cfg: DecoderConfig, bits: list[list[int]], group: int):
    """(name, dtype, shape) of every output tensor in file order: the dense tensors by item
    size (each then starts aligned to its items), then each expert's matrices."""
    entries = sorted(((n, t.dtype, tuple(t.shape)) for n, t in dense.items()), key=lambda e: (-e[1].itemsize, e[0]))
    for layer, row in enumerate(bits):
        for e, b in enumerate(row):
            for _, base, shape in expert_matrices(cfg, layer, e):
                entries.append((base + ".qweight", torch.int8 if b == 8 else torch.uint8, qweight_shape(b, shape)))
                entries.append((base + ".scales", torch.float16, scales_shape(group, shape)))
    return entries


def _tensors(entries, dense, cfg, reader, bits, group, progress):
    for name, _, _ in entries[:len(dense)]:
        yield dense[name]
    bar = progress_bar(total=sum(map(len, bits)), desc="quantize", unit="expert", show=progress)
    for layer, row in enumerate(bits):
        for e, b in enumerate(row):
            w = reader(layer, e)
            for role, _, _ in expert_matrices(cfg, layer, e):
                yield from quantize(w[role], b, group)
            bar.update()
    bar.close()


def write(out: Path, ckpt: Checkpoint, reader: ExpertReader, bits: list[list[int]], group: int, meta: dict,
          progress: bool = False) -> None:
    """The output directory; the dense tensors are held in memory (as the runtime holds
    them), the experts one at a time."""
    dense = {name: ckpt.read_dense(name) for name in ckpt.dense_names}
    entries = _entries(dense, ckpt.config, bits, group)
    with publish(out, ckpt) as staging:
        write_safetensors(staging / "model.safetensors", entries,
                          _tensors(entries, dense, ckpt.config, reader, bits, group, progress))
        write_meta(staging, meta)


def write_meta(directory: Path, meta: dict) -> None:
    """moeedge_quant.json, one top-level key per line."""
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items())
    (directory / QUANT_FILE).write_text("{\n" + body + "\n}\n")


# --------------------------------------------------------------------------- the pipeline

def select_bits(ckpt: Checkpoint, reader: ExpertReader, group: int, target_bits: float, calibration_tokens: int,
                window: int, memory_budget, progress: bool) -> tuple[list[list[int]], dict]:
    """--per-expert-bits auto: bits per expert, and how they were chosen."""
    import moeedge
    from moeedge.quantize import bits as quantize_bits
    from moeedge.evaluate import corpus_windows
    from moeedge.data.corpus import HELD_OUT

    with moeedge.load(ckpt.source, memory_budget=memory_budget, max_context=window) as model:
        if model.tokenizer is None:
            raise ValueError(f"{ckpt.source} has no tokenizer files: calibration needs one")
        windows = corpus_windows(model.tokenizer, "train", calibration_tokens, model.runner.max_context)
        calibration = quantize_bits.gather(model, windows, progress)
    sensitivity = quantize_bits.measure(calibration, reader, ckpt.config.n_experts, group, progress)
    selection = {"method": "auto", "target_bits": target_bits,
                 "calibration": {"tokens": sum(map(len, windows)), "windows": len(windows), "split": "train",
                                 "held_out_packages_excluded": list(HELD_OUT)},
                 "sensitivity": sensitivity}
    return quantize_bits.choose_bits(sensitivity, target_bits), selection


def quantize_checkpoint(source, out, *, bits: int | None = None, group: int = DEFAULT_GROUP,
                        per_expert_bits: str | None = None, target_bits: float | None = None,
                        calibration_tokens: int = CALIBRATION_TOKENS, eval_tokens: int = EVAL_TOKENS,
                        window: int = WINDOW, memory_budget: int | str = "auto", progress: bool = False) -> dict:
    """Write the quantized checkpoint to `out`; return its description (moeedge_quant.json)."""
    check_options(bits, group, per_expert_bits, target_bits)
    if calibration_tokens < 2 or eval_tokens < 0:
        raise ValueError(f"--calibration-tokens must be at least 2 and --eval-tokens at least 0, "
                         f"got {calibration_tokens} and {eval_tokens}")
    out = Path(out)
    check_output(out)
    ckpt = open_source(source)
    cfg = ckpt.config
    reader = ExpertReader(ckpt)
    selection = None
    if per_expert_bits is None:
        layer_bits = [[bits] * cfg.n_experts for _ in cfg.moe_layers]
    else:
        layer_bits, selection = select_bits(ckpt, reader, group, target_bits, calibration_tokens, window,
                                            memory_budget, progress)
    weights = sum(math.prod(shape) for _, _, shape in expert_matrices(cfg, 0, 0))  # per expert
    expert_bytes = sum(math.prod(qweight_shape(b, shape)) + 2 * math.prod(scales_shape(group, shape))
                       for layer, row in enumerate(layer_bits) for e, b in enumerate(row)
                       for _, _, shape in expert_matrices(cfg, layer, e))
    n_experts = sum(map(len, layer_bits))
    meta = {"format": FORMAT, "version": VERSION, "group_size": group, "bits": layer_bits,
            "bits_average": sum(map(sum, layer_bits)) / n_experts,
            "bits_per_weight": 8 * expert_bytes / (weights * n_experts),  # scales included
            "source": str(Path(ckpt.source).resolve()),
            "expert_bytes_source": ckpt.expert_nbytes, "expert_bytes": expert_bytes,
            "selection": selection, "quality": None}
    write(out, ckpt, reader, layer_bits, group, meta, progress)
    if eval_tokens:
        from moeedge.evaluate import evaluate

        meta["quality"] = evaluate(out, reference=ckpt.source, n_tokens=eval_tokens, window=window,
                                   memory_budget=memory_budget, progress=progress).as_dict()
        write_meta(out, meta)
    return meta


def describe(meta: dict, out: str) -> str:
    before, after = meta["expert_bytes_source"], meta["expert_bytes"]
    lines = [f"{out}: experts in int4/int8, groups of {meta['group_size']}, {meta['bits_average']:.2f} bits "
             f"per expert weight on average ({meta['bits_per_weight']:.3f} with the scales)",
             f"expert bytes: {format_bytes(before)} -> {format_bytes(after)} ({100 * after / before:.1f}%)"]
    q = meta["quality"]
    if q is not None:
        lines.append(f"held-out quality against the source ({q['tokens']} tokens): perplexity {q['ppl']:.3f} vs "
                     f"{q['ppl_reference']:.3f} (ratio {q['ppl_ratio']:.4f}), KL mean {q['kl_mean']:.4f} "
                     f"p99 {q['kl_p99']:.4f} nats/token, top-1 agreement {100 * q['top1_agreement']:.2f}%")
    return "\n".join(lines)
