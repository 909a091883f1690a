"""Pinning and budgets: a buffer (or a numpy/torch view of it) pins its entry.

Pinned entries survive any pressure with their bytes unchanged; dropping the
last reference makes them evictable again. ``set_budget`` shrinks (evicting
unpinned entries) and grows; it refuses to shrink below the pinned bytes. A miss
when everything is pinned raises BudgetError instead of waiting forever.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch

from conftest import EXPERT_BYTES, PAGE, key, open_store, run_bounded, write_file
from moeedge import _core
from moeedge import BudgetError
from moeedge.expert_tensor import expert_view


def digest(obj) -> str:
    return hashlib.sha256(memoryview(obj)).hexdigest()


def drop_get(cache, experts, k) -> None:
    buf = cache.get(k)
    assert bytes(buf) == experts.expected(k)


def hammer(cache, experts, keys, rounds: int) -> None:
    for _ in range(rounds):
        for k in keys:
            drop_get(cache, experts, k)
            s = cache.stats()
            assert s["resident_bytes"] <= s["budget_bytes"]


@pytest.fixture
def eight(make_experts):
    e = make_experts(8, nbytes=EXPERT_BYTES)
    assert e.slot == EXPERT_BYTES
    return e


# --------------------------------------------------------------------------- pins survive pressure

def test_held_buffer_survives_pressure(eight, make_cache):
    cache = make_cache(eight.store, 3 * eight.slot)
    a = eight.keys[0]
    buf = cache.get(a)
    before = digest(buf)
    assert before == hashlib.sha256(eight.expected(a)).hexdigest()
    # A pinned leaves 2 free slots for 7 keys in rotation: every get misses.
    hammer(cache, eight, eight.keys[1:], rounds=5)
    assert digest(buf) == before
    assert bytes(buf) == eight.expected(a)
    assert a in cache.resident_keys() and cache.contains(a)
    s = cache.stats()
    assert s["pinned_bytes"] == eight.slot
    assert (s["hits"], s["misses"]) == (0, 36)
    assert s["evictions"] == 36 - 3
    assert s["peak_resident_bytes"] <= s["budget_bytes"]


def test_dropping_the_buffer_makes_it_evictable(eight, make_cache):
    cache = make_cache(eight.store, 3 * eight.slot)
    a = eight.keys[0]
    buf = cache.get(a)
    hammer(cache, eight, eight.keys[1:4], rounds=2)
    assert cache.contains(a)
    del buf
    assert cache.stats()["pinned_bytes"] == 0
    # A is now the least recently got unpinned entry: the next miss evicts it.
    resident_before = set(cache.resident_keys())
    assert a in resident_before
    drop_get(cache, eight, eight.keys[4])
    assert not cache.contains(a)
    assert a not in cache.resident_keys()


def test_held_tensor_survives_pressure(eight, make_cache):
    cache = make_cache(eight.store, 3 * eight.slot)
    a = eight.keys[2]
    t = expert_view(cache.get(a), torch.float32)  # the tensor holds the only reference
    before = t.numpy().tobytes()
    assert before == eight.expected(a)
    hammer(cache, eight, [k for k in eight.keys if k != a], rounds=4)
    assert t.numpy().tobytes() == before
    assert cache.contains(a)
    assert cache.stats()["pinned_bytes"] == eight.slot
    del t
    assert cache.stats()["pinned_bytes"] == 0
    hammer(cache, eight, [k for k in eight.keys if k != a][:3], rounds=1)
    assert not cache.contains(a)


def test_held_numpy_array_survives_pressure(eight, make_cache):
    cache = make_cache(eight.store, 2 * eight.slot)
    a = eight.keys[5]
    arr = np.frombuffer(cache.get(a), dtype=np.uint8)
    hammer(cache, eight, eight.keys[:5], rounds=3)
    assert arr.tobytes() == eight.expected(a)
    assert cache.resident_keys().count(a) == 1
    assert cache.stats()["pinned_bytes"] == eight.slot
    del arr
    assert cache.stats()["pinned_bytes"] == 0


def test_same_key_held_twice_is_pinned_once(eight, make_cache):
    cache = make_cache(eight.store, 2 * eight.slot)
    a = eight.keys[0]
    b1 = cache.get(a)
    b2 = cache.get(a)  # a hit on the same entry
    assert b1.address == b2.address
    s = cache.stats()
    assert (s["hits"], s["misses"]) == (1, 1)
    assert s["pinned_bytes"] == eight.slot
    del b1
    assert cache.stats()["pinned_bytes"] == eight.slot  # b2 still pins it
    hammer(cache, eight, eight.keys[1:4], rounds=1)
    assert cache.contains(a)
    assert bytes(b2) == eight.expected(a)
    del b2
    assert cache.stats()["pinned_bytes"] == 0


# --------------------------------------------------------------------------- mapped memory

def test_an_evicted_expert_is_unmapped_before_the_read_it_makes_room_for(tmp_path, make_cache):
    """Experts of two sizes and a budget for one: the evicted one's pages go back before the
    other's read begins, so the slabs mapped never hold both (an expert over the budget was
    full-size Mixtral's OOM kill at 8 GiB: its Q4_K and Q6_K experts differ in size)."""
    small, large = 3 * PAGE, 5 * PAGE
    path = tmp_path / "two.bin"
    content = write_file(path, small + large + 7, seed=5)
    a, b = key(1, 0), key(1, 1)
    store = open_store([str(path)], {a: [(0, 0, small)], b: [(0, small, large)]})
    cache = make_cache(store, store.slot_bytes(b))
    assert bytes(cache.get(a)) == content[:small]
    mapped, _ = _core.slab_bytes()
    _core.reset_slab_peak()
    assert bytes(cache.get(b)) == content[small:small + large]
    assert cache.resident_keys() == [b]
    _, peak = _core.slab_bytes()
    assert peak == mapped - store.slot_bytes(a) + store.slot_bytes(b), "both slabs were mapped at once"


