"""A loaded model's budget changed at run time (MoeModel.set_budget).

The new budget is split as load() split the first (moeedge.runtime.plan): the fixed
cost, dense weights, KV cache and buffers stay what they were, so the expert cache gets
the difference. It is checked at once (BudgetError below the smallest workable budget:
one layer's top-k experts beside the prefill's borrowed buffers) and applied between two
tokens: at once when the model is idle, else before the running generation's next token
(after the prompt, if one is being read: the prefill has lent the cache's bytes). A
shrink cancels queued guesses and evicts before the call that applies it returns, so the
cache never holds more than the new budget afterwards; a grow only raises the cache's
budget, and experts come back as tokens route to them.
"""
from __future__ import annotations

import time
from dataclasses import replace

from moeedge._core import BudgetError
from moeedge.runtime.measure import resolve_budget
from moeedge.runtime.plan import MemoryPlan, expert_budget, kernel_reserve, least_budget, shrink_cache
from moeedge.units import format_bytes


def replanned(model, budget: int | str, slot: int | None = None) -> MemoryPlan:
    """The model's memory plan at this budget; BudgetError naming the smallest workable one.
    slot: the largest expert slot the cache must hold top-k of (default the store's
    largest; an adaptive model's smallest plan's, moeedge.ladder.adaptive)."""
    b = resolve_budget(budget)
    old = model.plan
    least = old.prefill_borrow_bytes + model.config.top_k * (slot or model.runner.experts.slot)
    cache = b - old.committed_bytes - kernel_reserve(b)
    if cache < least:
        smallest = least_budget(old.committed_bytes + least)
        raise BudgetError(f"memory budget {format_bytes(b)} is below the smallest workable budget "
                          f"{format_bytes(smallest)} for this loaded model ({smallest} bytes: "
                          f"{format_bytes(old.committed_bytes)} committed at load, the kernel's share, and one "
                          f"layer's top-k experts beside the prefill's buffers)")
    return replace(old, budget_bytes=b, expert_cache_bytes=cache, kernel_bytes=kernel_reserve(b))


def apply(model, plan: MemoryPlan) -> dict:
    """Resize the expert cache to the plan (evicting first on a shrink); what changed."""
    cache = model.cache
    before = cache.budget_bytes
    target = expert_budget(plan, model.runner.experts.current_bytes())
    if model.speculator is not None:  # the bytes its draft lends while drafting is off stay lent
        target += model.speculator.lent
    if target < before:
        shrink_cache(cache, target)
    else:
        cache.set_budget(target)
    model.plan = plan
    return {"at": time.time(), "budget_bytes": plan.budget_bytes, "expert_cache_bytes_before": before,
            "expert_cache_bytes": target, "resident_bytes": cache.stats()["resident_bytes"]}
