"""One MoE layer of the source model in fp32, and its output under a variant.

A variant of a layer keeps the router (all E outputs) and stores n experts; `table` maps
each router output to a stored expert, or to -1 when pruning dropped it. Its output is
computed as the runtime computes it (moeedge.models.decoder.route and _moe, or
moeedge.models.switch.route: top-1 with each router output's capacity per forward call):
dropped experts leave the softmax, two picks of one stored expert add their gates. Shapes:
N = calibration tokens, H = hidden, I = expert intermediate, E = experts, K = top-k.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moeedge.aggregate.calibration import LayerCalibration
from moeedge.formats.decoder_tensors import EXPERT_NAMES
from moeedge.formats.switch_config import SwitchConfig
from moeedge.models.switch import ACT


class ExpertSet:
    """What every method needs of a layer's n experts: `parts`, their weights in the
    checkpoint's packing order (input projections [n, I, H], then the output projection
    [n, H, I]), and the intermediate activations `hidden`; `like` makes a set of the same
    kind from other weights."""

    parts: tuple[torch.Tensor, ...]

    def like(self, parts) -> "ExpertSet":
        raise NotImplementedError

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.parts[0])  # a stacked tensor, or a tuple of per-expert tensors

    def select(self, index: list[int]) -> "ExpertSet":
        return self.like(t[index] for t in self.parts)

    def stacked(self, experts: list[tuple[torch.Tensor, ...]]) -> "ExpertSet":
        """A set of this kind from one tuple of parts per expert."""
        return self.like(torch.stack(parts) for parts in zip(*experts))

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [T, H] -> [T, H]."""
        return F.linear(self.hidden(e, x), self.parts[-1][e])


