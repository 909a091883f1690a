"""How many tokens speculative decoding drafts per round (moeedge.speculative): the k whose
expected tokens per second is highest, from what this run measures:

  acceptance a (each drafted token kept with chance a, until the first rejection),
  c_d  seconds per draft step,  c_v(n)  seconds per verify pass of n tokens,  c_1  per plain step;
  a round of k yields E(k) = (1 - a^(k+1)) / (1 - a) tokens in k c_d + c_v(k + 1) seconds.

k = 0 (plain decoding) when no k beats 1 / c_1 by MARGIN. Trying costs: a round that does
not pay, the draft catching up on the tokens it has not run, and, under a limit, its experts
read back into memory (switch_cost, priced by the speculator). So
drafting is bounded by what it has actually cost: every round's whole wall time (catch-up
and read-back included) against what plain steps would have taken for its tokens adds to a
running loss (a paying round lowers it), and a round is drafted only while that loss stays
within ALLOW of the plain time of every token so far, a probe only once the room left covers
its predicted price. A run that never pays thus loses about ALLOW, never much more than one
round beyond it, however short; probes also wait PROBE plain tokens, doubling while they
keep not paying, up to PROBE_MAX.
"""
from __future__ import annotations

DECAY = 0.95     # weight of the past in the acceptance counts (about the last 20 rounds)
EMA = 0.2        # weight of the newest timing
MARGIN = 1.03    # a k must beat plain decoding's tokens/s by this much to be used
PROBE = 32       # plain tokens before a round is drafted again, doubling up to PROBE_MAX
PROBE_MAX = 1024
WARM = 8         # plain steps measured before the first drafted round
PROBE_K = 2      # a probe drafts at most this many: it only re-measures
ALLOW = 0.04     # the share of plain decoding's time that trying may lose
GUESS = 1.0      # before any round, a round is guessed to lose this many plain steps


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1.0 - EMA) * old + EMA * new


