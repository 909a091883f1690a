"""Cache policies over a Trace, as numba-compiled loops (the access model: moeedge.sim).

Policies (victim = the resident expert, in the missing expert's cache, that goes first):
Only experts outside the current step are candidates (a step's experts are pinned).
- lru:    least recently got. Equal to ExpertCache(policy="lru").
- lfu:    fewest gets over the whole run (counts survive eviction), ties to the least
          recent. Equal to ExpertCache(policy="lfu").
- lfru:   frequency with recency decay (LRFU): each get adds 1 to a key's count, and
          counts halve every ``half_life`` gets (default: the cache's capacity in
          experts); lowest decayed count first, ties to the least recent.
- layer:  layer-aware, for the cyclic layer pattern: evict from the layer whose next
          visit is furthest ahead (the layer schedule is fixed and known: token after
          token, layer after layer), least recent within that layer. A shared cache
          smaller than a token's working set then keeps the layers due soonest instead
          of evicting exactly what the next token needs, as LRU does. With a cache
          per layer it is LRU.
- score:  lowest score, ties to the least recent, like ExpertCache(policy="score");
          the score of a key is the one given with its latest get (``scores[s, j]``
          for the step's j-th key, e.g. a predictor's). ``frequency_prior`` gives a
          score that needs no predictor.
- predicted: Belady's rule on an estimate of the future (moeedge.sim.predicted): the
          known layer schedule, each expert's online pick rate, and a predictor's
          guesses for the current token's next layers (``guesses``).
- belady: MIN, offline optimal: evict the expert whose next use (in steps) is furthest
          away, never again first, ties to the least recent. No demand-paging policy
          hits more in this model (tests check it against brute force), so it is the
          upper bound on hit rate.

Every loop but layer's is one indexed binary heap per cache over (p1, p2) priorities,
O(log capacity) per get; layer keeps an LRU list per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from moeedge.policies import PICK_RATE_ALPHA, PREDICTED_DISCOUNT
from moeedge.sim import POLICIES

if TYPE_CHECKING:
    from moeedge.sim import Trace

_HEAP_MODE = {"lru": 0, "lfu": 1, "lfru": 2, "score": 3, "belady": 4}


@dataclass
class Result:
    """Counts of one run. ``hit`` uint8 [S, k] marks each access (0 also for padding);
    ``evicted`` int64 [S, k] is the step at which the expert that access got was next
    evicted (S if never), so an expert is resident after step s when its latest access
    up to s has ``evicted > s``."""

    policy: str
    capacity: int
    per_layer: bool
    hits: int
    accesses: int
    hit: np.ndarray
    evicted: np.ndarray

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


# --------------------------------------------------------------------------- indexed heap

@njit(cache=True, inline="always")
def _before(a, b, p1, p2):
    return p1[a] < p1[b] or (p1[a] == p1[b] and p2[a] < p2[b])


@njit(cache=True)
def _sift_up(heap, part, i, pos, p1, p2):
    key = heap[part, i]
    while i > 0:
        parent = (i - 1) >> 1
        other = heap[part, parent]
        if not _before(key, other, p1, p2):
            break
        heap[part, i] = other
        pos[other] = i
        i = parent
    heap[part, i] = key
    pos[key] = i


@njit(cache=True)
def _sift_down(heap, part, i, size, pos, p1, p2):
    key = heap[part, i]
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and _before(heap[part, child + 1], heap[part, child], p1, p2):
            child += 1
        other = heap[part, child]
        if not _before(other, key, p1, p2):
            break
        heap[part, i] = other
        pos[other] = i
        i = child
    heap[part, i] = key
    pos[key] = i


@njit(cache=True)
def _next_use(step_keys, n_keys):
    """[S, k] the step of each key's next use after this one; S (= never) if none."""
    n_steps, k = step_keys.shape
    out = np.full((n_steps, k), n_steps, dtype=np.int64)
    seen = np.full(n_keys, n_steps, dtype=np.int64)
    for s in range(n_steps - 1, -1, -1):
        for j in range(k):
            key = step_keys[s, j]
            if key >= 0:
                out[s, j] = seen[key]
                seen[key] = s
    return out


@njit(cache=True)
def _heap_remove(heap, part, i, size, pos, p1, p2):
    """Take the key at heap[part, i] out; returns the new size."""
    key = heap[part, i]
    size -= 1
    if i < size:  # the last key fills the hole, then finds its place up or down
        moved = heap[part, size]
        heap[part, i] = moved
        pos[moved] = i
        _sift_up(heap, part, i, pos, p1, p2)
        _sift_down(heap, part, pos[moved], size, pos, p1, p2)
    pos[key] = -1
    return size