@dataclass
class Experts(ExpertSet):
    """Decoder experts: down(silu(gate x) * up x)."""
    gate: torch.Tensor  # [n, I, H]
    up: torch.Tensor    # [n, I, H]
    down: torch.Tensor  # [n, H, I]

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.gate, self.up, self.down

    def like(self, parts) -> "Experts":
        return Experts(*parts)

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.silu(F.linear(x, self.gate[e])) * F.linear(x, self.up[e])

    @staticmethod
    def stack(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> "Experts":
        return Experts(*(torch.stack(parts) for parts in zip(*experts)))


@dataclass
class SwitchExperts(ExpertSet):
    """Switch Transformers experts: wo(act(wi x))."""
    wi: torch.Tensor   # [n, I, H]
    wo: torch.Tensor   # [n, H, I]
    act: str = "relu"  # moeedge.models.switch.ACT

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.wi, self.wo

    def like(self, parts) -> "SwitchExperts":
        return SwitchExperts(*parts, act=self.act)

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return ACT[self.act](F.linear(x, self.wi[e]))


@dataclass
class LowRank:
    """A layer stored as one resident base expert plus, per expert and weight, the difference
    from the base as b @ a (rank r): the runtime computes base(x) + b (a x) and never forms
    the expert's weight. Each tuple has one entry per part (gate, up, down or wi, wo);
    a: [E, r, in], b: [E, out, r]. kind: any set of the layer's kind of experts."""
    base: tuple[torch.Tensor, ...]
    a: tuple[torch.Tensor, ...]
    b: tuple[torch.Tensor, ...]
    kind: ExpertSet | None = None  # None: decoder experts

    @property
    def rank(self) -> int:
        return self.a[0].shape[1]

    def experts(self) -> ExpertSet:
        """The E experts the factors stand for, formed here only to measure them."""
        formed = tuple(base + b @ a for base, a, b in zip(self.base, self.a, self.b))
        return Experts(*formed) if self.kind is None else self.kind.like(formed)


@dataclass
class Variant:
    table: list[int]      # [E] router output -> stored expert, -1: dropped
    experts: ExpertSet    # the n stored experts, fp32, already rounded to the checkpoint's dtype
    lowrank: LowRank | None = None  # set: `experts` are these factors formed (identity table)
    report: dict | None = None      # what a method measured while building it (distill)


@dataclass
class MoeLayer:
    index: int                 # MoE layer, in execution order
    experts: ExpertSet         # the source's E experts, fp32
    router: torch.Tensor       # [E, H] fp32
    top_k: int
    norm_topk_prob: bool
    dtype: torch.dtype         # the experts' stored dtype
    calibration: LayerCalibration
    memo: dict = field(default_factory=dict)   # per-method caches (alignments, merge tree)
    # Switch: tokens an expert takes per forward call (calibration.segments), and the router's bias.
    capacity: int | None = None
    router_bias: torch.Tensor | None = None

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @functools.cached_property
    def mean_outputs(self) -> torch.Tensor:
        """[E, H] every expert's average output over all the calibration states."""
        x = self.calibration.hidden
        return torch.stack([self.experts.forward(e, x).mean(0) for e in range(self.n_experts)])

    @functools.cached_property
    def reference_output(self) -> torch.Tensor:
        """[N, H] the source layer's routed output on the calibration states."""
        return self.output(Variant(list(range(self.n_experts)), self.experts))

    def gates(self, table: list[int]) -> torch.Tensor:
        """[N, n] each stored expert's gate per calibration token, two picks of one summed
        (0: not picked). The router does not change, so neither do these: methods that fit
        the stored experts (distill) take them as fixed."""
        key = ("gates", tuple(table))
        if key not in self.memo:
            x = self.calibration.hidden
            t = torch.tensor(table)
            logits = F.linear(x, self.router, self.router_bias).masked_fill(t < 0, float("-inf"))   # [N, E]
            top_w, top_i = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
            if self.norm_topk_prob:
                top_w = top_w / top_w.sum(dim=-1, keepdim=True)
            if self.capacity is not None:  # tokens past their router output's capacity get no expert
                top_w = top_w * within_capacity(top_i[:, 0], self.calibration.segments, self.capacity,
                                                self.n_experts)[:, None]
            stored = t[top_i]                                                # [N, K], -1 only at gate 0
            out = torch.zeros(x.shape[0], max(table) + 1)
            self.memo[key] = out.scatter_add_(1, stored.clamp_min(0), top_w * (stored >= 0))
        return self.memo[key]

    def output(self, variant: Variant, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[N, H] the layer's output under the variant (tokens: only these calibration states)."""
        x, g = self.calibration.hidden, self.gates(variant.table)
        if tokens is not None:
            x, g = x[tokens], g[tokens]
        out = torch.zeros_like(x)
        for e in range(len(variant.experts)):
            picked = torch.where(g[:, e] > 0)[0]
            out.index_add_(0, picked, variant.experts.forward(e, x[picked]) * g[picked, e, None])
        return out

    def relative_error(self, variant: Variant, tokens: torch.Tensor | None = None) -> float:
        """||output - source output|| / ||source output|| over the calibration states (or these)."""
        ref = self.reference_output if tokens is None else self.reference_output[tokens]
        return float((self.output(variant, tokens) - ref).norm() / ref.norm().clamp_min(1e-30))

    def rounded(self, experts: ExpertSet) -> ExpertSet:
        """As they will be stored: rounded to the checkpoint's dtype."""
        return experts.like(t.to(self.dtype).float() for t in experts.parts)


def within_capacity(expert: torch.Tensor, segments: list[int], capacity: int, n_experts: int) -> torch.Tensor:
    """[N] bool: the token is among the first `capacity` its expert takes in its segment
    (one forward call), in order, as moeedge.models.switch.route counts them."""
    counts = F.one_hot(expert, n_experts).cumsum(dim=0)                        # [N, E]
    ends = torch.tensor(segments).cumsum(0)
    before = torch.cat([torch.zeros(1, n_experts, dtype=counts.dtype), counts[ends[:-1] - 1]])   # [segments, E]
    counts = counts - before.repeat_interleave(torch.tensor(segments), dim=0)
    return counts.gather(1, expert[:, None])[:, 0] <= capacity


def read_layer(model, moe_layer: int, calibration: LayerCalibration) -> MoeLayer:
    """A layer of a loaded source model (moeedge.load), its weights copied to fp32."""
    cfg = model.config
    roles = [p.role for p in model.checkpoint.expert_parts[moe_layer]]
    parts = []
    for e in range(cfg.n_experts):
        w = model.runner.experts.get(moe_layer, e)
        # Copies: the views over the cache's buffer are only valid while pinned.
        parts.append(tuple(w[role].to(torch.float32, copy=True) for role in roles))
        del w
    dtype = model.checkpoint.expert_parts[moe_layer][0].dtype
    if isinstance(cfg, SwitchConfig):
        weight, bias = model.runner.routers[moe_layer]
        return MoeLayer(moe_layer, SwitchExperts(*(torch.stack(p) for p in zip(*parts)), act=cfg.act),
                        weight.float(), 1, False, dtype, calibration, capacity=cfg.expert_capacity,
                        router_bias=None if bias is None else bias.float())
    block, router, _, _ = EXPERT_NAMES[cfg.family]
    weight = model.runner.w[f"model.layers.{cfg.moe_layers[moe_layer]}.{block}.{router}.weight"]
    return MoeLayer(moe_layer, Experts.stack(parts), weight.float(), cfg.top_k, cfg.norm_topk_prob, dtype,
                    calibration)
