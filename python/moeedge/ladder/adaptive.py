"""moeedge.load(adaptive=True): the controller (moeedge.ladder.controller) wired to a
running model. Between two tokens it looks at

- the budget in force: model.set_budget's, or with memory_budget="auto" what the memory
  cgroups, memory pressure and MemAvailable leave (moeedge.runtime.pressure);
- the read bandwidth the cache's own reads achieve: bytes read over the seconds a read
  was in flight (the native cache's counters), since the last look, smoothed by the
  controller (WINDOW_S);
- the input: a prompt of at least LONG_PROMPT tokens is planned for its prefill, the
  tokens after it for decoding;

at most every OBSERVE_EVERY_S, and at once when the budget or the input changes. The
controller asks the planner (moeedge.ladder.planner.choose, the same cost model as
`moeedge plan`, with the bandwidth it sees) for the best plan within max_kl, and a switch
it decides is made by moeedge.ladder.switch. With max_kl=0 every plan is lossless.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from moeedge.ladder import pack
from moeedge.ladder.build import policy_curve
from moeedge.ladder.compose import compose_all, read_plan
from moeedge.ladder.controller import Candidate, Conditions, Controller
from moeedge.ladder.cost import Curve
from moeedge.ladder.live import apply, replanned
from moeedge.ladder.plan_source import measured_machine
from moeedge.ladder.planner import LOSSY_GAIN, choose, evaluate, layer_options
from moeedge.ladder.switch import switch_variants
from moeedge.keys import expert_key
from moeedge.ladder.variants import LOADABLE
from moeedge.runtime import pressure
from moeedge.runtime.measure import is_smallest, rss_bytes
from moeedge.runtime.plan import kernel_reserve, least_budget

OBSERVE_EVERY_S = 0.25
LONG_PROMPT = 64
BUDGET_STEP = 0.02
BPS_STEP = 2 ** 0.5  # an "auto" budget that moves less than this share is taken as unchanged


@dataclass
class Setup:
    ladder: Path
    manifest: dict
    max_kl: float
    machine: object  # moeedge.ladder.cost.Machine


def prepare(ckpt, plan, max_kl: float):
    """(checkpoint with every variant in its store, the starting variants, Setup) for
    load(adaptive=True): the ladder of plan if given, else the source's default pack."""
    if isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not max_kl >= 0:
        raise ValueError(f"max_kl must be a number at least 0, got {max_kl!r}")
    n_layers = len(getattr(ckpt.config, "moe_layers", []))
    if plan is not None:
        directory, variants = read_plan(plan)
    else:
        directory, variants = pack.default_dir(ckpt), ["stored"] * n_layers
        if pack.read_manifest(directory) is None:
            raise ValueError(f"adaptive=True needs the source's variant ladder and there is none at {directory}: "
                             f"build it with `moeedge ladder {ckpt.source}`, or pass plan= naming a ladder")
    composed, _ = compose_all(ckpt, directory, variants)
    manifest = pack.read_manifest(directory)
    machine = measured_machine(ckpt, directory, pack.identity_hash(manifest["identity"]), False)
    return composed, variants, Setup(directory, manifest, float(max_kl), machine)


