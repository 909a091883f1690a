"""moeedge.ladder.planner and cost on made-up measurements: no model, no disk."""
from __future__ import annotations

import numpy as np
import pytest

from moeedge.ladder import planner
from moeedge.ladder.cost import Curve, Machine, Option, decode_seconds

E, K, L = 8, 2, 3
MIB = 1 << 20
FFN = {"stored": {"decode_s": 1e-4, "prefill_s": 1e-5}, "int8": {"decode_s": 8e-5, "prefill_s": 1e-5},
       "int4": {"decode_s": 6e-5, "prefill_s": 1e-5}}
MACHINE = Machine(read_bps=1e9, ffn=FFN, dense_s=1e-3)
# the hit rate grows linearly with the capacity, to 1 at every expert
CURVE = Curve(np.arange(K, E * L + 1, dtype=float), np.linspace(0.1, 0.99, E * L - K + 1))


def row(kl8: float, kl4: float) -> list[Option]:
    return [Option("stored", (4 * MIB,) * E, None, 0.0), Option("int8", (2 * MIB,) * E, (8,) * E, kl8),
            Option("int4", (MIB,) * E, (4,) * E, kl4)]


OPTIONS = [row(1e-4, 1e-3), row(1e-5, 1e-4), row(1e-3, 1e-2)]


def choose(cache_bytes: int, max_kl: float) -> planner.Choice:
    return planner.choose(OPTIONS, cache_bytes, MACHINE, CURVE, K, 64, max_kl)


def test_tolerance_zero_is_the_lossless_plan():
    c = choose(8 * 4 * MIB, 0.0)
    assert c.chosen.variants == ["stored"] * L and c.chosen.kl == 0.0
    assert c.binds.startswith("quality")  # smaller variants would be faster


def test_the_fastest_plan_within_the_tolerance():
    c = choose(8 * 4 * MIB, 2e-4)
    assert c.chosen.kl <= 2e-4
    assert c.chosen.variants == ["int8", "int4", "stored"]  # the cheapest KL per second saved
    everything = choose(4 * 4 * MIB, 1.0)  # not even int4 fits whole
    assert everything.chosen.variants == ["int4"] * L and everything.binds.startswith("memory")


def test_lossless_when_everything_fits_and_lossy_is_not_much_faster():
    # every stored expert fits; the variants compute under 5% faster: not worth their KL
    slow = Machine(1e9, {**FFN, "int4": {"decode_s": 9.9e-5, "prefill_s": 1e-5},
                         "int8": {"decode_s": 9.9e-5, "prefill_s": 1e-5}}, 1e-3)
    c = planner.choose(OPTIONS, E * L * 4 * MIB, slow, CURVE, K, 64, 1.0)
    assert c.chosen.variants == ["stored"] * L and c.binds.startswith("neither")


def test_frontier_is_faster_with_every_step_of_kl():
    f = choose(8 * 4 * MIB, 1.0).frontier
    assert f[0].kl == 0.0 and all(a.kl < b.kl and a.seconds > b.seconds for a, b in zip(f, f[1:]))


def test_greedy_path_agrees_with_the_exhaustive_search(monkeypatch):
    whole = choose(8 * 4 * MIB, 2e-4)
    monkeypatch.setattr(planner, "EXHAUSTIVE", 1)
    greedy = choose(8 * 4 * MIB, 2e-4)
    assert greedy.chosen.variants == whole.chosen.variants
    assert len(greedy.frontier) <= 1 + 2 * L


def test_smaller_variants_raise_the_hit_rate():
    cache = 8 * 4 * MIB
    stored = decode_seconds([r[0] for r in OPTIONS], cache, MACHINE, CURVE, K)
    small = decode_seconds([r[2] for r in OPTIONS], cache, MACHINE, CURVE, K)
    assert small["hit_rate"] > stored["hit_rate"] and small["read_s"] < stored["read_s"]


def test_a_cache_too_small_for_any_plan_is_refused():
    with pytest.raises(ValueError, match="no plan fits an expert cache"):
        choose(MIB, 1.0)
    with pytest.raises(ValueError, match="within --max-kl 0"):
        choose(3 * MIB, 0.0)  # only int4 fits one layer's top-k
