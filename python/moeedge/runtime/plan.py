"""Where every byte of the budget goes. The budget is what the whole process may use,
the number a user would give a cgroup limit: the process's fixed cost (measured, by
moeedge.runtime.measure), then dense weights, the KV cache of each sequence, a resident
draft model, activation buffers, and the expert cache in the rest. Runners report what
they need (KV bytes, activation bytes) with no slack of their own; the slack is here."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Protocol

from moeedge._core import BudgetError, ExpertCache
from moeedge.units import format_bytes

if TYPE_CHECKING:  # the harness imports this module and must not map torch (tests/test_harness.py)
    import torch

# torch's allocator, glibc arenas and Python objects made while running: headroom that
# the real-cgroup tests at the smallest budget hold (tests/test_memory_plan.py) and the
# benchmark matrix's runs at each model's minimum confirm (no OOM kill).
SLACK_BYTES = 48 << 20
# The fixed cost differs by a few MiB between processes (what each imported first): the
# minimum a user is told leaves this much room, so it loads in a fresh process too.
FIXED_JITTER_BYTES = 8 << 20
# Tokens per prefill step, largest first. The largest that fits the budget is used: a
# smaller chunk holds fewer activations (mixtral-medium at max_context 256: 84 MiB of
# buffers at 128, 52 at 16, as `moeedge.load(...).plan` reports them), but a prompt's
# chunks each read the experts they route to that the cache could not keep, so a tight
# budget trades prefill speed for fitting at all.
PREFILL_CHUNKS = (128, 64, 32, 16)
# What the kernel charges the cgroup for this process beyond its resident pages: page tables,
# 8 bytes for each 4 KiB page held (1/512 of the budget: VmPTE was 32 MiB at 16 GiB), and as
# much again for its other charges (slab, kernel stacks, socket buffers). Without it a plan
# filled a 16 GiB limit to the byte and full-size Mixtral's 512-token prefill was OOM-killed
# (bench/README.md; bench/memory_watch.py samples these).
KERNEL_SHARE = 256
# How long a prefill waits for guesses being read to let go of the bytes it borrows.
BORROW_WAIT_SECONDS = 30


class Needs(Protocol):
    """What a runner class reports to the planner (moeedge.models.runner.Runner)."""

    @classmethod
    def kv_bytes(cls, cfg, max_context: int, dtype: torch.dtype) -> int: ...

    @classmethod
    def activation_bytes(cls, cfg, max_context: int, chunk: int) -> int: ...

    @classmethod
    def dense_bytes(cls, ckpt, dtype: torch.dtype) -> int: ...


@dataclass
class MemoryPlan:
    budget_bytes: int
    fixed_bytes: int          # measured: the process before the model
    dense_bytes: int
    kv_cache_bytes: int       # every sequence's: n_sequences x one sequence's
    buffer_bytes: int         # activations of one decode step, logits, slack
    expert_cache_bytes: int
    min_budget_bytes: int     # fixed + dense + KV + one layer's top-k experts + prefill buffers
    prefill_chunk: int = 0    # tokens per prefill step
    # What a prefill step's activations need beyond buffer_bytes: taken from the expert
    # cache while a prompt is read (each chunk reads most experts again anyway), so that
    # decoding keeps those bytes for experts.
    prefill_borrow_bytes: int = 0
    n_sequences: int = 1      # KV slots: sequences decoded together
    draft_bytes: int = 0      # a resident draft model's weights and KV (speculative decoding)
    kernel_bytes: int = 0     # charged by the kernel beyond resident pages (kernel_reserve)
    # Per MoE layer, the representation its experts are read in ("" for as stored).
    expert_variants: tuple[str, ...] = ()

    @property
    def committed_bytes(self) -> int:
        """What the plan holds outside the expert cache that does not scale with the budget
        (all but the kernel's share): the same at any budget of this loaded model."""
        return self.budget_bytes - self.expert_cache_bytes - self.kernel_bytes

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return ", ".join(f"{k.removesuffix('_bytes')} {format_bytes(v) if k.endswith('_bytes') else v}"
                         for k, v in asdict(self).items())


def kernel_reserve(budget_bytes: int) -> int:
    """What the kernel charges a process of this budget beyond its resident pages (KERNEL_SHARE)."""
    return budget_bytes // KERNEL_SHARE


def least_budget(resident_bytes: int) -> int:
    """The smallest budget that holds resident_bytes beside its own kernel_reserve."""
    b = max(0, resident_bytes * KERNEL_SHARE // (KERNEL_SHARE - 1) - 2)
    while b - kernel_reserve(b) < resident_bytes:
        b += 1
    return b


def budget_for_cache(plan: MemoryPlan, cache_bytes: int) -> int:
    """The budget at which this plan's expert cache would be cache_bytes (all else the same)."""
    return least_budget(plan.committed_bytes + cache_bytes)


def split_budget(budget_bytes: int, fixed_bytes: int, dense_bytes: int, kv_cache_bytes: int, buffer_bytes: int,
                 min_expert_bytes: int, prefill_chunk: int = 0, draft_bytes: int = 0) -> MemoryPlan:
    """Split the budget; BudgetError with every number when it is below the smallest workable one."""
    committed = fixed_bytes + dense_bytes + kv_cache_bytes + buffer_bytes + draft_bytes
    least = least_budget(committed + min_expert_bytes)
    minimum = least + FIXED_JITTER_BYTES
    kernel = kernel_reserve(budget_bytes)
    if budget_bytes < committed + kernel + min_expert_bytes:
        draft = f" + draft model {format_bytes(draft_bytes)}" if draft_bytes else ""
        raise BudgetError(
            f"memory budget {format_bytes(budget_bytes)} is below the smallest workable budget "
            f"{format_bytes(minimum)} ({minimum} bytes): fixed cost {format_bytes(fixed_bytes)} + dense weights "
            f"{format_bytes(dense_bytes)} + KV cache {format_bytes(kv_cache_bytes)} + buffers "
            f"{format_bytes(buffer_bytes)}{draft} + page tables and kernel {format_bytes(kernel_reserve(least))} + "
            f"one MoE layer's top-k experts {format_bytes(min_expert_bytes)}; a smaller max_context shrinks the KV cache")
    return MemoryPlan(budget_bytes, fixed_bytes, dense_bytes, kv_cache_bytes, buffer_bytes,
                      budget_bytes - committed - kernel, minimum, prefill_chunk, draft_bytes=draft_bytes,
                      kernel_bytes=kernel)


def buffer_bytes(runner: type[Needs], cfg, max_context: int, chunk: int) -> int:
    return runner.activation_bytes(cfg, max_context, chunk) + SLACK_BYTES


def plan_checkpoint(ckpt, runner: type[Needs], slot_bytes: int, budget: int, fixed: int, max_context: int,
                    dtype: torch.dtype, on_disk_bytes: int = 0, n_sequences: int = 1,
                    draft_bytes: int = 0) -> MemoryPlan:
    """The memory plan of this checkpoint in this budget, with the largest prefill chunk
    that fits; BudgetError below the smallest workable budget (that of the smallest chunk),
    which min_budget_bytes reports. slot_bytes: the largest expert's bytes in the cache;
    on_disk_bytes: the dense bytes left in their file (the embedding table, if it stays
    there: moeedge.runtime.embedding); draft_bytes: a speculative draft's experts and KV
    (moeedge.draft.draft_bytes)."""
    cfg = ckpt.config
    dense = runner.dense_bytes(ckpt, dtype) - on_disk_bytes
    kv = n_sequences * runner.kv_bytes(cfg, max_context, dtype)
    chunks = sorted({min(c, max_context) for c in PREFILL_CHUNKS}, reverse=True)
    decode = buffer_bytes(runner, cfg, max_context, 1)

    def plan(chunk: int, budget: int) -> MemoryPlan:
        p = split_budget(budget, fixed, dense, kv, buffer_bytes(runner, cfg, max_context, chunk),
                         cfg.top_k * slot_bytes, chunk, draft_bytes)
        borrow = p.buffer_bytes - decode
        return replace(p, buffer_bytes=decode, expert_cache_bytes=p.expert_cache_bytes + borrow,
                       prefill_borrow_bytes=borrow, n_sequences=n_sequences)

    smallest = plan(chunks[-1], 1 << 62).min_budget_bytes
    for chunk in chunks[:-1]:
        try:
            return replace(plan(chunk, budget), min_budget_bytes=smallest)
        except BudgetError:
            continue
    return plan(chunks[-1], budget)


def measured(plan: MemoryPlan, held_bytes: int, least_cache_bytes: int) -> MemoryPlan:
    """The plan corrected by a measurement: held_bytes, what the process holds outside its
    expert cache between two steps, against what the plan counted there (fixed cost, dense
    weights, KV cache). What loading added beyond that (modules imported on the way, the
    tokenizer, tensor tables, native threads, the allocator's arenas: 40-60 MB on a
    full-size Mixtral-8x7B GGUF, where an 8 GiB plan without it was OOM-killed) is taken
    from the expert cache, never below least_cache_bytes, so that the process keeps to its
    budget. Only ever a shrink: a measurement below the plan changes nothing."""
    excess = held_bytes - (plan.fixed_bytes + plan.dense_bytes + plan.kv_cache_bytes)
    cut = min(excess, plan.expert_cache_bytes - least_cache_bytes)
    if cut <= 0:
        return plan
    return replace(plan, fixed_bytes=plan.fixed_bytes + cut, expert_cache_bytes=plan.expert_cache_bytes - cut)


def expert_budget(plan: MemoryPlan, all_experts_bytes: int) -> int:
    """The expert cache's budget: its share of the plan, but never more than every expert."""
    return min(plan.expert_cache_bytes, all_experts_bytes)


def shrink_cache(cache: ExpertCache, budget_bytes: int) -> None:
    """Set a smaller cache budget now. Guesses being read hold room: cancel them, and wait
    for the chunk each is on (BudgetError, saying what holds the bytes, if never let go)."""
    cache.cancel_prefetches()
    deadline = time.monotonic() + BORROW_WAIT_SECONDS
    while True:
        try:
            cache.set_budget(budget_bytes)
            return
        except BudgetError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


@contextlib.contextmanager
def prefill_borrow(cache: ExpertCache, plan: MemoryPlan):
    """The expert cache lends the prefill's activations their bytes (plan.prefill_borrow_bytes)."""
    full = cache.budget_bytes
    lent = min(full, plan.expert_cache_bytes - plan.prefill_borrow_bytes)
    if lent < full:
        shrink_cache(cache, lent)
    try:
        yield
    finally:
        cache.set_budget(full)