# --------------------------------------------------------------------------- set_budget

def test_set_budget_shrink_evicts_unpinned_down_to_fit(eight, make_cache):
    cache = make_cache(eight.store, 4 * eight.slot)
    hammer(cache, eight, eight.keys[:4], rounds=1)  # A B C D resident
    assert cache.stats()["evictions"] == 0
    cache.set_budget(2 * eight.slot)
    s = cache.stats()
    assert cache.budget_bytes == s["budget_bytes"] == 2 * eight.slot
    assert s["evictions"] == 2
    assert s["resident_bytes"] == 2 * eight.slot
    assert sorted(cache.resident_keys()) == sorted(eight.keys[2:4])  # LRU keeps C D
    drop_get(cache, eight, eight.keys[0])  # miss, evicts C
    assert sorted(cache.resident_keys()) == sorted([eight.keys[0], eight.keys[3]])


def test_set_budget_grow_stops_evictions(eight, make_cache):
    cache = make_cache(eight.store, 2 * eight.slot)
    hammer(cache, eight, eight.keys[:4], rounds=1)
    assert cache.stats()["evictions"] == 2
    cache.set_budget(4 * eight.slot)
    assert cache.budget_bytes == 4 * eight.slot
    hammer(cache, eight, eight.keys[:4], rounds=2)  # A B miss, then 6 hits
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (6, 6, 2)
    assert s["n_resident"] == 4
    assert s["peak_resident_bytes"] == 4 * eight.slot


def test_set_budget_below_pinned_raises_and_keeps_budget(eight, make_cache):
    cache = make_cache(eight.store, 4 * eight.slot)
    a, b = eight.keys[:2]
    held = [cache.get(a), cache.get(b)]
    hammer(cache, eight, eight.keys[2:4], rounds=1)
    with pytest.raises(BudgetError, match="(?i)budget|pinned"):
        cache.set_budget(2 * eight.slot - 1)
    assert cache.budget_bytes == 4 * eight.slot
    assert cache.stats()["budget_bytes"] == 4 * eight.slot
    assert cache.contains(a) and cache.contains(b)
    assert [bytes(h) for h in held] == [eight.expected(a), eight.expected(b)]
    # the old budget still works: two unpinned slots
    hammer(cache, eight, eight.keys[4:8], rounds=1)
    assert cache.stats()["n_resident"] == 4


def test_set_budget_to_exactly_the_pinned_bytes(eight, make_cache):
    cache = make_cache(eight.store, 4 * eight.slot)
    a, b = eight.keys[:2]
    held = [cache.get(a), cache.get(b)]
    hammer(cache, eight, eight.keys[2:4], rounds=1)
    cache.set_budget(2 * eight.slot)
    assert cache.budget_bytes == 2 * eight.slot
    assert sorted(cache.resident_keys()) == sorted([a, b])
    assert cache.stats()["evictions"] == 2
    del held


# --------------------------------------------------------------------------- everything pinned

def test_miss_with_everything_pinned_raises_budget_error(eight, make_cache):
    cache = make_cache(eight.store, 2 * eight.slot)
    a, b, c = eight.keys[:3]
    held = {a: cache.get(a), b: cache.get(b)}
    with pytest.raises(BudgetError, match="(?i)budget|pinned"):
        run_bounded(lambda: cache.get(c))
    assert not cache.contains(c)
    # hits on pinned entries still work
    again = run_bounded(lambda: cache.get(a))
    assert bytes(again) == eight.expected(a)
    del again
    # releasing one pin makes room: C evicts A
    del held[a]
    buf = run_bounded(lambda: cache.get(c))
    assert bytes(buf) == eight.expected(c)
    assert sorted(cache.resident_keys()) == sorted([b, c])
    s = cache.stats()
    assert s["resident_bytes"] <= s["budget_bytes"]


def test_peak_never_exceeds_budget_with_odd_sizes(make_experts, make_cache):
    e = make_experts(8, nbytes=10007, lead=13, gap=1)
    slot = e.slot
    assert slot == 3 * 4096  # 10007 bytes round up to 3 pages
    budget = 3 * slot + 4095  # room for 3 slots, not 4
    cache = make_cache(e.store, budget)
    rng = random.Random(7)
    held = []
    for step in range(300):
        k = rng.choice(e.keys)
        buf = cache.get(k)
        assert bytes(buf) == e.expected(k), step
        held.append(buf)
        if len(held) > 2 or rng.random() < 0.3:  # at most 2 pins: a third slot is always free
            held.pop(0)
        s = cache.stats()
        assert s["resident_bytes"] <= budget, step
        assert s["peak_resident_bytes"] <= budget, step
        assert s["n_resident"] <= 3, step
    s = cache.stats()
    assert s["hits"] + s["misses"] == 300
    assert s["evictions"] > 0
    assert s["resident_bytes"] == s["n_resident"] * slot
