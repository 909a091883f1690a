"""The decoder's feed-forward blocks: dense MLPs, Qwen2-MoE's shared expert, and MoE
layers whose experts come from the native cache (moeedge.runtime.experts), computed in
expert order so that the result does not depend on what happened to be cached.
Shapes: T = rows in this step, H = hidden, E = experts, K = top-k."""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from moeedge import _core
from moeedge.formats.hf_config import DecoderConfig
from moeedge.kernels import linear
from moeedge.models.span_ffn import SpanFFN
from moeedge.runtime.experts import ExpertAccess

# A feed-forward's activations (gate, up, their product: about four [rows, intermediate]
# tensors) are computed this many bytes of them at a time, so that a prefill chunk of
# wide experts (64 MiB ones have 58,254 neurons) needs a few MiB rather than one
# chunk-sized copy per projection; the memory plan counts this, not chunk x intermediate.
FFN_ACTIVATION_BYTES = 8 << 20


# A prompt span's next MoE layers are read ahead when its rows route at least this many times
# per expert: with uniform routing an expert is then left unused with probability about
# (1 - 1/E)**(4E), under 2% (8 experts: 1%; 64: 1.7%).
NEXT_LAYER_ROUTES = 4
# How many MoE layers a prompt span reads ahead of the one computing, where the cache holds
# them and two layers more (bench/README.md, "Where the prompt's time goes": one layer ahead
# left the disk idle while the first layers computed slower, filling the cache).
READ_AHEAD_LAYERS = 3


def by_rows(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    """fn applied to x `rows` rows at a time (each row's result depends on that row only)."""
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(rows)])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. In fp32 as ExpertFfn computes it, row by row (moeedge._core.silu_mul),
    so that a row gets the same bits in a prefill, a decode step, or one expert call."""
    if gate.dtype == up.dtype == torch.float32 and gate.dim() == 2 and gate.shape == up.shape:
        gate, up = gate.contiguous(), up.contiguous()
        if gate.data_ptr() == up.data_ptr():
            gate = gate.clone()
        _core.silu_mul(gate.numpy(), up.numpy())  # in place, in gate
        return gate
    return F.silu(gate) * up


def expert_rows(experts: ExpertAccess, moe_layer: int, e: int, xs: torch.Tensor,
                timed: Callable[[torch.Tensor, float], None] | None = None) -> torch.Tensor:
    """Expert e's output for fp32 rows xs [N, H], unscaled, each row's bits independent of the
    others (the batch-invariant kernels): what _moe_rows computes, and what a peer computes
    for a remote call (moeedge.peers). timed(xs, start): told when the compute began
    (time.perf_counter), once the expert's bytes were in memory (a read is not its compute)."""
    ffn = experts.ffn(moe_layer, e)
    if ffn is not None:  # one native call (moeedge._core.ExpertFfn)
        y, buf = torch.empty_like(xs), experts.buffer(moe_layer, e)
        start = time.perf_counter()
        ffn(xs.numpy(), buf, y.numpy(), 1.0)
    else:
        ew = experts.get(moe_layer, e)
        start = time.perf_counter()
        y = linear(swiglu(linear(xs, ew["gate"]), linear(xs, ew["up"])), ew["down"])
    if timed is not None:
        timed(xs, start)
    return y


def widest_ffn(cfg: DecoderConfig) -> int:
    return max(cfg.expert_intermediate, cfg.dense_intermediate, cfg.shared_expert_intermediate)