@njit(cache=True)
def _run_heap(step_keys, key_part, n_parts, capacity, mode, scores, half_life, hit, evicted):
    """One heap per cache; mode 0 lru, 1 lfu, 2 lfru, 3 score, 4 belady. Returns hits.

    The heaps hold the unpinned residents: a step's keys leave their heap while the
    step runs (pinned, never a victim) and go back, with their new priorities, after it.
    """
    n_steps, k = step_keys.shape
    n_keys = key_part.shape[0]
    heap = np.empty((n_parts, capacity), dtype=np.int64)
    size = np.zeros(n_parts, dtype=np.int64)     # unpinned residents
    count = np.zeros(n_parts, dtype=np.int64)    # all residents
    pos = np.full(n_keys, -1, dtype=np.int64)    # index in its heap; -1: absent or pinned
    p1 = np.zeros(n_keys)                 # primary priority: lowest is evicted first
    p2 = np.zeros(n_keys)                 # recency tick: ties to the least recent
    uses = np.zeros(n_keys)               # lfu: gets over the run
    decayed = np.full(n_keys, -np.inf)    # lfru: log2(count * 2**(tick / half_life))
    nxt = _next_use(step_keys, n_keys) if mode == 4 else np.zeros((0, 0), dtype=np.int64)
    last = np.zeros(n_keys, dtype=np.int64)  # s * k + j of each key's latest get
    tick = 0
    hits = 0
    for s in range(n_steps):
        for phase in range(2):  # 0: the resident keys (hits), 1: the missing ones
            for j in range(k):
                key = step_keys[s, j]
                if key < 0 or (phase == 0) != (pos[key] >= 0) or (phase == 1 and hit[s, j] == 1):
                    continue
                tick += 1
                part = key_part[key]
                if mode == 0:
                    p1[key] = tick
                elif mode == 1:
                    uses[key] += 1.0
                    p1[key] = uses[key]
                elif mode == 2:
                    # log2(2**decayed + 2**(tick/h)): the count decays by half every h gets
                    a, b = decayed[key], tick / half_life
                    hi, lo = max(a, b), min(a, b)
                    decayed[key] = hi + np.log2(1.0 + 2.0 ** (lo - hi))
                    p1[key] = decayed[key]
                elif mode == 3:
                    p1[key] = scores[s, j]
                else:
                    p1[key] = -nxt[s, j]
                p2[key] = tick
                last[key] = s * k + j
                if phase == 0:  # a hit: pin it
                    hits += 1
                    hit[s, j] = 1
                    size[part] = _heap_remove(heap, part, pos[key], size[part], pos, p1, p2)
                    continue
                if count[part] == capacity:  # evict the unpinned resident that ranks lowest
                    victim = heap[part, 0]
                    size[part] = _heap_remove(heap, part, 0, size[part], pos, p1, p2)
                    evicted[last[victim] // k, last[victim] % k] = s
                    count[part] -= 1
                count[part] += 1
        for j in range(k):  # unpin the step's keys
            key = step_keys[s, j]
            if key >= 0:
                part = key_part[key]
                heap[part, size[part]] = key
                size[part] += 1
                _sift_up(heap, part, size[part] - 1, pos, p1, p2)
    return hits


# --------------------------------------------------------------------------- layer-aware

@njit(cache=True, inline="always")
def _unlink(key, layer, older, newer, oldest, newest):
    if older[key] >= 0:
        newer[older[key]] = newer[key]
    else:
        oldest[layer] = newer[key]
    if newer[key] >= 0:
        older[newer[key]] = older[key]
    else:
        newest[layer] = older[key]


@njit(cache=True)
def _run_layer(step_keys, step_layer, n_layers, n_experts, per_layer, capacity, hit, evicted):
    """LRU list per layer; a miss evicts from the layer visited furthest ahead.

    A step's keys are the newest of its layer's list once got, so the layer's oldest
    is unpinned while the layer holds more keys than the step has pinned.
    """
    n_steps, k = step_keys.shape
    n_keys = n_layers * n_experts
    after = np.full(n_steps, n_steps, dtype=np.int64)   # next step of the same layer
    visit = np.full(n_layers, n_steps, dtype=np.int64)  # next visit of each layer
    for s in range(n_steps - 1, -1, -1):
        after[s] = visit[step_layer[s]]
        visit[step_layer[s]] = s
    older = np.full(n_keys, -1, dtype=np.int64)
    newer = np.full(n_keys, -1, dtype=np.int64)
    oldest = np.full(n_layers, -1, dtype=np.int64)
    newest = np.full(n_layers, -1, dtype=np.int64)
    count = np.zeros(n_layers, dtype=np.int64)
    resident = np.zeros(n_keys, dtype=np.bool_)
    last = np.zeros(n_keys, dtype=np.int64)  # s * k + j of each key's latest get
    total = 0
    hits = 0
    for s in range(n_steps):
        here = step_layer[s]
        visit[here] = after[s]  # this layer is next due a full cycle from now
        pinned = 0
        for phase in range(2):
            for j in range(k):
                key = step_keys[s, j]
                if key < 0 or (phase == 0) != resident[key] or (phase == 1 and hit[s, j] == 1):
                    continue
                last[key] = s * k + j
                if phase == 0:
                    hits += 1
                    hit[s, j] = 1
                    _unlink(key, here, older, newer, oldest, newest)
                else:
                    if (count[here] if per_layer else total) == capacity:
                        victim_layer = here
                        if not per_layer:
                            best = -1
                            for layer in range(n_layers):
                                free = count[layer] - (pinned if layer == here else 0)
                                if free > 0 and visit[layer] > best:
                                    best, victim_layer = visit[layer], layer
                        victim = oldest[victim_layer]
                        _unlink(victim, victim_layer, older, newer, oldest, newest)
                        resident[victim] = False
                        evicted[last[victim] // k, last[victim] % k] = s
                        count[victim_layer] -= 1
                        total -= 1
                    resident[key] = True
                    count[here] += 1
                    total += 1
                pinned += 1
                older[key], newer[key] = newest[here], -1  # the newest of its layer
                if newest[here] >= 0:
                    newer[newest[here]] = key
                else:
                    oldest[here] = key
                newest[here] = key
    return hits


# --------------------------------------------------------------------------- entry points

def frequency_prior(train: Trace, n_keys: int) -> np.ndarray:
    """float64 [n_keys]: how often each key was got in ``train`` (a score for "score")."""
    keys = train.step_keys[train.step_keys >= 0]
    return np.bincount(keys, minlength=n_keys).astype(np.float64)


def pick_rate(train: Trace, n_keys: int) -> np.ndarray:
    """float64 [n_keys]: the share of ``train``'s tokens that picked each key."""
    return frequency_prior(train, n_keys) / max(1, train.n_tokens)


def scores_from_prior(trace: Trace, prior: np.ndarray) -> np.ndarray:
    """float64 [S, k]: each access's score, a fixed per-key score (padding 0)."""
    return np.where(trace.step_keys >= 0, prior[np.maximum(trace.step_keys, 0)], 0.0)


def simulate(trace: Trace, policy: str, capacity: int, per_layer: bool = False,
             scores: np.ndarray | None = None, half_life: float | None = None, guesses: np.ndarray | None = None,
             pick_rate: np.ndarray | None = None) -> Result:
    """Replay ``trace`` through one policy with ``capacity`` experts (per layer if ``per_layer``).

    ``scores`` float [S, k] feeds "score" (default all 0.0: LRU); ``half_life`` in gets
    tunes "lfru" (default: the total capacity in experts). "predicted" takes ``guesses``
    float [S, D, E] (moeedge.predict.metrics.guess_matrix; default none) and starts from
    ``pick_rate`` [n_keys], the chance a token picks each expert (default k / E).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    capacity = int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 expert, got {capacity}")
    if capacity < trace.step_size:
        raise ValueError(f"capacity {capacity} cannot hold one layer's {trace.step_size} experts "
                         f"(a step's experts are resident together)")
    cap = min(capacity, trace.n_experts if per_layer else trace.n_keys)  # more never helps
    keys = np.ascontiguousarray(trace.step_keys, dtype=np.int64)
    hit = np.zeros(keys.shape, dtype=np.uint8)
    evicted = np.full(keys.shape, keys.shape[0], dtype=np.int64)
    if policy == "predicted":
        from moeedge.sim.predicted import run_predicted

        if guesses is None:
            guesses = np.zeros((keys.shape[0], 0, trace.n_experts))
        if guesses.shape[0] != keys.shape[0] or guesses.shape[2] != trace.n_experts:
            raise ValueError(f"guesses must be [steps={keys.shape[0]}, D, experts={trace.n_experts}], "
                             f"got {list(guesses.shape)}")
        if pick_rate is None:
            pick_rate = np.full(trace.n_keys, trace.top_k / trace.n_experts)
        hits = run_predicted(keys, np.ascontiguousarray(trace.step_layer, dtype=np.int64), trace.n_layers,
                             trace.n_experts, cap, per_layer, np.asarray(pick_rate, dtype=np.float64), PICK_RATE_ALPHA,
                             PREDICTED_DISCOUNT,
                             np.ascontiguousarray(guesses, dtype=np.float64), hit, evicted)
    elif policy == "layer":
        hits = _run_layer(keys, np.ascontiguousarray(trace.step_layer, dtype=np.int64), trace.n_layers,
                          trace.n_experts, per_layer, cap, hit, evicted)
    else:
        if per_layer:
            key_part, n_parts = np.arange(trace.n_keys, dtype=np.int64) // trace.n_experts, trace.n_layers
        else:
            key_part, n_parts = np.zeros(trace.n_keys, dtype=np.int64), 1
        if scores is None:
            scores = np.zeros(keys.shape)
        scores = np.ascontiguousarray(scores, dtype=np.float64)
        if scores.shape != keys.shape:
            raise ValueError(f"scores must be shaped like the trace's steps {list(keys.shape)}, "
                             f"got {list(scores.shape)}")
        total = cap * (n_parts if per_layer else 1)
        h = float(half_life if half_life is not None else total)
        if h <= 0:
            raise ValueError(f"half_life must be positive, got {h}")
        hits = _run_heap(keys, key_part, n_parts, cap, _HEAP_MODE[policy], scores, h, hit, evicted)
    return Result(policy, capacity, per_layer, int(hits), trace.n_accesses, hit, evicted)
