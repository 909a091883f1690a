"""Guessing which experts a token will need in the MoE layers ahead of the current one.

Every predictor sees what the runtime has when a token has just been routed in MoE
layer `layer`: that layer's router input `hidden` [T, H] and its chosen `experts`
[T, K], plus whatever it kept from earlier tokens of the sequence. The runtime calls,
token after token and layer after layer,

    observe(layer, hidden, experts)      # remember (history, previous token)
    scores(layer, hidden, experts, d)    # [T, E]: higher = likelier at layer + d

and `reset()` when a new sequence starts. The offline evaluation (predict.metrics)
replays traces through exactly these calls, so a predictor can never see the future.
"""
from __future__ import annotations

import torch


class Predictor:
    name = "?"
    stateless = False   # True: scores depend only on the call's arguments
    next_token = False  # True: it also guesses past the last MoE layer, the next token's layers
    max_lookahead = 3   # the farthest step it guesses (the learned one: as far as it was trained)

    def __init__(self, prior: torch.Tensor):
        self.prior = prior.float()  # [L, E] how often each expert is picked: the tie-breaker
        self.n_layers, self.n_experts = prior.shape

    def reset(self) -> None:
        pass

    def observe(self, layer: int, hidden: torch.Tensor, experts: torch.Tensor) -> None:
        pass

    def scores(self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, lookahead: int) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, lookahead: int,
                      k: int) -> torch.Tensor:
        """[T, E] the chance that each expert is among the k picked: the scores spread over k
        picks (a predictor that knows better, like a trained one, overrides this)."""
        s = self.scores(layer, hidden, experts, lookahead).float().clamp(min=0)
        return (k * s / s.sum(-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)

    def probabilities_ahead(self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, lookaheads: list[int],
                            k: int) -> dict[int, torch.Tensor]:
        """{lookahead: [E]} for the last token, every lookahead at once (the runtime's call)."""
        return {d: self.probabilities(layer, hidden, experts, d, k)[-1] for d in lookaheads}

    def _prior(self, target: int, tokens: int) -> torch.Tensor:
        return self.prior[target].expand(tokens, -1)


class FrequencyPrior(Predictor):
    """The experts most often picked at the target layer: the baseline to beat."""

    name = "frequency"
    stateless = True

    def scores(self, layer, hidden, experts, lookahead):
        return self._prior(layer + lookahead, hidden.shape[0])


class PreviousToken(Predictor):
    """The experts the previous token picked at the target layer (prior for the first token)."""

    name = "previous"

    def __init__(self, prior: torch.Tensor):
        super().__init__(prior)
        self.reset()

    def reset(self) -> None:
        self.last: dict[int, torch.Tensor] = {}

    def observe(self, layer, hidden, experts):
        self.last[layer] = experts[-1]

    next_token = True  # for the next token, "the previous token" is this one

    def scores(self, layer, hidden, experts, lookahead):
        target = (layer + lookahead) % self.n_layers
        out = self._prior(target, hidden.shape[0]).clone() / (self.prior[target].max() + 1)  # < 1
        if target in self.last:
            out[:, self.last[target]] += 1.0
        return out


class StaleGate(Predictor):
    """The target layer's router applied to this layer's router input (mixtral-offloading,
    Pre-gated MoE). Re-normalising the input with the target layer's norm weight first
    (both come from one residual stream) made no measurable difference on the default
    model (recall 0.647 against 0.648 one layer ahead), so the input is used as it is."""

    name = "stale-gate"
    stateless = True

    def __init__(self, prior: torch.Tensor, routers: list[torch.Tensor]):
        super().__init__(prior)
        self.routers = [r.float() for r in routers]  # [E, H] per MoE layer

    def scores(self, layer, hidden, experts, lookahead):
        return torch.softmax(hidden.float() @ self.routers[layer + lookahead].T, dim=-1)


class History(Predictor):
    """Activation history, MoE-Infinity's idea: the sequence's expert-activation matrix
    (counts [L, E] of the experts its tokens picked so far, this token's layers included)
    is matched by cosine against the matrices of stored sequences; the nearest ones vote
    for the target layer, each vote weighted by how often, in stored data, an expert at
    the target layer followed this token's own experts at this layer."""

    name = "history"

    def __init__(self, prior: torch.Tensor, stored: torch.Tensor, transitions: torch.Tensor, neighbours: int = 8):
        super().__init__(prior)
        self.stored = stored.float()                 # [S, L, E] rows normalised per layer
        self.stored_flat = torch.nn.functional.normalize(self.stored.flatten(1), dim=1)
        self.transitions = transitions.float()       # [D, L, E, E]: P(target expert | expert at layer)
        self.neighbours = min(neighbours, len(stored))
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.n_layers, self.n_experts)

    def observe(self, layer, hidden, experts):
        self.counts[layer].index_add_(0, experts.flatten().long(), torch.ones(experts.numel()))

    def scores(self, layer, hidden, experts, lookahead):
        target = layer + lookahead
        if lookahead > self.transitions.shape[0]:
            raise ValueError(f"history was built for lookahead up to {self.transitions.shape[0]}")
        sims = self.stored_flat @ torch.nn.functional.normalize(self.counts.flatten(), dim=0)
        near = torch.topk(sims, self.neighbours).indices
        sequence = self.stored[near, target].mean(0) + 1e-3 * self.prior[target] / self.prior[target].sum()
        path = self.transitions[lookahead - 1, layer][experts.long()].sum(1)   # [T, E]
        return path * sequence


def build_history(experts: torch.Tensor, windows: list[tuple[int, int]], n_experts: int, max_lookahead: int = 3,
                  prior: torch.Tensor | None = None) -> History:
    """A History predictor from a training trace: experts [N, L, K] and its sequences."""
    n, n_layers, k = experts.shape
    e = experts.long()
    stored = torch.zeros(len(windows), n_layers, n_experts)
    for i, (a, b) in enumerate(windows):
        for layer in range(n_layers):
            stored[i, layer].index_add_(0, e[a:b, layer].flatten(), torch.ones((b - a) * k))
    stored = stored / stored.sum(-1, keepdim=True).clamp(min=1)
    transitions = torch.ones(max_lookahead, n_layers, n_experts, n_experts)  # add-one smoothing
    for d in range(1, max_lookahead + 1):
        for layer in range(n_layers - d):
            src = e[:, layer].repeat_interleave(k, dim=1)          # [N, K*K] pairs
            dst = e[:, layer + d].repeat(1, k)
            transitions[d - 1, layer].index_put_((src.flatten(), dst.flatten()), torch.ones(src.numel()),
                                                 accumulate=True)
    transitions = transitions / transitions.sum(-1, keepdim=True)
    return History(prior if prior is not None else usage(experts, n_experts), stored, transitions)


def usage(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[L, E] how many times each expert was picked (+1, so none is impossible)."""
    n, n_layers, k = experts.shape
    out = torch.ones(n_layers, n_experts)
    for layer in range(n_layers):
        out[layer].index_add_(0, experts[:, layer].flatten().long(), torch.ones(n * k))
    return out
