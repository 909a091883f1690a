"""moeedge.ladder.controller: switches only when they pay, never flapping."""
from __future__ import annotations

import math

from moeedge.ladder.controller import Candidate, Conditions, Controller

MB = 1_000_000
# Two plans: "stored" reads 4 MB a token, "int4" 1 MB but computes 2 ms more.
PLANS = {"stored": (0.010, 4 * MB, 0.0, 300 * MB), "int4": (0.012, 1 * MB, 2e-3, 200 * MB)}


def cost(variants: list[str], cond: Conditions) -> Candidate:
    compute, read, kl, needs = PLANS[variants[0]]
    return Candidate(variants, compute + read / cond.read_bps, kl, needs, switch_bytes=8 * MB)


def best(cond: Conditions) -> Candidate:
    fits = [cost([name], cond) for name in PLANS if PLANS[name][3] <= cond.budget_bytes]
    return min(fits, key=lambda c: c.seconds)


def controller() -> Controller:
    return Controller(best, cost, cost(["stored"], Conditions(300 * MB, 2000 * MB)))


def test_bandwidth_oscillating_across_the_break_even_causes_no_switch():
    # the plans are as fast at 1500 MB/s; the disk flips between 1000 and 2500 every 0.5 s
    c = controller()
    for step in range(600):  # 60 s
        t = step * 0.1
        bandwidth = 2500 * MB if math.floor(t / 0.5) % 2 == 0 else 1000 * MB
        assert c.observe(t, 300 * MB, bandwidth) is None
    assert c.switches == []


def test_a_wildly_oscillating_disk_switches_at_most_once():
    # 2000 and 100 MB/s every 0.5 s: int4 is the better plan on average; one switch, no flapping
    c = controller()
    for step in range(1200):  # 120 s
        t = step * 0.1
        c.observe(t, 300 * MB, 2000 * MB if math.floor(t / 0.5) % 2 == 0 else 100 * MB)
    assert [s.after for s in c.switches] == [["int4"]]


def test_a_sustained_slow_disk_switches_once_then_back_once():
    c = controller()
    for step in range(300):
        c.observe(step * 0.1, 300 * MB, 100 * MB)   # 30 s of an SD card
    assert [s.after for s in c.switches] == [["int4"]]
    assert "saved over 256 tokens" in c.switches[0].reason
    for step in range(300, 900):
        c.observe(step * 0.1, 300 * MB, 2000 * MB)  # then the fast disk again
    assert [s.after for s in c.switches] == [["int4"], ["stored"]]


def test_a_budget_below_the_plan_switches_at_once_despite_the_dwell():
    c = controller()
    c.observe(0.0, 300 * MB, 2000 * MB)
    s = c.observe(0.5, 250 * MB, 2000 * MB)
    assert s is not None and s.after == ["int4"] and "budget fell" in s.reason


def test_no_switch_within_the_dwell_time():
    c = controller()
    c.since = 0.0
    for step in range(50):  # 5 s of a slow disk: less than the dwell
        assert c.observe(step * 0.1, 300 * MB, 50 * MB) is None
