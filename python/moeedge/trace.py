"""Routing traces: which experts each token picked in each MoE layer, over a text.

The .npz format (format_version 1), read by the prediction and caching work:
- `experts` int32 [tokens, moe_layers, k]: the selected experts in router order
  (Switch: the decoder's layers, k = 1, -1 for a token its expert's capacity dropped);
- `gates` float32, same shape: their gate weights;
- Switch only: `experts_encoder`, `gates_encoder` [source tokens, encoder MoE layers, 1];
- with --hidden: `hidden` float16 [tokens, moe_layers, hidden] (and `hidden_encoder`),
  the hidden state entering each MoE layer's router;
- `tokens` int32 [tokens]; identity: `model` (source path), `model_config` (JSON),
  `text_sha256`, `n_experts`, `top_k`, `format_version`;
- `window`: the text is cut into windows of at most this many tokens, each run as a
  fresh sequence (traces written before it was recorded lack it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from moeedge.api import MoeModel
from moeedge.progress import progress_bar

FORMAT_VERSION = 1


class _Recorder:
    def __init__(self, n_layers: int, hidden: bool):
        self.experts = [[] for _ in range(n_layers)]
        self.gates = [[] for _ in range(n_layers)]
        self.hidden = [[] for _ in range(n_layers)] if hidden else None

    def __call__(self, layer: int, experts: torch.Tensor, gates: torch.Tensor, x: torch.Tensor) -> None:
        self.experts[layer].append(experts.to(torch.int32).numpy())
        self.gates[layer].append(gates.float().numpy())
        if self.hidden is not None:
            self.hidden[layer].append(x.to(torch.float16).numpy())

    def stacked(self, layers: range, prefix: str = "", suffix: str = "") -> dict[str, np.ndarray]:
        out = {f"experts{suffix}": np.stack([np.concatenate(self.experts[i]) for i in layers], axis=1),
               f"gates{suffix}": np.stack([np.concatenate(self.gates[i]) for i in layers], axis=1)}
        if self.hidden is not None:
            out[f"hidden{suffix}"] = np.stack([np.concatenate(self.hidden[i]) for i in layers], axis=1)
        return out


def _config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), default=str, sort_keys=True)


def record(model: MoeModel, text: str, hidden: bool = False, window: int = 512,
           max_tokens: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Run the model over text and return the trace arrays."""
    if model.tokenizer is None:
        raise ValueError(f"{model.checkpoint.source} has no tokenizer: a trace needs one")
    ids = model.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text is too short to trace (fewer than 2 tokens)")
    window = min(window, model.runner.max_context)
    cfg = model.config
    n_layers = cfg.moe_layers if isinstance(cfg.moe_layers, int) else len(cfg.moe_layers)
    recorder = _Recorder(n_layers, hidden)
    with model.recording(recorder), progress_bar(total=len(ids), desc="trace", unit="tok", show=progress) as bar:
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            if model.encoder_decoder:
                model.logits(chunk, [cfg.decoder_start_token_id] + chunk[:-1])
            else:
                model.logits(chunk)
            bar.update(len(chunk))
    out = {"tokens": np.asarray(ids, dtype=np.int32)}
    if model.encoder_decoder:
        n_enc = len(cfg.encoder_moe_blocks)
        out.update(recorder.stacked(range(n_enc), suffix="_encoder"))
        out.update(recorder.stacked(range(n_enc, n_layers)))
    else:
        out.update(recorder.stacked(range(n_layers)))
    out.update(model=np.asarray(model.checkpoint.source), model_config=np.asarray(_config_json(cfg)),
               text_sha256=np.asarray(hashlib.sha256(text.encode()).hexdigest()),
               n_experts=np.asarray(cfg.n_experts), top_k=np.asarray(cfg.top_k), window=np.asarray(window),
               format_version=np.asarray(FORMAT_VERSION))
    return out


def save(trace: dict[str, np.ndarray], path: str | Path) -> Path:
    path = Path(path)
    np.savez_compressed(path, **trace)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
