"""A prompt span's MoE output while some experts' rows are still being computed by a peer
(moeedge.peers): the pipelined prefill across peers (Jupiter).

The peer's rows were sent chunk by chunk (moeedge.peers.remote); rows(a, b) waits only for
the pieces that hold rows before b, so the next layer's attention on the span's first chunk
runs here while the peer computes the later chunks' rows. Each row is the sum of its experts'
scaled outputs in expert order, added into zeros as DecoderFFN._moe_tokens adds them: the
same bits for any a, b, and wherever an expert ran (the kernels are batch-invariant)."""
from __future__ import annotations

from collections.abc import Callable

import torch


class SpanFFN:
    def __init__(self, x: torch.Tensor, chosen: list[int], done: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 calls: dict, routed: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 compute: Callable[[int], tuple[torch.Tensor, torch.Tensor]]):
        """done: expert -> (token rows, scaled output) computed here; calls: expert -> its
        RemoteCall; routed: expert -> (token rows, gate per row) of the remote ones;
        compute(e): expert e's (token rows, scaled output) computed here, if its call failed."""
        self.shape, self.dtype = x.shape, x.dtype
        self.chosen, self.done, self.calls, self.routed, self.compute = chosen, done, calls, routed, compute
        self.extra: torch.Tensor | None = None  # a term added to every row (Qwen2-MoE's shared expert)

    def __add__(self, term: torch.Tensor) -> "SpanFFN":
        self.extra = term if self.extra is None else self.extra + term
        return self

    def _expert(self, e: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (token rows, scaled output) for at least its rows before b."""
        if e in self.done:
            return self.done[e]
        tokens, gates = self.routed[e]
        y = self.calls[e].result(upto=int((tokens < b).sum()))
        if y is None:  # the peer failed or missed the deadline: computed here, all rows
            self.done[e] = self.compute(e)
            return self.done[e]
        part = (tokens[:y.shape[0]], y * gates[:y.shape[0]])
        if y.shape[0] == tokens.shape[0]:
            self.done[e] = part
        return part

    def rows(self, a: int, b: int) -> torch.Tensor:
        out = torch.zeros(b - a, self.shape[1], dtype=self.dtype)
        for e in self.chosen:
            tokens, y = self._expert(e, b)
            keep = (tokens >= a) & (tokens < b)
            out.index_add_(0, tokens[keep] - a, y[keep].to(out.dtype))
        return out if self.extra is None else out + self.extra[a:b]

    def all(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


def add_rows(h: torch.Tensor, ffn, a: int, b: int) -> torch.Tensor:
    """Rows a..b of h plus a feed-forward output (a tensor, a SpanFFN, or None: nothing yet)."""
    if ffn is None:
        return h[a:b]
    return h[a:b] + (ffn.rows(a, b) if isinstance(ffn, SpanFFN) else ffn[a:b])