def ffn_rows(cfg: DecoderConfig) -> int:
    """Token rows per feed-forward block (FFN_ACTIVATION_BYTES), fp32 activations."""
    return max(1, FFN_ACTIVATION_BYTES // (4 * widest_ffn(cfg) * 4))


class DecoderFFN:
    """The feed-forward half of DecoderMoE (a mixin: it uses the runner's cfg, w, experts,
    base, rows, prefetcher and recorder)."""

    cfg: DecoderConfig
    w: dict
    experts: ExpertAccess
    base: dict[int, tuple[torch.Tensor, ...]]
    rows: int
    moe_index: dict[int, int]
    # Experts computed elsewhere (moeedge.peers.RemoteExperts): dispatch(moe_layer, {expert:
    # rows}) -> {expert: call} for those it sends, call.result() -> the unscaled rows, or None
    # where the call failed (then they are computed here, from the cache or the disk).
    remote = None
    held: list | None
    segment_rows: list[int] | None = None  # the current step's chunks' rows (a prompt span's)
    pass_guesses: dict[int, set[int]] | None  # a verify pass's draft picks per MoE layer (moeedge.speculative)
    # While a prompt is read (SlotSequences.reading_prompt): its feed-forward products take the
    # prompt kernels (moeedge.kernels.PROMPT_QUANTS), faster at many tokens; a decode step's
    # never do, so that it keeps the one-token kernels' bits in any batch.
    in_prompt: bool = False

    def router_weight(self, moe_layer: int) -> torch.Tensor:
        """The router's weight [E, H] of a MoE layer (its outputs are the checkpoint's E experts)."""
        return self.w[self._router_name(self.cfg.moe_layers[moe_layer])]

    def _router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{'block_sparse_moe' if self.cfg.family == 'mixtral' else 'mlp'}.gate.weight"

    def _mlp(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        p = self.in_prompt

        def block(rows: torch.Tensor) -> torch.Tensor:
            return linear(swiglu(linear(rows, gate, prompt=p), linear(rows, up, prompt=p)), down, prompt=p)
        return by_rows(block, x, self.rows)

    @staticmethod
    def _lowrank_mlp(x: torch.Tensor, gate_base: torch.Tensor, up_base: torch.Tensor, down_base: torch.Tensor,
                     ew) -> torch.Tensor:
        """An expert whose weights are base + b @ a: base(x) + b (a x) for each projection,
        the base's gate and up products given (shared by the layer's experts). The expert's
        own weights are never formed: a and b are all that was read."""
        gate = gate_base + linear(linear(x, ew["gate_a"]), ew["gate_b"])
        up = up_base + linear(linear(x, ew["up_a"]), ew["up_b"])
        h = swiglu(gate, up)
        return linear(h, down_base) + linear(linear(h, ew["down_a"]), ew["down_b"])

    def _lowrank_mlp_block(self, x: torch.Tensor, base: tuple[torch.Tensor, ...], ew) -> torch.Tensor:
        """_lowrank_mlp for rows whose base products were not computed for the whole step."""
        return self._lowrank_mlp(x, linear(x, base[0]), linear(x, base[1]), base[2], ew)

    def route(self, x: torch.Tensor, layer: int,
              logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, K] gate weights and stored-expert indices, as the checkpoint's router picks them
        (from its logits [T, E] where they were computed already).
        An aggregated variant keeps the router's E outputs and maps them to its stored experts
        (cfg.expert_map): two picks may then name one expert, which _moe runs once."""
        if logits is None:
            logits = linear(x, self.w[self._router_name(layer)])  # [T, E]
        table = None if self.cfg.expert_map is None else torch.tensor(self.cfg.expert_map[self.moe_index[layer]])
        if table is not None:  # experts a pruned variant dropped leave the router, as in NAEE
            logits = logits.masked_fill(table < 0, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if self.cfg.family != "mixtral":  # transformers' Mixtral keeps the gate weights in fp32
            top_w = top_w.to(logits.dtype)
        if table is not None:
            top_i = table[top_i]
            # Fewer kept experts than k: the extra picks have gate 0; they repeat the first pick
            # so that nothing more runs.
            dropped = top_i < 0
            top_i = torch.where(dropped, top_i[:, :1], top_i)
            top_w = top_w.masked_fill(dropped, 0.0)
        return top_w, top_i

    def _moe(self, x: torch.Tensor, layer: int, logits: torch.Tensor | None = None,
             apart: bool = False) -> torch.Tensor:
        """apart: each row is another sequence's one new token (a decode step of several):
        each gets the arithmetic it would get alone."""
        moe_layer = self.moe_index[layer]
        top_w, top_i = self.route(x, layer, logits)
        if self.held is not None:  # an exact step: shown once its kept tokens are known
            self.held.append((moe_layer, x, top_i, top_w))
        elif self.recorder is not None:
            self.recorder(moe_layer, top_i, top_w, x)
        # (torch.unique sorts: about 70 µs a call here, for two numbers)
        chosen = sorted(set(top_i[0].tolist())) if x.shape[0] == 1 else torch.unique(top_i).tolist()
        # Resident experts first while the missing ones are read; each expert's
        # output is summed in expert order afterwards, so the result does not
        # depend on what happened to be cached.
        missing = [e for e in chosen if not self.experts.resident(moe_layer, e)]
        if self.prefetcher is not None and self.held is None:  # first: it scores what the reads below may evict
            self.prefetcher.on_route(moe_layer, x, top_i, decoding=x.shape[0] == 1)
        elif self.prefetcher is not None and self.pass_guesses:  # a verify pass, guided by the draft
            self.prefetcher.guide_pass(moe_layer, chosen, self.pass_guesses)
        calls = {}  # sent first, so that they run while the resident experts are computed here
        if self.remote is not None and missing and x.dtype == torch.float32 and layer not in self.base:
            if x.shape[0] == 1 or apart:
                calls = self.remote.dispatch(moe_layer, {e: x[(top_i == e).any(dim=-1)] for e in missing})
            elif self.held is None:  # a prompt's rows, chunk by chunk (moeedge.models.span_ffn)
                calls = self._dispatch_prompt(x, moe_layer, missing, top_i)
        self.experts.prefetch(moe_layer, [e for e in missing if e not in calls], priority=1)
        self.read_ahead(moe_layer, x.shape[0])
        if x.shape[0] == 1 and layer not in self.base:
            out = self._moe_token(x, moe_layer, chosen, missing, top_w, top_i, calls)
        elif apart and layer not in self.base:
            out = self._moe_rows(x, moe_layer, chosen, missing, top_w, top_i, calls)
        else:
            out = self._moe_tokens(x, layer, moe_layer, chosen, missing, top_w, top_i, calls)
        p = f"model.layers.{layer}.mlp."
        if p + "shared_expert.gate_proj.weight" in self.w:  # Qwen2-MoE
            shared = self._mlp(x, self.w[p + "shared_expert.gate_proj.weight"],
                               self.w[p + "shared_expert.up_proj.weight"], self.w[p + "shared_expert.down_proj.weight"])
            out = out + torch.sigmoid(linear(x, self.w[p + "shared_expert_gate.weight"])) * shared
        return out

    def read_ahead(self, moe_layer: int, rows: int) -> None:
        """A prompt span that routes this many rows will want nearly every expert of the next
        MoE layers too (after moe_layer; -1: from the first): read them while this layer
        computes, behind this layer's own reads, the nearer first (else the disk waits for the
        next layer's routing, and a cold 512-token prefill of full-size Mixtral was bound by
        reads and computing one after the other). One layer ahead where the cache holds two to
        four layers' experts, READ_AHEAD_LAYERS where it holds that many and two more (or the
        whole model), so that the guesses evict nothing a layer being computed still needs.
        Only in a prompt, not in an exact step (held) or with peers (remote)."""
        n = self.cfg.n_experts
        if not self.in_prompt or self.held is not None or self.remote is not None:
            return
        if rows * self.cfg.top_k < NEXT_LAYER_ROUTES * n:
            return
        layers, total = self.experts.capacity // n, len(self.cfg.moe_layers)
        depth = READ_AHEAD_LAYERS if layers >= total or layers >= READ_AHEAD_LAYERS + 2 else int(layers >= 2)
        for nxt in range(moe_layer + 1, min(total, moe_layer + 1 + depth)):
            self.experts.prefetch(nxt, [e for e in range(n) if not self.experts.resident(nxt, e)],
                                  priority=moe_layer - nxt + 1)  # the nearest layer first

    def _dispatch_prompt(self, x: torch.Tensor, moe_layer: int, missing: list[int], top_i: torch.Tensor) -> dict:
        """The missing experts' rows of a prompt span, each cut at the span's chunk ends
        (segment_rows) so that the peer's replies come back chunk by chunk."""
        ends = torch.tensor(self.segment_rows or [x.shape[0]]).cumsum(0)
        offered, pieces = {}, {}
        for e in missing:
            tokens = torch.where((top_i == e).any(dim=-1))[0]
            offered[e] = x[tokens]
            cut = [0, *torch.searchsorted(tokens, ends).tolist()]  # e's rows before each chunk's end
            pieces[e] = [b - a for a, b in zip(cut, cut[1:])]
        return self.remote.dispatch(moe_layer, offered, pieces)

    def commit_routes(self, n: int) -> None:
        """The first n tokens of the last exact step are kept: their routing goes to the
        recorder and the predictor as n one-token steps would have sent it (token by token,
        layer by layer), without reading guesses that are stale by now; the rest is dropped."""
        held, self.held = self.held or [], None
        p = self.prefetcher
        for r in range(n):
            for moe_layer, x, top_i, top_w in held:
                if self.recorder is not None:
                    self.recorder(moe_layer, top_i[r:r + 1], top_w[r:r + 1], x[r:r + 1])
                if p is not None:
                    with p.replaying():
                        p.on_route(moe_layer, x[r:r + 1], top_i[r:r + 1], decoding=True)

    def _moe_token(self, x: torch.Tensor, moe_layer: int, chosen: list[int], missing: list[int],
                   top_w: torch.Tensor, top_i: torch.Tensor, calls: dict | None = None) -> torch.Tensor:
        """_moe_tokens for one token (a decode step), in a third of the torch calls: the same
        products and the same fp32 sum in expert order. calls: experts computed remotely."""
        calls = calls or {}
        gates = dict.fromkeys(chosen, 0.0)
        for e, g in zip(top_i[0].tolist(), top_w[0].tolist()):  # fp32 values; a pair's sum rounds as in fp32
            gates[e] += g
        outputs = {e: self._expert_token(x, moe_layer, e, gates[e], top_w)
                   for e in sorted(chosen, key=lambda e: e in missing) if e not in calls}
        for e, call in calls.items():
            y = call.result()  # the kernel's scale is one fp32 multiply: y * gate has its bits
            outputs[e] = self._expert_token(x, moe_layer, e, gates[e], top_w) if y is None else y.mul_(gates[e])
        out = outputs[chosen[0]]
        for e in chosen[1:]:
            out = out + outputs[e]
        return out

    def _timed(self, xs: torch.Tensor, start: float) -> None:
        """An expert computed here for rows xs since start (time.perf_counter(), its bytes in
        memory already): with peers, the cost model charges this to an expert read from disk.
        Only fp32 rows: the only ones a peer is sent (_moe)."""
        if self.remote is not None and xs.dtype == torch.float32:
            self.remote.computed_here(xs.shape[0], time.perf_counter() - start)

    def _expert_token(self, x: torch.Tensor, moe_layer: int, e: int, gate: float,
                      top_w: torch.Tensor) -> torch.Tensor:
        ffn = self.experts.ffn(moe_layer, e) if x.dtype == torch.float32 == top_w.dtype else None
        if ffn is not None:  # one native call (moeedge._core.ExpertFfn)
            out, buf = torch.empty_like(x), self.experts.buffer(moe_layer, e)  # (a read is not timed)
            start = time.perf_counter()
            ffn(x.numpy(), buf, out.numpy(), gate)
            self._timed(x, start)
            return out
        ew = self.experts.get(moe_layer, e)
        start = time.perf_counter()
        y = linear(swiglu(linear(x, ew["gate"]), linear(x, ew["up"])), ew["down"])
        self._timed(x, start)
        return y.mul_(gate) if y.dtype == top_w.dtype else (y * top_w.new_tensor(gate)).to(x.dtype)

    def _moe_rows(self, x: torch.Tensor, moe_layer: int, chosen: list[int], missing: list[int],
                  top_w: torch.Tensor, top_i: torch.Tensor, calls: dict | None = None) -> torch.Tensor:
        """_moe_token for several rows at once, each row's bits those of _moe_token on it alone:
        an expert's rows in one call of the (batch-invariant) kernels, unscaled, then each row
        times its gate (the one fp32 multiply the kernel makes), summed over its experts in
        expert order from the first (not from zero, which would turn -0.0 into +0.0)."""
        gates: list[dict[int, float]] = []
        for picks, weights in zip(top_i.tolist(), top_w.tolist()):
            row: dict[int, float] = {}
            for e, g in zip(picks, weights):
                row[e] = row.get(e, 0.0) + g  # as _moe_token sums them: in Python floats
            gates.append(row)
        calls = calls or {}
        outputs = {}
        # the resident experts first, then the missing ones read here, then the remote ones
        for e in sorted((e for e in chosen if e not in calls), key=lambda e: e in missing) + list(calls):
            rows = [r for r, row in enumerate(gates) if e in row]
            xs = x[rows].contiguous()
            scale = torch.tensor([gates[r][e] for r in rows], dtype=torch.float64).to(top_w.dtype)[:, None]
            y = calls[e].result() if e in calls else None  # None: not sent, or the call failed
            if y is not None:
                pass
            elif x.dtype == torch.float32 == top_w.dtype:
                y = expert_rows(self.experts, moe_layer, e, xs, self._timed)
            else:
                ew = self.experts.get(moe_layer, e)
                y = linear(swiglu(linear(xs, ew["gate"]), linear(xs, ew["up"])), ew["down"])
                del ew  # unpin before the next expert is read
            outputs[e] = (torch.tensor(rows), (y * scale).to(x.dtype))
        out, written = torch.empty_like(x), torch.zeros(x.shape[0], dtype=torch.bool)
        for e in sorted(chosen):
            rows, y = outputs[e]
            out[rows] = torch.where(written[rows, None], out[rows] + y, y)
            written[rows] = True
        return out

    def _moe_tokens(self, x: torch.Tensor, layer: int, moe_layer: int, chosen: list[int], missing: list[int],
                    top_w: torch.Tensor, top_i: torch.Tensor, calls: dict | None = None):
        """calls: experts a peer computes (a prompt's rows): then a SpanFFN, whose rows wait
        only for the chunks they need."""
        base = self.base.get(layer)
        # low-rank: the base's products once for every token, where they fit in one block
        shared_base = base is not None and x.shape[0] <= self.rows
        products = (linear(x, base[0]), linear(x, base[1])) if shared_base else None

        def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:
            picked = top_i == e  # [T, K]; a merged variant's token may pick e twice: gates summed
            tokens = torch.where(picked.any(dim=-1))[0]
            ew = self.experts.get(moe_layer, e)
            if base is None:
                xs = x[tokens]
                start = time.perf_counter()
                y = self._mlp(xs, ew["gate"], ew["up"], ew["down"])
                self._timed(xs, start)
            elif shared_base:
                y = self._lowrank_mlp(x[tokens], products[0][tokens], products[1][tokens], base[2], ew)
            else:
                y = by_rows(partial(self._lowrank_mlp_block, base=base, ew=ew), x[tokens], self.rows)
            del ew  # unpin before the next expert is read
            return tokens, y * (top_w * picked)[tokens].sum(dim=-1, keepdim=True)

        calls = calls or {}
        outputs = {e: expert(e) for e in sorted(chosen, key=lambda e: e in missing) if e not in calls}
        if calls:
            routed = {}
            for e in calls:
                picked = top_i == e
                tokens = torch.where(picked.any(dim=-1))[0]
                routed[e] = (tokens, (top_w * picked)[tokens].sum(dim=-1, keepdim=True))
            return SpanFFN(x, chosen, outputs, calls, routed, expert)
        out = torch.zeros_like(x)
        for e in chosen:
            tokens, y = outputs[e]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _ffn(self, x: torch.Tensor, layer: int, logits: torch.Tensor | None = None,
             apart: bool = False) -> torch.Tensor:
        if layer in self.moe_index:
            return self._moe(x, layer, logits, apart)
        p = f"model.layers.{layer}.mlp."
        return self._mlp(x, self.w[p + "gate_proj.weight"], self.w[p + "up_proj.weight"], self.w[p + "down_proj.weight"])
