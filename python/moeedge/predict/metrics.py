"""How well a predictor guesses the experts 1..3 MoE layers ahead, on a held-out trace.

The trace is replayed through the predictor's online calls (observe, then scores),
sequence by sequence, token by token: a stateless predictor gets a whole sequence's
tokens in one call, which gives the same scores. For each token, source layer and
lookahead d, the predictor's top-n experts at layer + d are compared with the
experts the token really picked there:
  recall@n    = |top-n & picked| / |picked|
  precision@n = |top-n & picked| / n
reported per target layer and over all layers, for n = k (a prefetch as big as the
need) and n = 2k.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeedge.predict.predictors import Predictor


@dataclass
class RoutingTrace:
    """A decoder trace for prediction: experts [N, L, K], hidden [N, L, H] or None, and
    its sequences as [start, stop) token ranges."""

    experts: torch.Tensor
    hidden: torch.Tensor | None
    windows: list[tuple[int, int]]
    n_experts: int
    model: str = ""
    source: str = ""

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def tokens(self, start: int, stop: int | None = None) -> "RoutingTrace":
        """Tokens start..stop, their sequences cut at the ends."""
        stop = len(self.experts) if stop is None else min(stop, len(self.experts))
        windows = [(max(a, start) - start, min(b, stop) - start) for a, b in self.windows if a < stop and b > start]
        return RoutingTrace(self.experts[start:stop], None if self.hidden is None else self.hidden[start:stop],
                            windows, self.n_experts, self.model, self.source)


def load_routing(path: str | Path, need_hidden: bool = False) -> RoutingTrace:
    """A decoder routing trace; ValueError naming the file and what is missing otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a routing trace (.npz): {e}") from None
    if "experts" not in data or "n_experts" not in data:
        raise ValueError(f"{path}: not a routing trace: no 'experts' / 'n_experts'")
    if "experts_encoder" in data:
        raise ValueError(f"{path}: an encoder-decoder (Switch) trace; expert prediction covers decoder-only models")
    if need_hidden and "hidden" not in data:
        raise ValueError(f"{path}: recorded without hidden states; record it with `moeedge trace --hidden`")
    experts = torch.from_numpy(data["experts"].astype(np.int64))
    n = experts.shape[0]
    window = int(data["window"]) if "window" in data else n
    hidden = torch.from_numpy(data["hidden"]).float() if "hidden" in data else None
    return RoutingTrace(experts, hidden, [(a, min(a + window, n)) for a in range(0, n, window)],
                        int(data["n_experts"]), str(data.get("model", "")), str(path))


@dataclass
class Accuracy:
    """Hits of top-n guesses, indexed [lookahead - 1, target layer, n - 1]."""

    top_k: int
    n_experts: int
    hits: np.ndarray
    needed: np.ndarray      # [D, L]: experts picked at the target layer, summed over tokens
    guesses: np.ndarray     # [D, L]: tokens predicted (each guesses n experts)

    @property
    def sizes(self) -> list[int]:
        """The guess sizes reported: k and 2k (at most every expert)."""
        return sorted({self.top_k, min(2 * self.top_k, self.n_experts)})

    @property
    def n_layers(self) -> int:
        return self.hits.shape[1] // 2

    def _targets(self, layer: int | None, next_token: bool):
        first = self.n_layers if next_token else 0
        return slice(first, first + self.n_layers) if layer is None else first + layer

    def recall(self, lookahead: int, n: int, layer: int | None = None, next_token: bool = False) -> float:
        """Of the experts picked at the target layers (the next token's, with next_token)."""
        d, where = lookahead - 1, self._targets(layer, next_token)
        return float(np.sum(self.hits[d, where, n - 1]) / max(1, np.sum(self.needed[d, where])))

    def precision(self, lookahead: int, n: int, layer: int | None = None, next_token: bool = False) -> float:
        d, where = lookahead - 1, self._targets(layer, next_token)
        return float(np.sum(self.hits[d, where, n - 1]) / max(1, n * np.sum(self.guesses[d, where])))

    def summary(self, max_lookahead: int) -> dict:
        """d{d}: targets in the same token, by target layer; d{d}_next: in the next token."""
        k, n_layers = self.top_k, self.n_layers
        out = {}
        for d in range(1, max_lookahead + 1):
            for next_token, key in ((False, f"d{d}"), (True, f"d{d}_next")):
                where = self._targets(None, next_token)
                if not self.guesses[d - 1, where].sum():
                    continue
                row = {f"recall@{n}": round(self.recall(d, n, None, next_token), 4) for n in self.sizes}
                row.update({f"precision@{n}": round(self.precision(d, n, None, next_token), 4) for n in self.sizes})
                row["per_layer_recall@k"] = [round(self.recall(d, k, t, next_token), 4)
                                             if self.guesses[d - 1, self._targets(t, next_token)] else None
                                             for t in range(n_layers)]
                out[key] = row
        return out


