"""The contract between the engine (moeedge.api, the server, speculative decoding) and a
model family's forward: what it needs from the memory plan, and one step over several
sequences, each with one or more new tokens. Prefill is that step with many tokens.

A Sequence is the runner's record of one sequence: the tokens whose keys and values its
KV slot holds, in order. A step appends its tokens only once it has run to the end, so
an exception part-way (an expert read that fails) leaves every sequence's record true:
positions past len(seq.ids) may hold anything, and are written again before they are read.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from moeedge.runtime.experts import ExpertAccess

# recorder(moe_layer, experts [T, K], gates [T, K], hidden [T, H]), called by each MoE
# layer of a step: routing traces (moeedge.trace, moeedge.aggregate's calibration).
Recorder = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class NonFiniteError(ValueError):
    """A forward produced NaN or Inf: the checkpoint's weights or config (e.g. rms_norm_eps) are bad."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether no value is NaN or Inf. A sum first (a few us for a vocabulary of logits, where
    isfinite and all take tens): NaN and Inf carry into it, and where the sum alone overflows,
    isfinite decides."""
    return all(math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all()) for t in tensors)


def check_finite(t: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{where} produced NaN or Inf values: the checkpoint's weights or config are bad")


@dataclass(frozen=True)
class Prediction:
    """How a runner guesses the experts of the next layers (moeedge.predict), set up when it is made."""
    predictor: str | None = None        # a name of moeedge.predict, "auto" (the best available), or None
    prefetch: bool | None = None        # read guesses early (None: the family's default)
    lookahead: int = 1                  # MoE layers ahead
    predictor_file: str | None = None   # trained predictors (default: beside the checkpoint)
    policy: str = "lru"                 # "predicted": the guesses also drive eviction
    source: str | None = None           # the checkpoint's directory


@dataclass(eq=False)
class Sequence:
    slot: int                                       # which KV slot of the runner holds it
    ids: list[int] = field(default_factory=list)    # tokens whose keys and values the slot holds
    # Encoder-decoder runners: the input encoded into this slot's cross-attention; ids are
    # then the decoder's tokens.
    encoded: list[int] = field(default_factory=list)
    freed: bool = False

    def __len__(self) -> int:
        return len(self.ids)


class SlotPool:
    """KV slots handed to sequences: a runner's n_sequences slots, each free or taken."""

    def __init__(self, n: int):
        self.free = list(range(n - 1, -1, -1))

    def take(self) -> Sequence:
        if not self.free:
            raise RuntimeError("every KV slot holds a sequence: free one first (load with more sequences "
                               "to decode more at once)")
        return Sequence(self.free.pop())

    def give_back(self, seq: Sequence) -> None:
        if not seq.freed:
            seq.freed, seq.ids, seq.encoded = True, [], []
            self.free.append(seq.slot)


class SlotSequences:
    """new_sequence, truncate and free as both runners keep them: a SlotPool in self.slots;
    and reading_prompt."""

    slots: SlotPool
    # True while the steps read a prompt (reading_prompt): a runner may then take faster
    # kernels whose rows are not bit-equal to a decode step's (DecoderFFN: the prompt kernels).
    in_prompt: bool = False

    @contextlib.contextmanager
    def reading_prompt(self):
        """The steps inside read a prompt, none of them a decode step."""
        self.in_prompt = True
        try:
            yield
        finally:
            self.in_prompt = False

    def new_sequence(self) -> Sequence:
        return self.slots.take()

    def truncate(self, seq: Sequence, n: int) -> None:
        del seq.ids[n:]

    def free(self, seq: Sequence) -> None:
        self.slots.give_back(seq)


def check_batch(batch, max_context: int) -> None:
    """Every sequence live, once in the batch, with new tokens that fit in max_context."""
    seen = set()
    for seq, tokens in batch:
        if seq.freed:
            raise ValueError("a freed sequence cannot be stepped")
        if seq.slot in seen:
            raise ValueError(f"sequence in slot {seq.slot} appears twice in one step")
        seen.add(seq.slot)
        if len(tokens) == 0:
            raise ValueError("empty input: nothing to run")
        if len(seq.ids) + len(tokens) > max_context:
            raise ValueError(f"{len(seq.ids) + len(tokens)} tokens exceed max_context={max_context}")


class Runner(Protocol):
    """A model family's forward with its experts offloaded (DecoderMoE, SwitchMoE)."""

    max_context: int
    experts: ExpertAccess
    recorder: Recorder | None
    encoder_decoder: bool   # prompts encoded apart from the decoder's tokens (Switch)
    mixed_precision: bool   # True: weights stay as stored; False: converted to the compute dtype
    policies: tuple[str, ...]   # cache policies it takes ("predicted": its predictor drives eviction)
    default_policy: str

    # -- what the memory plan needs (moeedge.runtime.plan), before any weight is read --
    @classmethod
    def compute_dtype(cls, ckpt) -> torch.dtype:
        """The activations' dtype when the user names none."""

    @classmethod
    def dense_bytes(cls, ckpt, dtype: torch.dtype) -> int:
        """The dense weights' bytes as this runner holds them."""

    @classmethod
    def kv_bytes(cls, cfg, max_context: int, dtype: torch.dtype) -> int:
        """One sequence's KV cache (and cross-attention cache) for max_context tokens."""

    @classmethod
    def activation_bytes(cls, cfg, max_context: int, chunk: int) -> int:
        """Activations of one step of `chunk` tokens, without the allocator's slack."""

    # -- sequences ---------------------------------------------------------------------
    def new_sequence(self) -> Sequence: ...

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep the first n tokens of seq (its KV rows past n are then free to overwrite)."""

    def free(self, seq: Sequence) -> None: ...

    def step(self, batch: list[tuple[Sequence, torch.Tensor]], all_logits: bool = False) -> list[torch.Tensor]:
        """Run each sequence's new tokens [T_i] at its next positions: logits [T_i, V] each
        (all_logits) or [1, V] (the last). Each sequence's record grows only if the whole step ran."""

    def prompt(self, seq: Sequence, ids: list[int], chunk: int) -> tuple[torch.Tensor, int]:
        """Logits [V] after ids, which replace what seq held (a shared prefix is kept: a chat's
        earlier turns), read `chunk` tokens a step; and how many tokens were run."""

    def reading_prompt(self) -> contextlib.AbstractContextManager:
        """Steps inside read a prompt (a server's prefill chunk): they may take faster kernels
        whose rows are not bit-equal to a decode step's (prompt does this itself)."""

    # -- prediction and the rest -------------------------------------------------------
    def prediction_stats(self) -> dict | None:
        """The predictor's record (moeedge.runtime.prefetcher.Prefetcher.stats), None without one."""

    @property
    def prefetching(self) -> bool:
        """Whether experts guessed for the next layers are read early."""

    def close(self) -> None:
        """Let go of files the runner holds; idempotent."""


def common_prefix(held: list[int], ids: list[int]) -> int:
    """Tokens of `held` that ids starts with, leaving ids at least one token to run (its logits)."""
    n = 0
    for a, b in zip(held, ids[:-1]):
        if a != b:
            break
        n += 1
    return n
