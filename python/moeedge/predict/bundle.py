"""What the trace-trained predictors learn from a training trace, in one file.

`moeedge_predictor.safetensors`, beside a checkpoint or anywhere (no pickle):
- `prior` float32 [L, E]: how often each expert was picked (+1);
- `history.stored` [S, L, E] and `history.transitions` [D, L, E, E] (History);
- `learned.l{layer}.d{lookahead}.{0,2}.{weight,bias}`: the learned MLPs, in fp16 (half the
  bytes of fp32, which the bundled model's 20 MB allowance needs; held-out recall moved by
  at most 0.001), computed in fp32;
- metadata `moeedge_predictor`: JSON with the format, shapes and what it was trained on.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moeedge.predict.learned import DEPTH, LOOKAHEAD, WIDTH, LearnedPredictor, make_net, train_learned
from moeedge.predict.metrics import RoutingTrace
from moeedge.predict.predictors import History, build_history

FORMAT = "moeedge-predictor/1"
FILENAME = "moeedge_predictor.safetensors"


@dataclass
class Bundle:
    prior: torch.Tensor
    history: History
    learned: LearnedPredictor
    meta: dict

    def save(self, path: str | Path) -> Path:
        tensors = {"prior": self.prior, "history.stored": self.history.stored,
                   "history.transitions": self.history.transitions}
        for (layer, d), net in self.learned.nets.items():
            for name, p in net.state_dict().items():
                tensors[f"learned.l{layer}.d{d}.{name}"] = p.half()
        meta = {**self.meta, "format": FORMAT, "learned": self.learned.meta}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"moeedge_predictor": json.dumps(meta)})
        return Path(path)


def train_bundle(trace: RoutingTrace, max_lookahead: int = LOOKAHEAD, epochs: int = 8, seed: int = 0,
                 progress=None, width: int = WIDTH, depth: int = DEPTH, jobs: int = 1) -> Bundle:
    start = time.perf_counter()
    history = build_history(trace.experts, trace.windows, trace.n_experts, max_lookahead)
    learned = train_learned(trace.hidden, trace.experts, trace.n_experts, trace.windows, max_lookahead, width, depth,
                            epochs, seed, progress, trace.source, jobs)
    meta = {"n_layers": trace.n_layers, "n_experts": trace.n_experts, "top_k": trace.top_k,
            "max_lookahead": max_lookahead, "train_trace": trace.source, "model": trace.model,
            "train_tokens": int(trace.experts.shape[0]), "train_seconds": round(time.perf_counter() - start, 1)}
    return Bundle(history.prior, history, learned, meta)


def load_bundle(path: str | Path, n_layers: int | None = None, n_experts: int | None = None) -> Bundle:
    """A saved bundle; ValueError naming the file and the problem otherwise (also when it
    was trained for a model with other layer or expert counts)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("moeedge_predictor", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a moeedge predictor file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a moeedge predictor file (no {FORMAT!r} metadata)")
    for name, want in (("n_layers", n_layers), ("n_experts", n_experts)):
        if want is not None and meta[name] != want:
            raise ValueError(f"{path}: trained for {meta[name]} {name[2:]}, this model has {want}")
    prior = tensors["prior"]
    history = History(prior, tensors["history.stored"], tensors["history.transitions"])
    lm = meta["learned"]
    nets = {}
    for layer in range(meta["n_layers"]):
        for d in range(1, lm["max_lookahead"] + 1):
            p = f"learned.l{layer}.d{d}."
            state = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
            if state:
                net = make_net(lm["hidden"], meta["n_experts"], lm["width"], lm.get("previous", False),
                               lm.get("depth", 1))
                net.load_state_dict(state)
                nets[(layer, d)] = net.eval()
    return Bundle(prior, history, LearnedPredictor(prior, nets, lm), meta)

