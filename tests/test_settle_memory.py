"""The plan corrected by what the loaded process measurably holds (moeedge.runtime.plan.measured)."""
from __future__ import annotations

from dataclasses import replace

import torch

import moeedge
from moeedge.runtime.measure import rss_bytes
from moeedge.runtime.plan import MemoryPlan, measured
from tiny_checkpoints import make_decoder

MiB = 1 << 20
PLAN = MemoryPlan(budget_bytes=1000 * MiB, fixed_bytes=200 * MiB, dense_bytes=300 * MiB, kv_cache_bytes=50 * MiB,
                  buffer_bytes=50 * MiB, expert_cache_bytes=400 * MiB, min_budget_bytes=700 * MiB)


def test_an_excess_over_the_plan_comes_out_of_the_expert_cache():
    plan = measured(PLAN, held_bytes=590 * MiB, least_cache_bytes=100 * MiB)
    assert plan.expert_cache_bytes == 360 * MiB and plan.fixed_bytes == 240 * MiB
    assert plan.budget_bytes == PLAN.budget_bytes


def test_the_cache_never_falls_below_its_least_and_never_grows():
    assert measured(PLAN, held_bytes=2000 * MiB, least_cache_bytes=100 * MiB).expert_cache_bytes == 100 * MiB
    assert measured(PLAN, held_bytes=400 * MiB, least_cache_bytes=100 * MiB) is PLAN
    low = replace(PLAN, expert_cache_bytes=90 * MiB)
    assert measured(low, held_bytes=600 * MiB, least_cache_bytes=100 * MiB) is low


def test_a_loaded_model_holds_no_more_outside_its_cache_than_its_plan_counts(tmp_path):
    make_decoder(tmp_path, "mixtral", seed=1, dtype=torch.bfloat16)
    with moeedge.load(tmp_path, predictor=None, max_context=64) as model:
        ids = list(range(3, 40))
        list(model.stream_ids(ids, max_new_tokens=2, temperature=0))
        p = model.plan
        held = rss_bytes() - model.cache.stats()["resident_bytes"]
        assert held <= p.fixed_bytes + p.dense_bytes + p.kv_cache_bytes + p.buffer_bytes
        assert model.cache.budget_bytes <= p.expert_cache_bytes
        for change in model.budget_changes:  # any correction says why
            assert change["reason"].startswith("measured")
