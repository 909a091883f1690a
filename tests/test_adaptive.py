"""Live variant switching (moeedge.ladder.switch) and load(adaptive=True)
(moeedge.ladder.adaptive): a switched model equals one loaded with that plan, a budget
drop switches at once within the new budget, the plan comes back after the dwell, an
oscillating disk switches nothing, and max_kl=0 stays lossless."""
from __future__ import annotations

import itertools
import json
import time

import moeedge
import pytest
import torch
from moeedge import BudgetError
from moeedge.cli import main
from moeedge.keys import ExpertKey, VariantKey
from moeedge.ladder.cost import Machine
from moeedge.ladder.switch import switch_variants
from moeedge.runtime import pressure
from moeedge.runtime.plan import budget_for_cache
from test_ladder import ladder, tiny  # noqa: F401 (fixtures: the tiny Mixtral and its ladder)

PROMPT = list(range(3, 40))
DWELL = 2.0
# A slow disk with a wait per miss, every format computing alike: a plan that misses less
# is faster, and where every expert fits the lossless plan is as fast as any.
SLOW = Machine(read_bps=1e8, ffn={f: {"decode_s": 1e-5, "prefill_s": 1e-6} for f in ("stored", "int8", "int4")},
               dense_s=1e-3, miss_latency_s=1e-3)


@pytest.fixture(autouse=True)
def slow_machine(monkeypatch):
    monkeypatch.setattr("moeedge.ladder.adaptive.measured_machine", lambda *args: SLOW)


def start(ladder, variants=("stored",) * 3) -> dict:
    return {"ladder": str(ladder), "variants": list(variants)}


def small_budget(model, stored_slots: int) -> int:
    p = model.plan
    return budget_for_cache(p, p.prefill_borrow_bytes + stored_slots * model.runner.experts.slot)


def test_a_switched_model_equals_one_loaded_with_that_plan(tiny, ladder):
    lossy = ["int4", "stored", "int8"]
    with moeedge.load(tiny, memory_budget="2GiB", adaptive=True, plan=start(ladder)) as model, \
            moeedge.load(tiny, memory_budget="2GiB") as ref, \
            moeedge.load(tiny, memory_budget="2GiB", plan=start(ladder, lossy)) as planned:
        assert torch.equal(model.logits(PROMPT), ref.logits(PROMPT))
        record = switch_variants(model, lossy)
        assert record["layers"] == [0, 2] and record["released_bytes"] > 0
        resident = set(model.cache.resident_keys())
        assert not resident & {ExpertKey(layer, e).packed for layer in (0, 2) for e in range(6)}  # released
        assert torch.equal(model.logits(PROMPT), planned.logits(PROMPT))
        assert model.plan.expert_variants == tuple(lossy)
        resident = set(model.cache.resident_keys())
        assert resident & {VariantKey(0, e, 2).packed for e in range(6)}  # int4 under its own keys
        assert list(model.stream_ids(PROMPT, 10, temperature=0)) == list(planned.stream_ids(PROMPT, 10, temperature=0))
        switch_variants(model, ["stored"] * 3)
        assert torch.equal(model.logits(PROMPT), ref.logits(PROMPT))
        assert list(model.stream_ids(PROMPT, 10, temperature=0)) == list(ref.stream_ids(PROMPT, 10, temperature=0))
        with pytest.raises(ValueError, match="one loadable variant"):
            switch_variants(model, ["int3"] * 3)


def test_a_plan_without_adaptive_cannot_switch(tiny, ladder):
    with moeedge.load(tiny, memory_budget="2GiB", plan=start(ladder)) as model:
        with pytest.raises(ValueError, match="not loaded with its 'int4' variant"):
            switch_variants(model, ["int4"] * 3)


def test_a_budget_drop_switches_at_once_within_it_and_the_plan_returns_after_the_dwell(tiny, ladder):
    with moeedge.load(tiny, memory_budget="2GiB", adaptive=True, max_kl=10.0, plan=start(ladder)) as model:
        model.adaptive.controller.min_dwell_s = DWELL
        stream = model.stream_ids(PROMPT, max_new_tokens=200, temperature=0)
        try:
            drop_and_return(model, stream)
        finally:
            stream.close()  # a stream left open holds the model: close() would wait for it
        assert [c["budget_bytes"] for c in model.stats()["budget_changes"]] == [small_budget(model, 3), 2 << 30]


def drop_and_return(model, stream) -> None:
    for _ in range(4):
        next(stream)
    assert model.stats()["adaptive"]["lossless"]  # everything fits: lossless
    low = small_budget(model, 3)
    model.set_budget(low)
    next(stream)  # the drop applies before this token, with a switch
    model.cache.reset_stats()  # the peak from here on
    a = model.stats()["adaptive"]
    assert not a["lossless"] and len(a["switches"]) == 1 and "budget fell" in a["switches"][0]["reason"]
    assert model.plan.budget_bytes == low
    for _ in range(20):
        next(stream)
        stats = model.cache.stats()
        assert stats["resident_bytes"] <= stats["budget_bytes"] <= model.plan.expert_cache_bytes
    assert model.cache.stats()["peak_resident_bytes"] <= model.plan.expert_cache_bytes
    model.set_budget("2GiB")
    next(stream)
    if time.monotonic() - model.adaptive.controller.since < DWELL:
        assert len(model.stats()["adaptive"]["switches"]) == 1  # within the dwell: no switch back yet
    time.sleep(DWELL)  # the dwell is wall-clock time
    next(stream)
    a = model.stats()["adaptive"]
    assert len(a["switches"]) == 2 and a["lossless"] and "more lossless" in a["switches"][1]["reason"]
    assert a["switches"][1]["at"] - a["switches"][0]["at"] >= DWELL


