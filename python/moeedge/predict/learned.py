"""A learned predictor (SiDA, ProMoE): per MoE layer and lookahead, a small MLP from the
router input and this token's chosen experts to the experts `lookahead` layers on,
trained on a trace recorded with hidden states (`moeedge trace --hidden`) over
training text. A lookahead past the last MoE layer lands in the next token's first
layers (the next token is not known yet; the current one's state says much about it).

Each net also reads the router input and experts of the token before the target token
at the target layer (zeros at a sequence's start): the previous token's, for a layer of
this token; this token's own, for a layer of the next one. Attention at the target layer
mixes in the earlier tokens, and the one just before says most about it: one layer
ahead this took top-2 recall on the default model from 0.814 to 0.857."""
from __future__ import annotations

import math
import multiprocessing

import torch
import torch.nn.functional as F
from torch import nn

from moeedge.predict.predictors import Predictor
from moeedge.predict.predictors import usage


def make_net(hidden: int, n_experts: int, width: int, previous: bool = True, depth: int = 1) -> nn.Sequential:
    """depth hidden layers of `width`; the first module reads the features (see _fused)."""
    inputs = (hidden + n_experts) * (2 if previous else 1)
    layers = [nn.Linear(inputs, width), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, n_experts))


def _onehot(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    return torch.zeros(experts.shape[0], n_experts).scatter_(1, experts.long().clamp(min=0), 1.0)


def _features(hidden: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    return torch.cat([hidden.float(), _onehot(experts, n_experts)], dim=1)


def _shifted(x: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
    """Row i = row i - 1 of x within its sequence; zeros at each sequence's start."""
    out = torch.zeros_like(x)
    for a, b in windows:
        out[a + 1:b] = x[a:b - 1]
    return out


class LearnedPredictor(Predictor):
    name = "learned"

    def __init__(self, prior: torch.Tensor, nets: dict[tuple[int, int], nn.Sequential], meta: dict):
        super().__init__(prior)
        self.nets = nets
        self.meta = meta
        self.max_lookahead = int(meta["max_lookahead"])
        self.next_token = any(layer + d >= self.n_layers for layer, d in nets)
        # Nets trained before the previous token's features (moeedge-predictor files without
        # "previous") read this token's alone, and then depend on nothing else.
        self.previous = bool(meta.get("previous", False))
        self.stateless = not self.previous
        self._fused_cache: dict = {}
        self.reset()

    def reset(self) -> None:
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> the latest token's features there

    def observe(self, layer, hidden, experts):
        if self.previous:
            self.last[layer] = (hidden[-1:].float(), experts[-1:])

    def _before_target(self, layer: int, lookahead: int, tokens: int) -> torch.Tensor:
        """[tokens, H + E]: for each of the call's tokens, the features of the token before
        its target token at the target layer, the latest observed there: for a layer to come
        the previous token's (known for the first row only), for the next token's layers the
        token's own (known for the last row only, observe keeping the last). Rows whose token
        before is not known yet get zeros, as a sequence's first token does."""
        target = (layer + lookahead) % self.n_layers
        out = torch.zeros(tokens, self.meta["hidden"] + self.n_experts)
        if target in self.last:
            row = 0 if layer + lookahead < self.n_layers else tokens - 1
            out[row] = _features(*self.last[target], self.n_experts)[0]
        return out

    def _inputs(self, layer, hidden, experts, lookahead) -> torch.Tensor:
        x = _features(hidden, experts, self.n_experts)
        if not self.previous:
            return x
        return torch.cat([x, self._before_target(layer, lookahead, hidden.shape[0])], dim=1)

    @torch.inference_mode()
    def scores(self, layer, hidden, experts, lookahead):
        net = self.nets.get((layer, lookahead))
        if net is None:
            return self._prior((layer + lookahead) % self.n_layers, hidden.shape[0])
        return net(self._inputs(layer, hidden, experts, lookahead))

    @torch.inference_mode()
    def probabilities_ahead(self, layer, hidden, experts, lookaheads, k):
        # One product for the part of the first layers of all the lookaheads' nets that reads
        # this token's features; each adds its own product of the token before its target.
        ds = [d for d in lookaheads if (layer, d) in self.nets]
        out = {d: self.probabilities(layer, hidden, experts, d, k)[-1] for d in lookaheads if d not in ds}
        if ds:
            first, befores, rests, width = self._fused(layer, tuple(ds))
            h = F.linear(_features(hidden[-1:], experts[-1:], self.n_experts), *first)
            for i, (d, before, rest) in enumerate(zip(ds, befores, rests)):
                part = h[:, i * width:(i + 1) * width]
                if before is not None:
                    part = part + F.linear(self._before_target(layer, d, hidden.shape[0])[-1:], before)
                out[d] = torch.sigmoid(rest(F.gelu(part)))[-1]
        return out

    def _fused(self, layer: int, ds: tuple[int, ...]):
        key = (layer, ds)
        if key not in self._fused_cache:
            nets = [self.nets[(layer, d)] for d in ds]
            own = self.meta["hidden"] + self.n_experts  # the first columns: this token's features
            first = (torch.cat([n[0].weight[:, :own] for n in nets]), torch.cat([n[0].bias for n in nets]))
            befores = [n[0].weight[:, own:] if self.previous else None for n in nets]
            rests = [n[2:] for n in nets]  # after the first layer and its GELU
            self._fused_cache[key] = (first, befores, rests, nets[0][0].out_features)
        return self._fused_cache[key]

    def probabilities(self, layer, hidden, experts, lookahead, k):
        # Trained with a per-expert binary loss: the sigmoid is the chance it is picked.
        if (layer, lookahead) not in self.nets:
            return super().probabilities(layer, hidden, experts, lookahead, k)
        return torch.sigmoid(self.scores(layer, hidden, experts, lookahead))


# Nets 1 to 4 steps ahead: reads go up to 3; the fourth reaches a 4-layer model's same
# layer of the next token, the next visit predicted eviction weighs for the experts of the
# layer just run (on the default model's held-out trace it raised the share of the
# LRU-Belady gap closed by 1-4 points at capacities 8-24: README, Expert prediction).
LOOKAHEAD = 4
# The bundled nets. --width 512 --depth 2 reach 0.903 top-2 recall one layer ahead where
# these reach 0.895 (2,097,152 training tokens), but cost the default model 4.5 ms a token
# (137 -> 85 tok/s at its minimum budget) and read no fewer bytes on default-64m: README,
# Expert prediction.
WIDTH, DEPTH = 256, 1


def pairs(n_layers: int, max_lookahead: int) -> list[tuple[int, int]]:
    """(layer, lookahead) of every net: up to max_lookahead steps on, wrapping into the
    next token, at most as far as the same layer of the next token (a model of L <=
    max_lookahead layers: its next visit, which predicted eviction weighs)."""
    return [(layer, d) for layer in range(n_layers) for d in range(1, min(max_lookahead, n_layers) + 1)]


def train_learned(hidden: torch.Tensor, experts: torch.Tensor, n_experts: int, windows: list[tuple[int, int]],
                  max_lookahead: int = LOOKAHEAD, width: int = WIDTH, depth: int = DEPTH, epochs: int = 8,
                  seed: int = 0, progress=None, source: str = "", jobs: int = 1) -> LearnedPredictor:
    """hidden [N, L, H] router inputs and experts [N, L, K] of a training trace, cut into
    windows (sequences): a token's next token is in its window. Each net has its own seed,
    so `jobs` processes (one torch thread each) train the same nets as one."""
    global _TRAINING
    has_next = torch.zeros(experts.shape[0], dtype=torch.bool)  # the token's next one is in its window
    for a, b in windows:
        has_next[a:b - 1] = True
    _TRAINING = (hidden, experts, n_experts, windows, has_next, width, depth, epochs, seed)
    todo = pairs(experts.shape[1], max_lookahead)
    nets = {}
    pool = None
    try:
        if jobs == 1:
            done = map(_train_net, todo)
        else:  # forked: the workers share the trace's pages
            pool = multiprocessing.get_context("fork").Pool(jobs, initializer=torch.set_num_threads, initargs=(1,))
            done = pool.imap(_train_net, todo)
        for (layer, d), state in zip(todo, done):
            net = make_net(hidden.shape[2], n_experts, width, depth=depth)
            net.load_state_dict(state)
            nets[(layer, d)] = net.eval()
            if progress is not None:
                progress(layer, d)
    finally:
        _TRAINING = None
        if pool is not None:
            pool.close()
            pool.join()
    meta = {"hidden": int(hidden.shape[2]), "width": width, "depth": depth, "max_lookahead": max_lookahead,
            "epochs": epochs, "train_tokens": int(experts.shape[0]), "seed": seed, "trained_on": source,
            "previous": True}
    return LearnedPredictor(usage(experts, n_experts), nets, meta)


_TRAINING = None  # what train_learned's (forked) workers read


def _train_net(pair: tuple[int, int]) -> dict:
    hidden, experts, n_experts, windows, has_next, width, depth, epochs, seed = _TRAINING
    layer, d = pair
    n_layers = experts.shape[1]
    torch.manual_seed(seed * 1_000_003 + layer * 101 + d)
    x = _features(hidden[:, layer], experts[:, layer], n_experts)
    t = (layer + d) % n_layers
    before = _features(hidden[:, t], experts[:, t], n_experts)  # at the target layer
    if layer + d < n_layers:  # the token before the target is the previous one
        x, target = torch.cat([x, _shifted(before, windows)], dim=1), experts[:, t]
    else:  # the next token's layer: only tokens whose next token is in their window; before it, this one
        keep = has_next[:-1]
        x, target = torch.cat([x, before], dim=1)[:-1][keep], experts[1:, t][keep]
    net = _fit(make_net(hidden.shape[2], n_experts, width, depth=depth), x, _onehot(target, n_experts), epochs)
    return net.state_dict()


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
