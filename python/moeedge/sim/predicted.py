"""The "predicted" policy: Belady's rule with the future replaced by an estimate of it.

Belady evicts the expert whose next use is furthest away. Online, the layer schedule
is known exactly (token after token, layer after layer), so the only unknown is
whether a token will pick the expert when it reaches that expert's layer. For an
expert of MoE layer m, seen from the step at layer l of the current token:
- delta = steps until the schedule next reaches layer m: m - l, or m - l + L when m <= l;
- p = the chance that a token picks it, tracked online as an exponential moving
  average over the tokens so far (recent tokens weigh more: routing drifts with the text);
- q = the chance that it is picked at that next visit, when the visit is within a
  predictor's lookahead (the model's own guess, made at layer l from this token's hidden
  state; past the last layer, about the next token); otherwise p.
Its worth is its expected uses, each discounted by g per step until it comes:
q * g**delta + p * g**(delta + L) / (1 - g**L) (the next visit, then every later one).
The victim is the unpinned resident worth least (ties to the least recent). The
discount, rather than the expected time of the next use (delta + (1 - q) * L / p),
because that mean is ruled by the rare long waits of 1 / p: an expert a token picks
half the time and one picked a fifth of the time rank by how long the unlucky case
lasts, where what counts is the chance of a use before the cache turns over
(on the default model's held-out trace, with the same predictor guessing 3 steps
ahead, the share of the LRU-Belady gap closed rose from 32-53% to 39-58% at
capacities 8-24).
Every input is the past or the model's own prediction, never the trace's future.
"""
from __future__ import annotations

import numpy as np
from numba import njit



@njit(cache=True)
def run_predicted(step_keys, step_layer, n_layers, n_experts, capacity, per_layer, prior, alpha, discount,
                  guesses, hit, evicted):
    """guesses float [S, D, E]: at step s, the chance that each expert of the layer d + 1
    steps on is picked there (this token's, or past the last layer the next token's; -1:
    no guess; D may be 0). prior float [n_keys]: starting p. Returns hits."""
    n_steps, k = step_keys.shape
    n_keys = n_layers * n_experts
    n_ahead = guesses.shape[1]
    p = prior.copy()
    q = np.full(n_keys, -1.0)                   # this token's guess for the key; -1: none
    resident = np.zeros(n_keys, dtype=np.bool_)
    pinned = np.zeros(n_keys, dtype=np.bool_)
    count = np.zeros(n_layers if per_layer else 1, dtype=np.int64)
    last = np.zeros(n_keys, dtype=np.int64)     # s * k + j of each key's latest get
    recent = np.zeros(n_keys, dtype=np.int64)   # the tick of each key's latest get
    used = np.zeros(n_experts, dtype=np.bool_)
    later = discount ** n_layers / (1.0 - discount ** n_layers)  # every visit after the next
    tick = hits = 0
    for s in range(n_steps):
        layer = step_layer[s]
        for e in range(n_experts):
            q[layer * n_experts + e] = -1.0     # this token's visit is now: guesses spent
        for d in range(min(n_ahead, n_layers)):
            m = (layer + d + 1) % n_layers      # past the last layer: the next token's visit
            for e in range(n_experts):
                q[m * n_experts + e] = guesses[s, d, e]  # -1: no guess, the pick rate stands
        for j in range(k):
            key = step_keys[s, j]
            if key >= 0:
                pinned[key] = True
        for phase in range(2):                  # hits first, then misses (as the other policies)
            for j in range(k):
                key = step_keys[s, j]
                if key < 0 or (phase == 0) != resident[key] or (phase == 1 and hit[s, j] == 1):
                    continue
                last[key] = s * k + j
                tick += 1
                recent[key] = tick
                if phase == 0:
                    hits += 1
                    hit[s, j] = 1
                    continue
                part = key // n_experts if per_layer else 0
                if count[part] == capacity:
                    victim, least = -1, np.inf
                    for c in range(n_keys):
                        if not resident[c] or pinned[c] or (per_layer and c // n_experts != part):
                            continue
                        m = c // n_experts
                        delta = m - layer if m > layer else m - layer + n_layers
                        chance = q[c] if q[c] >= 0.0 else p[c]
                        worth = (chance + p[c] * later) * discount ** delta
                        if worth < least or (worth == least and recent[c] < recent[victim]):  # ties: least recent
                            victim, least = c, worth
                    resident[victim] = False
                    evicted[last[victim] // k, last[victim] % k] = s
                    count[part] -= 1
                resident[key] = True
                count[part] += 1
        used[:] = False
        for j in range(k):
            key = step_keys[s, j]
            if key >= 0:
                pinned[key] = False
                used[key - layer * n_experts] = True
        for e in range(n_experts):
            c = layer * n_experts + e
            p[c] = (1.0 - alpha) * p[c] + alpha * (1.0 if used[e] else 0.0)
    return hits