def expected_tokens(a: float, k: int) -> float:
    """Tokens a round of k drafts yields at acceptance a (the kept ones and the full model's own)."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class KChooser:
    def __init__(self, k_max: int = 6, k_start: int = 1):
        if not 1 <= k_max <= 16:
            raise ValueError(f"k_max must be from 1 to 16, got {k_max}")
        self.k_max = k_max
        self.k_start = min(k_start, k_max)  # the first round: the cheapest, where nothing is known yet
        self.k = 0                        # the first step is plain: it measures c_1
        self.kept = self.trials = 0.0     # decayed: drafted tokens kept, and tokens tried
        self.draft_cost: float | None = None
        self.verify_cost: dict[int, float] = {}
        self.plain_cost: float | None = None
        self.plain_since = 0              # plain steps since the last drafted round
        self.probe = PROBE
        self.fixed: int | None = None     # a k to use whatever is measured (benchmarks, tests)
        self.tokens = 0                   # every token observed, plain or drafted
        self.loss = 0.0                   # seconds drafted rounds took beyond plain steps (< 0: gained)
        self.switch_cost = 0.0            # seconds a probe costs beyond its round (set by the speculator)

    @property
    def acceptance(self) -> float | None:
        return self.kept / self.trials if self.trials else None

    def observe_round(self, k: int, kept: int, draft_seconds: float, verify_seconds: float,
                      total_seconds: float | None = None) -> None:
        """A drafted round: k drafts, `kept` of them kept; total_seconds: its whole wall time
        (a catch-up and reading the draft's experts back included; default draft + verify)."""
        total = draft_seconds + verify_seconds if total_seconds is None else total_seconds
        if self.plain_cost is not None:
            self.loss += total - (kept + 1) * self.plain_cost
        self.tokens += kept + 1
        self.kept = DECAY * self.kept + kept
        self.trials = DECAY * self.trials + kept + (kept < k)  # geometric: trials stop at the rejection
        self.draft_cost = _ema(self.draft_cost, draft_seconds / k)
        self.verify_cost[k + 1] = _ema(self.verify_cost.get(k + 1), verify_seconds)
        self.plain_since = 0
        probed = self.k == 0
        self._update()
        if probed and self.k == 0:  # still does not pay: look again later
            self.probe = min(PROBE_MAX, 2 * self.probe)

    def observe_plain(self, seconds: float) -> None:
        self.plain_cost = _ema(self.plain_cost, seconds)
        self.verify_cost[1] = self.plain_cost
        self.plain_since += 1
        self.tokens += 1
        self._update()

    def verify(self, n: int) -> float | None:
        """c_v(n): measured, else on the line through the measured sizes nearest below and above
        (above the largest, on the line from one token to it)."""
        if n in self.verify_cost:
            return self.verify_cost[n]
        sizes = sorted(self.verify_cost)
        if len(sizes) < 2:
            return None
        lo = max([s for s in sizes if s < n], default=sizes[0])
        hi = min([s for s in sizes if s > n], default=sizes[-1])
        if hi == lo:
            lo = sizes[0]
        slope = (self.verify_cost[hi] - self.verify_cost[lo]) / (hi - lo)
        return self.verify_cost[lo] + slope * (n - lo)

    def rate(self, k: int) -> float | None:
        """Expected tokens per second at k (k = 0: plain decoding); None until measured."""
        if k == 0:
            return 1.0 / self.plain_cost if self.plain_cost else None
        a, v = self.acceptance, self.verify(k + 1)
        if a is None or v is None or self.draft_cost is None:
            return None
        return expected_tokens(a, k) / max(1e-9, k * self.draft_cost + v)

    def room(self) -> float:
        """Seconds drafting may still lose: ALLOW of the plain time of every token so far, less
        what drafted rounds have lost (plus what they gained)."""
        return ALLOW * self.tokens * (self.plain_cost or 0.0) - self.loss

    def probe_price(self, k: int) -> float:
        """Predicted seconds a probe round of k loses against plain steps (its switch included)."""
        rate = self.rate(k)
        if rate is None:
            return self.switch_cost + GUESS * self.plain_cost
        seconds = expected_tokens(self.acceptance, k) / rate
        return self.switch_cost + max(0.0, seconds - expected_tokens(self.acceptance, k) * self.plain_cost)

    def best(self) -> int:
        """The drafted k of highest expected rate (the current one where nothing is known)."""
        rates = {k: self.rate(k) for k in range(1, self.k_max + 1)}
        known = {k: r for k, r in rates.items() if r is not None}
        return max(known, key=known.get) if known else max(1, self.k)

    def _update(self) -> None:
        plain = self.rate(0)
        if plain is None:  # nothing to compare with yet: the next step is a plain one
            self.k = 0
            return
        if self.acceptance is None:  # never drafted yet: try, once plain decoding is measured and it can be afforded
            self.k = self.k_start if self.plain_since >= WARM and self.room() >= self.probe_price(self.k_start) else 0
            return
        k = self.best()
        if (self.rate(k) or 0.0) > MARGIN * plain and self.room() >= 0.0:
            self.k, self.probe = k, PROBE
        else:  # off; choose() drafts a probe round every `probe` plain steps
            self.k = 0

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.k == 0 and self.acceptance is not None and self.plain_since >= self.probe:
            k = min(PROBE_K, self.best())
            if self.room() >= self.probe_price(k):
                return k  # a probe: its round re-measures acceptance and costs
        return self.k

    def stats(self) -> dict:
        return {"acceptance_estimate": round(self.acceptance, 4) if self.acceptance is not None else None,
                "draft_step_seconds": self.draft_cost, "verify_pass_seconds": dict(sorted(self.verify_cost.items())),
                "plain_step_seconds": self.plain_cost, "drafting_loss_seconds": round(self.loss, 4),
                "switch_seconds": self.switch_cost}
