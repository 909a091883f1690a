"""What the commands that derive a checkpoint from another (`moeedge aggregate`,
`moeedge quantize`) share: the sources they take, the calibration pass over training
text, and writing the new directory so that a failure leaves nothing half-written."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from moeedge.progress import progress_bar

from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.hf_config import DecoderConfig

COPIED = ("config.json", "generation_config.json", "moeedge_predictor.safetensors")


def open_decoder_source(source, command: str, variants: bool = False) -> Checkpoint:
    """The source checkpoint if `command` can derive from it: a Hugging Face directory of a
    decoder-only MoE that is not already a derived variant (variants: an aggregated one may
    be) (ValueError saying why not)."""
    from moeedge.formats.open import open_checkpoint, resolve_source
    from moeedge.formats.quant_checkpoint import QUANT_FILE

    source = resolve_source(source)  # a repo id: its snapshot, or the GGUF file its tag names
    if Path(source).is_file():
        raise ValueError(f"{source}: {command} reads Hugging Face checkpoint directories (Mixtral, Qwen2-MoE, "
                         f"OLMoE); GGUF files are not supported")
    ckpt = open_checkpoint(source)
    if not isinstance(ckpt.config, DecoderConfig):
        raise ValueError(f"{ckpt.source}: Switch Transformers checkpoints are not supported by {command} "
                         f"(decoder-only Mixtral, Qwen2-MoE, OLMoE are)")
    if ckpt.config.expert_map is not None and not variants:
        raise ValueError(f"{ckpt.source}: an aggregated variant; {command} its source instead")
    if (Path(ckpt.source) / QUANT_FILE).is_file() or any(p.quant for ps in ckpt.expert_parts.values() for p in ps):
        raise ValueError(f"{ckpt.source}: its experts are quantized; {command} the unquantized source instead")
    return ckpt


def record_routing(model, windows: list[list[int]], progress: bool = False
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the loaded model over the windows; per MoE layer (hidden [N, H] fp32 entering
    it, experts [N, K], gates [N, K] fp32), from the runtime's recorder hook."""
    seen: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in model.config.moe_layers]

    def record(layer: int, experts: torch.Tensor, gates: torch.Tensor, x: torch.Tensor) -> None:
        seen[layer].append((x.float().clone(), experts.clone(), gates.float().clone()))

    with model.recording(record):
        for w in progress_bar(windows, desc="calibration", unit="window", show=progress):
            model.logits(w)
    return [tuple(torch.cat(parts) for parts in zip(*layer)) for layer in seen]


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"-o {out}: exists and is not an empty directory")
    if not out.parent.is_dir():
        raise ValueError(f"-o {out}: the directory {out.parent} does not exist")


@contextlib.contextmanager
def publish(out: Path, ckpt: Checkpoint) -> Iterator[Path]:
    """A staging directory beside `out`, holding the source's config and tokenizer files;
    it becomes `out` when the block ends, and is removed if the block fails."""
    check_output(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name in COPIED:
            if (Path(ckpt.source) / name).is_file():
                shutil.copyfile(Path(ckpt.source) / name, staging / name)
        for name, path in ckpt.tokenizer_files.items():
            shutil.copyfile(path, staging / name)
        yield staging
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
