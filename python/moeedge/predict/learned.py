"""A learned predictor (SiDA, ProMoE): per MoE layer and lookahead, a small MLP from the
router input and this token's chosen experts to the experts `lookahead` layers on,
trained on a trace recorded with hidden states (`moeedge trace --hidden`) over
training text. A lookahead past the last MoE layer lands in the next token's first
layers (the next token is not known yet; the current one's state says much about it)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeedge.predict.predictors import Predictor


def make_net(hidden: int, n_experts: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden + n_experts, width), nn.GELU(), nn.Linear(width, n_experts))


def _features(hidden: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    onehot = torch.zeros(hidden.shape[0], n_experts)
    onehot.scatter_(1, experts.long().clamp(min=0), 1.0)
    return torch.cat([hidden.float(), onehot], dim=1)


class LearnedPredictor(Predictor):
    name = "learned"
    stateless = True

    def __init__(self, prior: torch.Tensor, nets: dict[tuple[int, int], nn.Sequential], meta: dict):
        super().__init__(prior)
        self.nets = nets
        self.meta = meta
        self.max_lookahead = int(meta["max_lookahead"])
        self.next_token = any(layer + d >= self.n_layers for layer, d in nets)
        self._fused_cache: dict = {}

    @torch.inference_mode()
    def scores(self, layer, hidden, experts, lookahead):
        net = self.nets.get((layer, lookahead))
        if net is None:
            return self._prior((layer + lookahead) % self.n_layers, hidden.shape[0])
        return net(_features(hidden, experts, self.n_experts))

    @torch.inference_mode()
    def probabilities_ahead(self, layer, hidden, experts, lookaheads, k):
        # One product for the first layers of all the lookaheads' nets: they read the same features.
        ds = [d for d in lookaheads if (layer, d) in self.nets]
        out = {d: self.probabilities(layer, hidden, experts, d, k)[-1] for d in lookaheads if d not in ds}
        if ds:
            first, seconds, width = self._fused(layer, tuple(ds))
            h = F.gelu(F.linear(_features(hidden[-1:], experts[-1:], self.n_experts), *first))
            for i, (d, second) in enumerate(zip(ds, seconds)):
                out[d] = torch.sigmoid(F.linear(h[:, i * width:(i + 1) * width], *second))[-1]
        return out

    def _fused(self, layer: int, ds: tuple[int, ...]):
        key = (layer, ds)
        if key not in self._fused_cache:
            nets = [self.nets[(layer, d)] for d in ds]
            first = (torch.cat([n[0].weight for n in nets]), torch.cat([n[0].bias for n in nets]))
            seconds = [(n[2].weight, n[2].bias) for n in nets]
            self._fused_cache[key] = (first, seconds, nets[0][0].out_features)
        return self._fused_cache[key]

    def probabilities(self, layer, hidden, experts, lookahead, k):
        # Trained with a per-expert binary loss: the sigmoid is the chance it is picked.
        if (layer, lookahead) not in self.nets:
            return super().probabilities(layer, hidden, experts, lookahead, k)
        return torch.sigmoid(self.scores(layer, hidden, experts, lookahead))


def pairs(n_layers: int, max_lookahead: int) -> list[tuple[int, int]]:
    """(layer, lookahead) of every net: up to max_lookahead steps on, wrapping into the
    next token, never back to the same layer."""
    return [(layer, d) for layer in range(n_layers) for d in range(1, min(max_lookahead, n_layers - 1) + 1)]


def train_learned(hidden: torch.Tensor, experts: torch.Tensor, n_experts: int, windows: list[tuple[int, int]],
                  max_lookahead: int = 3, width: int = 256, epochs: int = 8, seed: int = 0, progress=None,
                  source: str = "") -> LearnedPredictor:
    """hidden [N, L, H] router inputs and experts [N, L, K] of a training trace, cut into
    windows (sequences): a token's next token is in its window."""
    from moeedge.predict.predictors import usage

    torch.manual_seed(seed)
    n, n_layers, k = experts.shape
    has_next = torch.zeros(n, dtype=torch.bool)
    for a, b in windows:
        has_next[a:b - 1] = True
    nets = {}
    for layer, d in pairs(n_layers, max_lookahead):
        x = _features(hidden[:, layer], experts[:, layer], n_experts)
        if layer + d < n_layers:
            target = experts[:, layer + d]
        else:  # the next token's layer: only tokens whose next token is in their window
            x, target = x[:-1][has_next[:-1]], experts[1:, layer + d - n_layers][has_next[:-1]]
        y = torch.zeros(len(target), n_experts).scatter_(1, target.long().clamp(min=0), 1.0)
        nets[(layer, d)] = _fit(make_net(hidden.shape[2], n_experts, width), x, y, epochs)
        if progress is not None:
            progress(layer, d)
    meta = {"hidden": int(hidden.shape[2]), "width": width, "max_lookahead": max_lookahead, "epochs": epochs,
            "train_tokens": int(n), "seed": seed, "trained_on": source}
    return LearnedPredictor(usage(experts, n_experts), nets, meta)


def _fit(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 512) -> nn.Sequential:
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss_fn(net(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return net.eval()