def evaluate(predictor: Predictor, trace: RoutingTrace, max_lookahead: int = 3) -> Accuracy:
    """Replay the trace through the predictor (see the module docstring). Targets past the
    last MoE layer (the next token's layers, for predictors that guess them) are counted
    at index L + layer."""
    n_layers, k, n_experts = trace.n_layers, trace.top_k, trace.n_experts
    max_n = min(2 * k, n_experts)
    hits = np.zeros((max_lookahead, 2 * n_layers, 2 * k), dtype=np.int64)
    needed = np.zeros((max_lookahead, 2 * n_layers), dtype=np.int64)
    guesses = np.zeros((max_lookahead, 2 * n_layers), dtype=np.int64)
    ends = np.zeros(len(trace.experts), dtype=np.int64)  # each token's window end
    for a, b in trace.windows:
        ends[a:b] = b
    for tokens, layer, h, e in replay(predictor, trace):
        for d in range(1, min(max_lookahead, n_layers - 1) + 1):
            target = layer + d
            if target >= n_layers and not predictor.next_token:
                break
            top = torch.topk(predictor.scores(layer, h, e, d), max_n, dim=-1).indices  # [T, max_n]
            if target < n_layers:
                picked = trace.experts[tokens, target]                               # [T, K]
            else:  # the next token's layer, for tokens whose next token is in the window
                t = torch.arange(len(trace.experts))[tokens]
                keep = torch.from_numpy(t.numpy() + 1 < ends[t.numpy()])
                top, picked = top[keep], trace.experts[t[keep] + 1, target - n_layers]
            match = (top[:, :, None] == picked[:, None, :]).any(-1)                  # [T, max_n]
            hits[d - 1, target, :max_n] += match.cumsum(1).sum(0).numpy()
            needed[d - 1, target] += int((picked >= 0).sum())
            guesses[d - 1, target] += picked.shape[0]
    return Accuracy(k, n_experts, hits, needed, guesses)


def replay(predictor: Predictor, trace: RoutingTrace):
    """Feed the trace to the predictor as the runtime would; yield (tokens, layer, hidden,
    experts) at each step, once the predictor has observed it."""
    if trace.hidden is None:
        raise ValueError(f"{trace.source}: predictions need hidden states (moeedge trace --hidden)")
    stateless = getattr(predictor, "stateless", False)
    with torch.inference_mode():
        for a, b in trace.windows:
            predictor.reset()
            step = b - a if stateless else 1
            for t in range(a, b, step):
                tokens = slice(t, t + step)
                for layer in range(trace.n_layers):
                    h, e = trace.hidden[tokens, layer], trace.experts[tokens, layer]
                    predictor.observe(layer, h, e)
                    yield tokens, layer, h, e


def guess_matrix(predictor: Predictor, trace: RoutingTrace, max_lookahead: int) -> np.ndarray:
    """float64 [N * L, D, E]: at each (token, layer) step in order, the predictor's chance
    that each expert is picked d + 1 steps on (past the last layer: by the next token, as
    far as the same layer of it; -1 where the predictor does not guess); what the
    "predicted" cache policy (moeedge.sim.predicted) takes."""
    n, n_layers, k = trace.experts.shape
    out = np.full((n, n_layers, max_lookahead, trace.n_experts), -1.0)  # -1: no guess
    for tokens, layer, h, e in replay(predictor, trace):
        for d in range(1, min(max_lookahead, n_layers) + 1):
            if layer + d >= n_layers and not predictor.next_token:
                break
            out[tokens, layer, d - 1] = predictor.probabilities(layer, h, e, d, k).numpy()
    return out.reshape(n * n_layers, max_lookahead, trace.n_experts)
