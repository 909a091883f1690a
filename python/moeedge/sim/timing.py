"""The timing model: what a policy's misses cost in seconds, with and without prefetch.

A napkin model on top of a policy's hit/miss marks (moeedge.sim.policies.Result.hit):
- one disk reads one expert in ``read_s = expert_bytes / bandwidth`` seconds, one read
  at a time, in the order the reads are issued;
- a step (one token's pass through one MoE layer) computes each of its experts for
  ``compute_s``: resident ones first, then each missing one as soon as its read ends
  (the runtime reads all of a layer's missing experts at once while it computes the
  resident ones);
- stall = a step's time minus its compute; only expert work is timed (attention and
  the dense layers, which would give prefetch more time to hide reads, are not).

Prefetch modes, with ``lookahead`` L layers:
- "none":      each miss is read when its step starts;
- "oracle":    each miss of step s + L is read when step s starts (the true next
               experts: the upper bound on what prefetch can hide);
- "predicted": a predictor's guesses for step s + L are read when step s starts; a
               right guess of a miss hides it, a wrong guess costs a read unless the
               key is resident after step s (the runtime skips resident keys when it
               prefetches), and the misses it did not guess are read on demand.
The hit/miss marks are kept as the cache simulation gave them: the room prefetched
experts take, and what they would evict, is not modelled (so "oracle" is an upper
bound on what prefetch can hide, and "predicted" is optimistic about pollution).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

if TYPE_CHECKING:
    from moeedge.sim import Trace
    from moeedge.sim.policies import Result

MODES = ("none", "oracle", "predicted")


@dataclass
class Timing:
    """Inputs of the model. bandwidth in bytes/s, compute_s per expert, lookahead in layers."""

    expert_bytes: int
    bandwidth: float
    compute_s: float
    lookahead: int = 1

    @property
    def read_s(self) -> float:
        return self.expert_bytes / self.bandwidth


@njit(cache=True)
def _read(t, disk, read_s):
    """One read issued at t on a disk free from `disk`: returns when it ends."""
    return max(t, disk) + read_s


@njit(cache=True)
def _run(step_keys, hit, evicted, n_keys, read_s, compute_s, lookahead, mode, guesses):
    """Total stall and total time over the steps; mode 0 none, 1 oracle, 2 predicted."""
    n_steps, k = step_keys.shape
    ready = np.full((n_steps, k), -1.0)  # when each miss's read ends; -1: not issued yet
    last = np.full(n_keys, -1, dtype=np.int64)  # s * k + j of each key's latest get so far
    order = np.empty(k)
    t = 0.0
    disk = 0.0
    stall = 0.0
    for s in range(n_steps):
        n = 0
        for j in range(k):  # demand reads of the misses not read ahead
            if step_keys[s, j] < 0:
                continue
            last[step_keys[s, j]] = s * k + j
            if hit[s, j] == 0 and ready[s, j] < 0:
                disk = _read(t, disk, read_s)
                ready[s, j] = disk
        u = s + lookahead
        if mode > 0 and lookahead > 0 and u < n_steps:
            if mode == 1:
                for j in range(k):
                    if step_keys[u, j] >= 0 and hit[u, j] == 0:
                        disk = _read(t, disk, read_s)
                        ready[u, j] = disk
            else:
                for g in range(guesses.shape[1]):
                    guess = guesses[u, g]
                    if guess < 0:
                        continue
                    found = -1
                    for j in range(k):
                        if step_keys[u, j] == guess:
                            found = j
                    if found < 0:  # a wrong guess: bandwidth spent unless it is resident
                        i = last[guess]
                        if i < 0 or evicted[i // k, i % k] <= s:
                            disk = _read(t, disk, read_s)
                    elif hit[u, found] == 0 and ready[u, found] < 0:
                        disk = _read(t, disk, read_s)
                        ready[u, found] = disk
        for j in range(k):  # compute order: by the time each expert is ready
            if step_keys[s, j] < 0:
                continue
            r = t if hit[s, j] == 1 else max(t, ready[s, j])
            i = n
            while i > 0 and order[i - 1] > r:
                order[i] = order[i - 1]
                i -= 1
            order[i] = r
            n += 1
        c = t
        for i in range(n):
            c = max(c, order[i]) + compute_s
        stall += c - t - n * compute_s
        t = c
    return stall, t


def stall_per_token(trace: Trace, run: Result, timing: Timing, mode: str = "none",
                    guesses: np.ndarray | None = None) -> tuple[float, float]:
    """(stall seconds per token, total expert seconds per token) of one policy's run.
    ``guesses`` int [S, >=1]: expert ids (layer * n_experts + expert) guessed for each step, -1 none."""
    if mode not in MODES:
        raise ValueError(f"unknown prefetch mode {mode!r}; choose from {', '.join(MODES)}")
    if timing.bandwidth <= 0 or timing.expert_bytes <= 0 or timing.compute_s < 0 or timing.lookahead < 0:
        raise ValueError(f"timing inputs must be positive: {timing}")
    if mode == "predicted" and guesses is None:
        raise ValueError("the predicted mode needs guesses")
    g = np.zeros((0, 0), dtype=np.int64) if guesses is None else np.ascontiguousarray(guesses, dtype=np.int64)
    stall, total = _run(np.ascontiguousarray(trace.step_keys, dtype=np.int64),
                        np.ascontiguousarray(run.hit, dtype=np.uint8),
                        np.ascontiguousarray(run.evicted, dtype=np.int64),
                        trace.n_keys, float(timing.read_s), float(timing.compute_s), int(timing.lookahead),
                        MODES.index(mode), g)
    n = max(trace.n_tokens, 1)
    return stall / n, total / n


def previous_token_guesses(trace: Trace) -> np.ndarray:
    """int64 [S, k]: a predictor that needs no model: each step guesses the experts the
    previous token used in the same layer (none for a layer's first visit)."""
    guesses = np.full(trace.step_keys.shape, -1, dtype=np.int64)
    order = np.argsort(trace.step_layer, kind="stable")  # steps grouped by layer, in time order
    same = trace.step_layer[order[1:]] == trace.step_layer[order[:-1]]
    guesses[order[1:][same]] = trace.step_keys[order[:-1][same]]
    return guesses
