"""MoeModel.set_budget: the budget changes at run time (moeedge.ladder.live)."""
from __future__ import annotations

import moeedge
import pytest
import torch
from moeedge import BudgetError
from moeedge.runtime.plan import budget_for_cache
from tiny_checkpoints import make_tiny_mixtral


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny"))


def small_budget(model, experts: int) -> int:
    """The budget whose expert cache holds `experts` slots beside the prefill's buffers."""
    p = model.plan
    return budget_for_cache(p, p.prefill_borrow_bytes + experts * model.runner.experts.slot)


def test_a_shrink_evicts_at_once_and_a_grow_raises_the_cache(tiny):
    with moeedge.load(tiny, memory_budget="2GiB", max_context=128) as model:
        model.logits(list(range(3, 60)))
        assert model.cache.stats()["n_resident"] == 18  # every expert
        new = small_budget(model, 4)
        plan = model.set_budget(new)
        assert plan.budget_bytes == new and model.plan is plan
        stats = model.cache.stats()
        assert stats["budget_bytes"] == plan.expert_cache_bytes and stats["resident_bytes"] <= stats["budget_bytes"]
        # the decode cache keeps the bytes a prefill borrows: 4 slots more than those
        slot = model.runner.experts.slot
        assert stats["n_resident"] <= (plan.prefill_borrow_bytes + 4 * slot) // slot < 18
        model.set_budget("2GiB")
        assert model.cache.budget_bytes == 18 * model.runner.experts.slot  # never more than every expert
        asked = [c["budget_bytes"] for c in model.stats()["budget_changes"] if "reason" not in c]  # not settle_memory's
        assert asked == [new, 2 << 30]


def test_a_budget_below_the_smallest_is_refused_and_nothing_changes(tiny):
    with moeedge.load(tiny, memory_budget="2GiB", max_context=128) as model:
        before, changes = model.plan, list(model.budget_changes)
        with pytest.raises(BudgetError, match="below the smallest workable budget"):
            model.set_budget(small_budget(model, 1))
        assert model.plan is before and model.budget_changes == changes


def test_a_shrink_mid_generation_applies_before_the_next_token_and_keeps_the_output(tiny):
    prompt = list(range(3, 40))
    with moeedge.load(tiny, memory_budget="2GiB", max_context=128) as ref:
        expected = list(ref.stream_ids(prompt, max_new_tokens=12, temperature=0))
    with moeedge.load(tiny, memory_budget="2GiB", max_context=128) as model:
        stream = model.stream_ids(prompt, max_new_tokens=12, temperature=0)
        got = [next(stream), next(stream)]
        new = small_budget(model, 3)
        model.set_budget(new)
        assert model.plan.budget_bytes != new  # the generation holds the model: pending
        got.append(next(stream))
        assert model.plan.budget_bytes == new
        p = model.plan
        assert model.cache.stats()["resident_bytes"] <= model.cache.budget_bytes == p.expert_cache_bytes
        assert p.expert_cache_bytes == p.prefill_borrow_bytes + 3 * model.runner.experts.slot
        got += list(stream)
    assert got == expected  # lossless: the budget changes the speed, not the tokens
    assert torch.equal(torch.tensor(got), torch.tensor(expected))