def test_an_oscillating_disk_causes_no_switch(tiny, ladder, monkeypatch):
    monkeypatch.setattr("moeedge.ladder.adaptive.OBSERVE_EVERY_S", 0.0)  # look before every token
    with moeedge.load(tiny, memory_budget="2GiB", adaptive=True, max_kl=10.0, plan=start(ladder)) as model:
        model.set_budget(small_budget(model, 8))
        model.adaptive.controller.min_dwell_s = 0.0
        before = list(model.stats()["adaptive"]["switches"])
        flips = itertools.cycle([5e9, 2e7])  # a fast disk and an SD card, every other token
        monkeypatch.setattr(model.adaptive, "read_bps", lambda: next(flips))
        list(model.stream_ids(PROMPT, max_new_tokens=60, temperature=0))
        assert model.stats()["adaptive"]["switches"] == before


def test_an_auto_budget_follows_the_cgroups_reading(tiny, ladder, monkeypatch):
    # the reading's sources (cgroup files, PSI) are tested in tests/test_pressure.py; here what
    # the running model does with it: a fall switches at once, a rise under pressure is held
    with moeedge.load(tiny, memory_budget="auto", adaptive=True, max_kl=10.0, plan=start(ladder)) as model:
        assert model.adaptive.auto
        low, psi = small_budget(model, 3), [None]
        monkeypatch.setattr(pressure, "reading", lambda **_: pressure.Reading(low, low + (64 << 20), 0, psi[0], "t"))
        list(model.stream_ids(PROMPT, max_new_tokens=3, temperature=0))
        a = model.stats()["adaptive"]
        assert model.plan.budget_bytes == low and "budget fell" in a["switches"][0]["reason"]
        assert a["pressure"]["budget_bytes"] == low and a["auto"]
        psi[0], low = 50.0, low * 2  # more room, but the machine is under memory pressure: held
        list(model.stream_ids(PROMPT, max_new_tokens=3, temperature=0))
        assert model.plan.budget_bytes == low // 2
        psi[0] = 0.0
        list(model.stream_ids(PROMPT, max_new_tokens=3, temperature=0))
        assert model.plan.budget_bytes == low


def test_max_kl_0_stays_lossless_through_a_budget_drop(tiny, ladder):
    with moeedge.load(tiny, memory_budget="2GiB") as ref:
        expected = list(ref.stream_ids(PROMPT, max_new_tokens=16, temperature=0))
    with moeedge.load(tiny, memory_budget="2GiB", adaptive=True, plan=start(ladder)) as model:
        stream = model.stream_ids(PROMPT, max_new_tokens=16, temperature=0)
        got = [next(stream), next(stream)]
        model.set_budget(small_budget(model, 3))
        got += list(stream)
        a = model.stats()["adaptive"]
        assert a["lossless"] and a["switches"] == [] and a["max_kl"] == 0.0
    assert got == expected


def test_adaptive_budgets_below_the_smallest_plan_are_refused(tiny, ladder):
    with moeedge.load(tiny, memory_budget="2GiB", adaptive=True, max_kl=10.0, plan=start(ladder)) as model:
        model.set_budget(small_budget(model, 1))  # below the stored plan's minimum, above int4's
        assert not model.stats()["adaptive"]["lossless"] and model.plan.budget_bytes == small_budget(model, 1)
        assert model.cache.budget_bytes <= model.plan.expert_cache_bytes
        with pytest.raises(BudgetError, match="below the smallest workable budget"):
            model.set_budget(small_budget(model, 0) - (64 << 10))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_kl": 0.1}, "max_kl is the adaptive controller's tolerance"),
    ({"adaptive": True, "max_kl": -1.0}, "max_kl must be a number at least 0"),
    ({"adaptive": True, "draft": "auto"}, "adaptive=True with a speculative draft is not supported"),
])
def test_bad_adaptive_settings_are_refused(tiny, ladder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        moeedge.load(tiny, memory_budget="2GiB", plan=start(ladder), **kwargs)


def test_adaptive_without_a_ladder_says_how_to_build_one(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="build it with `moeedge ladder"):
        moeedge.load(tiny, memory_budget="2GiB", adaptive=True)


def test_run_adaptive_cli(tiny, ladder, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(start(ladder)))
    assert main(["run", str(tiny), "--adaptive", "--max-kl", "0.5", "--plan", str(plan), "--memory-budget", "2GiB",
                 "--prompt", "hello", "--max-new-tokens", "4", "--temperature", "0", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["stats"]["adaptive"]
    assert a["max_kl"] == 0.5 and a["variants"] == ["stored"] * 3 and a["ladder"] == str(ladder)


@pytest.mark.parametrize("args, message", [
    (["--max-kl", "0.1"], "--max-kl is the adaptive controller's tolerance: give --adaptive too"),
    (["--adaptive", "--max-kl", "-1"], "--max-kl must be at least 0"),
])
def test_adaptive_cli_bad_input_is_one_line_and_exit_2(tiny, capsys, args, message):
    assert main(["run", str(tiny), *args, "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
