"""When to switch plans while a model runs: the decision, without the model.

Observations come in with their time: the budget in force (bytes) and the read
bandwidth the cache achieved (bytes/s over its recent reads). Bandwidth is smoothed
exponentially with a time constant of WINDOW_S seconds, so a burst shorter than that
moves it little. At each observation the controller asks the planner (a callable:
conditions -> the best plan's Point-like (variants, seconds per token)) for the best
plan under the smoothed conditions, and switches only when all of these hold:

- a budget below what the current plan needs is obeyed at once (a shrink is not a
  choice: the memory is gone), whatever the dwell time; so is any fall of the budget:
  the plan is re-chosen for it at once, and taken if it differs;
- otherwise, the plan has been in force at least MIN_DWELL_S, unless the input changed
  (a long prompt begins or ends: phase "prefill" or "decode");
- the expected gain over the next HORIZON_TOKENS tokens, (t_now - t_new) * HORIZON,
  exceeds the switch's cost (the new variants' bytes read at the smoothed bandwidth)
  times a margin (HORIZON_TOKENS is the prompt's length while one is read): UP_MARGIN when the new plan is more lossless (it brings back better
  variants), DOWN_MARGIN when it is lossier. Separate thresholds keep a plan from
  flapping between two that are nearly as fast;
- or, after the dwell, the best plan is more lossless than the current one and expected
  no more than AS_FAST slower: quality comes back whenever the conditions allow it (a
  budget that returns), though the switch saves no time.

Every switch is recorded with its time, the plans and the reason (model.stats()).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

WINDOW_S = 5.0
MIN_DWELL_S = 10.0
HORIZON_TOKENS = 256
UP_MARGIN = 2.0
DOWN_MARGIN = 1.5
AS_FAST = 1.05


@dataclass
class Conditions:
    budget_bytes: int
    read_bps: float
    phase: str = "decode"  # or "prefill": a long prompt is being read


@dataclass
class Candidate:
    variants: list[str]
    seconds: float        # expected per token under the conditions it was planned for
    kl: float
    needs_bytes: int      # the smallest budget it runs in
    switch_bytes: int = 0  # bytes to read to bring its variants in (set by the controller's caller)


@dataclass
class Switch:
    at: float
    before: list[str]
    after: list[str]
    reason: str


@dataclass
class Controller:
    best: Callable[[Conditions], Candidate]                       # the planner under these conditions
    cost: Callable[[list[str], Conditions], Candidate]           # the current plan under these conditions
    current: Candidate
    window_s: float = WINDOW_S
    min_dwell_s: float = MIN_DWELL_S
    horizon_tokens: int = HORIZON_TOKENS
    since: float = 0.0
    read_bps: float | None = None     # smoothed; the caller may seed it (its measured bandwidth)
    last_seen: float | None = None
    budget_seen: int | None = None
    phase: str = "decode"
    switches: list[Switch] = field(default_factory=list)

    def smooth(self, now: float, read_bps: float) -> float:
        if self.read_bps is None or self.last_seen is None:
            self.read_bps = read_bps
        else:
            keep = math.exp(-max(0.0, now - self.last_seen) / self.window_s)
            self.read_bps = keep * self.read_bps + (1 - keep) * read_bps
        self.last_seen = now
        return self.read_bps

    def observe(self, now: float, budget_bytes: int, read_bps: float | None, phase: str = "decode",
                horizon: int | None = None) -> Switch | None:
        """The switch to make now, if any (already recorded and in force). read_bps None:
        no reads were seen since the last observation (the smoothed value stands)."""
        if read_bps is not None or self.read_bps is None:
            self.smooth(now, read_bps)
        cond = Conditions(budget_bytes, self.read_bps, phase)
        fell = self.budget_seen is not None and budget_bytes < self.budget_seen
        turned = phase != self.phase
        self.budget_seen, self.phase = budget_bytes, phase
        if self.current.needs_bytes > budget_bytes:
            return self._switch(now, self.best(cond), f"the budget fell to {budget_bytes} bytes, below the "
                                                      f"{self.current.needs_bytes} the plan needs")
        if fell:
            new = self.best(cond)
            if new.variants == self.current.variants:
                return None
            return self._switch(now, new, f"the budget fell to {budget_bytes} bytes: re-planned at once")
        if not turned and now - self.since < self.min_dwell_s:
            return None
        new, now_plan = self.best(cond), self.cost(self.current.variants, cond)
        if new.variants == self.current.variants:
            return None
        if new.kl < now_plan.kl and new.seconds <= now_plan.seconds * AS_FAST:
            return self._switch(now, new, f"more lossless (KL {new.kl:.2e} < {now_plan.kl:.2e}) and as fast "
                                          f"({phase}) at a budget of {budget_bytes} bytes")
        horizon = horizon or self.horizon_tokens
        gain = (now_plan.seconds - new.seconds) * horizon
        price = new.switch_bytes / cond.read_bps
        margin = UP_MARGIN if new.kl < now_plan.kl else DOWN_MARGIN
        if gain <= margin * price or gain <= 0:
            return None
        return self._switch(now, new, f"expected {gain:.3f} s saved over {horizon} tokens ({phase}) against "
                                      f"{price:.3f} s to read its variants (x{margin} margin), at "
                                      f"{cond.read_bps / 1e6:.0f} MB/s and a budget of {budget_bytes} bytes")

    def _switch(self, now: float, new: Candidate, reason: str) -> Switch:
        s = Switch(now, self.current.variants, new.variants, reason)
        self.switches.append(s)
        self.current, self.since = new, now
        return s
