"""MoeModel.set_budget with a speculative draft loaded (moeedge.ladder.live, moeedge.speculative):
the draft's experts and KV stay inside the plan, the change lands between two tokens, a
shrink is never exceeded after it lands (the bytes the draft lends while drafting is off
included), and greedy output stays plain greedy decoding's."""
from __future__ import annotations

import pytest
import torch

import moeedge
from moeedge import BudgetError
from moeedge.aggregate.pipeline import aggregate
from moeedge.runtime.plan import budget_for_cache
from tiny_checkpoints import make_decoder, write_tokenizer

PROMPT = torch.randint(3, 160, (12,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-budget")
    make_decoder(root / "model", "mixtral", seed=3)
    write_tokenizer(root / "model")
    aggregate(root / "model", "merge", root / "model-draft", experts_per_layer=1, calibration_tokens=128,
              eval_tokens=0)
    return root / "model", root / "model-draft"


def small_budget(model, experts: int) -> int:
    """The budget whose expert cache holds `experts` slots beside the prefill's buffers (the draft's
    bytes are part of what the plan committed at load)."""
    p = model.plan
    return budget_for_cache(p, p.prefill_borrow_bytes + experts * model.runner.experts.slot)


def within(model) -> None:
    """Both caches inside the plan: the full model's cache its share (plus what the draft lends it
    while its own experts are let go), the draft's its experts (counted in plan.draft_bytes)."""
    spec, p = model.speculator, model.plan
    full, draft = model.cache.stats(), spec.draft.cache.stats()
    every = sum(model.cache.store.slot_bytes(key) for key in model.cache.store.keys())
    assert model.cache.budget_bytes <= min(p.expert_cache_bytes, every) + spec.lent
    assert full["resident_bytes"] <= model.cache.budget_bytes
    if spec.lent:  # lent: the draft's experts, KV and steps' buffers let go, their planned bytes the cache's
        assert spec.lent == spec.draft.expert_bytes + spec.draft.reserve_bytes <= p.draft_bytes
        assert draft["resident_bytes"] == 0 and spec.draft.runner.k_cache.numel() == 0
    else:
        assert full["resident_bytes"] + draft["resident_bytes"] <= p.expert_cache_bytes + spec.draft.expert_bytes


@pytest.mark.parametrize("k", [None, 2])  # adaptive (its draft lends its bytes while off), and drafting every round
def test_a_shrink_mid_generation_lands_between_tokens_and_keeps_the_output(pair, k):
    src, draft = pair
    with moeedge.load(src, memory_budget="1GiB", max_context=96) as ref:
        expected = list(ref.stream_ids(PROMPT, 40, temperature=0.0))
    with moeedge.load(src, memory_budget="1GiB", max_context=96, draft=draft) as model:
        model.speculator.chooser.fixed = k
        stream = model.stream_ids(PROMPT, 40, temperature=0.0)
        got = [next(stream) for _ in range(5)]
        new = small_budget(model, 3)
        model.set_budget(new)
        assert model.plan.budget_bytes != new  # the generation holds the model: pending until its next token
        landed = False
        for token in stream:
            got.append(token)
            if model.plan.budget_bytes == new:
                landed = True
                within(model)
        assert landed and got == expected
        p = model.plan
        assert p.draft_bytes > 0 and p.expert_cache_bytes == p.prefill_borrow_bytes + 3 * model.runner.experts.slot
        # idle: at once, a grow as well
        model.set_budget("1GiB")
        within(model)
        assert list(model.stream_ids(PROMPT, 40, temperature=0.0)) == expected
        assert [c["budget_bytes"] for c in model.stats()["budget_changes"]] == [new, 1 << 30]


def test_a_shrink_while_the_draft_lends_its_bytes_keeps_them_lent_and_within(pair):
    src, draft = pair
    with moeedge.load(src, memory_budget="1GiB", max_context=96, draft=draft) as model:
        model.cache.set_budget(4 * model.runner.experts.slot)  # not every expert: the draft lends while off
        model.speculator.chooser.fixed = 0
        list(model.stream_ids(PROMPT, 4, temperature=0.0))
        lent = model.speculator.lent
        assert lent == model.speculator.draft.expert_bytes + model.speculator.draft.reserve_bytes > 0
        model.set_budget(small_budget(model, 2))
        assert model.speculator.lent == lent and model.cache.budget_bytes == model.plan.expert_cache_bytes + lent
        within(model)
        model.speculator.chooser.fixed = 3  # the next round takes the bytes back: the new budget holds
        stream = model.stream_ids(PROMPT, 12, temperature=0.0)
        next(stream), next(stream)  # the prompt's token, then a round's first
        assert model.speculator.lent == 0 and model.cache.budget_bytes == model.plan.expert_cache_bytes
        within(model)
        stream.close()


def test_below_the_smallest_workable_budget_with_a_draft_is_refused(pair):
    src, draft = pair
    with moeedge.load(src, memory_budget="1GiB", max_context=96, draft=draft) as model:
        before = model.plan
        with pytest.raises(BudgetError, match="below the smallest workable budget"):
            model.set_budget(small_budget(model, 1))
        assert model.plan is before