class Adaptive:
    def __init__(self, model, setup: Setup, memory_budget):
        self.model, self.setup = model, setup
        cfg, store = model.config, model.cache.store
        self.n_layers, self.top_k = len(cfg.moe_layers), cfg.top_k
        self.options = layer_options(setup.manifest, self.n_layers)
        self.by_name = [{o.name: o for o in row} for row in self.options]
        self.slot = [{o.name: max(store.slot_bytes(expert_key(layer, e, LOADABLE[o.name]))
                                  for e in range(cfg.n_experts)) for o in row} for layer, row in enumerate(self.options)]
        self.curve = Curve.of(policy_curve(setup.ladder, setup.manifest, model.policy))
        plan = model.plan
        self.committed = plan.committed_bytes
        self.smallest_slot = max(min(row.values()) for row in self.slot)
        self.auto = isinstance(memory_budget, str) and memory_budget.strip().lower() == "auto"
        self.budget = plan.budget_bytes  # in force (or requested, until the next token applies it)
        self.pressure: pressure.Reading | None = None
        self._points: dict = {}
        self.last, self.phase = -math.inf, "decode"
        self.seen = (0, 0.0)  # the cache's (bytes_read, read_busy_seconds) at the last look
        variants = list(plan.expert_variants) or ["stored"] * self.n_layers
        start = Conditions(plan.budget_bytes, setup.machine.read_bps)
        self.controller = Controller(self.best, self.candidate, self.candidate(variants, start),
                                     since=time.monotonic(), read_bps=setup.machine.read_bps,
                                     budget_seen=plan.budget_bytes)
        self.switches: list[dict] = []

    # --- the planner under conditions ---------------------------------------------
    def cache_bytes(self, budget: int) -> int:
        return budget - self.committed - kernel_reserve(budget)

    def point(self, variants: tuple[str, ...], cond: Conditions):
        plan = tuple(self.by_name[layer][name] for layer, name in enumerate(variants))
        machine = replace(self.setup.machine, read_bps=cond.read_bps)
        return evaluate(plan, self.cache_bytes(cond.budget_bytes), machine, self.curve, self.top_k,
                        self.model.plan.prefill_chunk)

    def seconds(self, point, phase: str) -> float:
        if point is None:
            return math.inf
        return point.seconds if phase == "decode" else 1.0 / point.detail["prefill_tok_s"]

    def candidate(self, variants: list[str], cond: Conditions) -> Candidate:
        p = self.point(tuple(variants), cond)
        kl = sum(self.by_name[layer][name].kl for layer, name in enumerate(variants))
        needs = least_budget(self.committed + self.model.plan.prefill_borrow_bytes + self.top_k * max(
            self.slot[layer][name] for layer, name in enumerate(variants)))
        current = self.model.plan.expert_variants or ("stored",) * self.n_layers
        reads = sum(sum(self.by_name[layer][name].expert_bytes) for layer, name in enumerate(variants)
                    if name != current[layer])
        return Candidate(list(variants), self.seconds(p, cond.phase), kl, needs,
                         min(reads, self.cache_bytes(cond.budget_bytes)))

    def best(self, cond: Conditions) -> Candidate:
        """The planner's plan under cond within max_kl, memoized with the bandwidth in steps of
        BPS_STEP (the planner takes a fraction of a second: it runs on the token path)."""
        key = (self.cache_bytes(cond.budget_bytes), round(math.log(max(cond.read_bps, 1.0), BPS_STEP)), cond.phase)
        if key not in self._points:
            bps = BPS_STEP ** key[1]
            c = choose(self.options, key[0], replace(self.setup.machine, read_bps=bps), self.curve, self.top_k,
                       self.model.plan.prefill_chunk, self.setup.max_kl)
            chosen = c.chosen
            if cond.phase == "prefill":  # the frontier is by decode speed: pick by prefill speed in it
                within = [p for p in c.frontier + [c.chosen] if p.kl <= self.setup.max_kl]
                chosen = min(within, key=lambda p: (self.seconds(p, "prefill"), p.kl))
                if c.lossless is not None and self.seconds(c.lossless, "prefill") <= self.seconds(
                        chosen, "prefill") * LOSSY_GAIN:
                    chosen = c.lossless
            self._points[key] = chosen.variants
        return self.candidate(self._points[key], cond)

    # --- watching the running model -----------------------------------------------
    def request(self, budget) -> None:
        """model.set_budget: checked now (BudgetError below the smallest plan's minimum),
        applied between two tokens; it replaces watching "auto"."""
        if is_smallest(budget):
            raise ValueError("set_budget('min') is not supported on an adaptive model: give bytes")
        self.budget = replanned(self.model, budget, self.smallest_slot).budget_bytes
        self.auto = False

    def watched_budget(self) -> int:
        if not self.auto:
            return self.budget
        r = self.pressure = pressure.reading(rss=rss_bytes())
        least = least_budget(self.committed + self.model.plan.prefill_borrow_bytes + self.top_k * self.smallest_slot)
        b = max(least, r.budget_bytes)
        held = r.pressure is not None and r.pressure > pressure.PRESSURE_HOLD
        if abs(b - self.budget) < BUDGET_STEP * self.budget or (held and b > self.budget):
            return self.budget
        return b

    def read_bps(self) -> float | None:
        s = self.model.cache.stats()
        now = (s["bytes_read"], s["read_busy_seconds"])
        got, busy = now[0] - self.seen[0], now[1] - self.seen[1]
        self.seen = now
        return got / busy if got > 0 and busy > 1e-4 else None

    def between_tokens(self, phase: str = "decode", tokens: int = 1) -> None:
        """Look, and switch or resize if the controller says so (holding the model)."""
        now = time.monotonic()
        budget = self.watched_budget()
        changed = budget != self.model.plan.budget_bytes
        if not changed and phase == self.phase and now - self.last < OBSERVE_EVERY_S:
            return
        self.last, self.phase, self.budget = now, phase, budget
        bps = self.read_bps()
        s = self.controller.observe(now, budget, bps, phase, tokens if phase == "prefill" else None)
        model = self.model
        memory = replanned(model, budget, self.smallest_slot) if changed else model.plan
        if s is not None:
            record = switch_variants(model, s.after, memory)
            self.switches.append({**record, "reason": s.reason, "budget_bytes": budget, "phase": phase,
                                  "read_bps": self.controller.read_bps, "seen_read_bps": bps})
        elif changed:
            apply(model, memory)
        if changed:
            model.budget_changes.append({"at": time.time(), "budget_bytes": budget,
                                         "expert_cache_bytes": model.cache.budget_bytes,
                                         "resident_bytes": model.cache.stats()["resident_bytes"],
                                         "variants": list(model.plan.expert_variants)})

    def before_prompt(self, n_tokens: int) -> None:
        self.between_tokens("prefill" if n_tokens >= LONG_PROMPT else "decode", n_tokens)

    def stats(self) -> dict:
        variants = list(self.model.plan.expert_variants)
        kl = sum(self.by_name[layer][name].kl for layer, name in enumerate(variants))
        return {"ladder": str(self.setup.ladder), "max_kl": self.setup.max_kl, "variants": variants,
                "kl_sum": kl, "lossless": all(v == "stored" for v in variants), "budget_bytes": self.budget,
                "auto": self.auto, "read_bps_smoothed": self.controller.read_bps, "phase": self.phase,
                "pressure": None if self.pressure is None else vars(self.pressure), "switches": list(self.switches)}
