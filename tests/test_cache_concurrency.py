"""Prefetch, IO threads, close, and a multithreaded stress test.

Nothing here asserts on time: background work is awaited by polling a condition
with a generous deadline, and counters are checked once things have settled
(for cancellation: issued == completed + cancelled + dropped + stopped).
"""
from __future__ import annotations

import gc
import hashlib
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EXPERT_BYTES, PAGE, WAIT_S, Experts, key, open_store, wait_until, write_file
from moeedge import BudgetError, ExpertCache, ExpertStore
from moeedge.expert_tensor import expert_view


def ready_keys(cache, keys) -> list[int]:
    return [k for k in keys if cache.contains(k)]


def settle_prefetches(cache, keys) -> dict:
    """Wait until every issued prefetch is accounted for: completed (resident and
    ready), cancelled or dropped. Returns the stats at that point."""
    state = {}

    def settled() -> bool:
        s = cache.stats()
        ready = len(ready_keys(cache, keys))
        state.update(s, ready=ready)
        return (ready == s["n_resident"]
                and ready + s["prefetch_cancelled"] + s["prefetch_dropped"] + s["prefetch_stopped"]
                == s["prefetch_issued"])

    wait_until(settled, "prefetches to settle (issued == completed + cancelled + dropped)")
    return state


# --------------------------------------------------------------------------- prefetch

def test_prefetch_then_get_is_a_prefetch_hit(make_experts, make_cache):
    e = make_experts(4)
    cache = make_cache(e.store, 4 * e.slot)
    a, b = e.keys[:2]
    assert cache.prefetch([a, b]) == 2
    wait_until(lambda: cache.contains(a) and cache.contains(b), "prefetched keys to be ready")
    s = cache.stats()
    assert (s["hits"], s["misses"], s["prefetch_issued"]) == (0, 0, 2)
    assert s["bytes_read"] == 2 * EXPERT_BYTES
    assert bytes(cache.get(a)) == e.expected(a)
    s = cache.stats()
    assert (s["hits"], s["misses"], s["prefetch_hits"]) == (1, 0, 1)
    assert bytes(cache.get(a)) == e.expected(a)  # second use is a plain hit
    assert bytes(cache.get(b)) == e.expected(b)
    s = cache.stats()
    assert (s["hits"], s["misses"], s["prefetch_hits"]) == (3, 0, 2)
    assert s["prefetch_wasted"] == 0 and s["evictions"] == 0


def test_a_prefetch_waits_while_a_more_urgent_read_is_in_flight(tmp_path, make_cache):
    """A big read at priority 1, then a tiny one at priority 0 on a second IO thread: the
    tiny one must not start (so cannot land) before the big one has landed."""
    big, small = key(1, 0), key(1, 1)
    path = tmp_path / "experts.bin"
    content = write_file(path, (64 << 20) + 2 * PAGE, seed=7)
    store = open_store([path], {big: [(0, 0, 64 << 20)], small: [(0, 64 << 20, PAGE)]})
    for _ in range(3):
        cache = make_cache(store, 128 << 20, io_threads=2)
        cache.prefetch([big], 1)
        cache.prefetch([small], 0)
        deadline = time.monotonic() + 30
        while not (cache.contains(big) and cache.contains(small)):
            assert not (cache.contains(small) and not cache.contains(big)), "the guess shared the disk"
            assert time.monotonic() < deadline, "prefetches never landed"
        assert bytes(cache.get(small)) == content[64 << 20:(64 << 20) + PAGE]
        cache.close()


def test_prefetch_then_immediate_get_counts_one_prefetch_hit(make_experts, make_cache):
    e = make_experts(16)
    cache = make_cache(e.store, 16 * e.slot, io_threads=2)
    assert cache.prefetch(e.keys) == 16
    k = e.keys[0]
    assert bytes(cache.get(k)) == e.expected(k)  # queued, in flight or done: all fine
    s = cache.stats()
    assert s["hits"] + s["misses"] == 1
    wait_until(lambda: len(ready_keys(cache, e.keys)) == 16, "all prefetches to complete")
    assert cache.stats()["bytes_read"] == 16 * EXPERT_BYTES  # k was read once only


def test_prefetch_duplicates_are_no_ops(make_experts, make_cache):
    e = make_experts(4)
    cache = make_cache(e.store, 4 * e.slot)
    a, b, c = e.keys[:3]
    assert cache.prefetch([a, a, b, b, a]) == 2
    assert cache.prefetch([a, b]) == 0  # queued, loading or resident
    wait_until(lambda: cache.contains(a) and cache.contains(b), "prefetched keys to be ready")
    assert cache.prefetch([b, a]) == 0  # resident
    buf = cache.get(c)
    assert cache.prefetch([c]) == 0  # resident and pinned
    s = cache.stats()
    assert s["prefetch_issued"] == 2
    assert s["bytes_read"] == 3 * EXPERT_BYTES
    del buf


def test_prefetch_accepts_any_iterable_and_priority(make_experts, make_cache):
    e = make_experts(4)
    cache = make_cache(e.store, 4 * e.slot)
    assert cache.prefetch([]) == 0
    assert cache.prefetch(iter(e.keys[:2])) == 2
    assert cache.prefetch((k for k in e.keys[2:]), priority=7) == 2
    wait_until(lambda: len(ready_keys(cache, e.keys)) == 4, "prefetches to complete")
    assert sorted(cache.resident_keys()) == sorted(e.keys)


def test_prefetch_without_room_is_dropped(make_experts, make_cache):
    e = make_experts(3)
    cache = make_cache(e.store, 2 * e.slot)
    a, b, c = e.keys
    held = [cache.get(a), cache.get(b)]  # everything pinned
    assert cache.prefetch([c]) == 1
    wait_until(lambda: cache.stats()["prefetch_dropped"] == 1, "the prefetch to be dropped")
    s = cache.stats()
    assert not cache.contains(c)
    assert s["evictions"] == 0
    assert s["resident_bytes"] == 2 * e.slot
    assert sorted(cache.resident_keys()) == sorted([a, b])
    # with room again, the same key can be prefetched and completes
    del held[0]
    assert cache.prefetch([c]) == 1
    wait_until(lambda: cache.contains(c), "the second prefetch to complete")
    assert bytes(cache.get(c)) == e.expected(c)
    assert cache.stats()["prefetch_hits"] == 1


def test_prefetched_then_evicted_unused_is_wasted(make_experts, make_cache):
    e = make_experts(2)
    cache = make_cache(e.store, e.slot)  # one slot
    a, b = e.keys
    assert cache.prefetch([a]) == 1
    wait_until(lambda: cache.contains(a), "prefetch to complete")
    assert bytes(cache.get(b)) == e.expected(b)  # evicts A, never used
    s = cache.stats()
    assert s["evictions"] == 1
    assert s["prefetch_wasted"] == 1
    assert s["prefetch_wasted_bytes"] == e.store.nbytes(a)
    assert s["prefetch_hits"] == 0


# An expert read one page per call (read_chunk_bytes): long enough that the tests below
# can act while it is being read. A run where the read won the race outright is retried.
SLOW_BYTES = 16 << 20


def slow_store(tmp_path) -> tuple[ExpertStore, int, int, bytes]:
    content = write_file(tmp_path / "slow.bin", SLOW_BYTES + PAGE, seed=21)
    big, small = key(1, 0), key(1, 1)
    store = ExpertStore([str(tmp_path / "slow.bin")], {big: [(0, 0, SLOW_BYTES)], small: [(0, SLOW_BYTES, PAGE)]},
                        read_chunk_bytes=PAGE)
    assert store.read_chunk_bytes == PAGE
    return store, big, small, content


def test_a_demand_read_goes_before_the_rest_of_a_prefetch_being_read(tmp_path, make_cache):
    store, big, small, content = slow_store(tmp_path)
    for _ in range(ATTEMPTS):
        cache = make_cache(store, store.slot_bytes(big) + store.slot_bytes(small), io_threads=1)
        cache.prefetch([big])
        time.sleep(0.002)  # the one IO thread starts reading it
        assert bytes(cache.get(small)) == content[SLOW_BYTES:SLOW_BYTES + PAGE]
        overtaken = not cache.contains(big)  # one IO thread: it read small between big's pages
        wait_until(lambda: cache.contains(big), "the prefetch to go on and finish")
        assert bytes(cache.get(big)) == content[:SLOW_BYTES]
        s = cache.stats()
        assert s["prefetch_stopped"] == 0 and s["reads"] == 2
        if overtaken:
            return
    pytest.fail(f"the prefetch had finished before the get in {ATTEMPTS} attempts")


def test_cancelling_a_prefetch_being_read_stops_it(tmp_path, make_cache):
    store, big, small, content = slow_store(tmp_path)
    for _ in range(ATTEMPTS):
        cache = make_cache(store, store.slot_bytes(big), io_threads=1)
        cache.prefetch([big])
        time.sleep(0.002)
        queued = cache.cancel_prefetches([big])
        wait_until(lambda: cache.stats()["prefetch_stopped"] + cache.contains(big) + queued == 1,
                   "the prefetch to stop, finish or be dropped")
        s = cache.stats()
        if s["prefetch_stopped"]:
            assert not cache.contains(big) and s["resident_bytes"] == 0 and s["n_resident"] == 0
            assert 0 < s["prefetch_stopped_bytes"] == s["bytes_read"] < SLOW_BYTES
            assert bytes(cache.get(big)) == content[:SLOW_BYTES]  # read again, whole
            return
    pytest.fail(f"the prefetch was never stopped part way in {ATTEMPTS} attempts")


def test_a_prefetch_cancelled_while_someone_waits_for_it_is_read_whole(tmp_path, make_cache):
    store, big, small, content = slow_store(tmp_path)
    cache = make_cache(store, store.slot_bytes(big), io_threads=1)
    cache.prefetch([big])
    time.sleep(0.002)
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(bytes=bytes(cache.get(big))), daemon=True)
    waiter.start()
    time.sleep(0.002)
    cache.cancel_prefetches([big])
    waiter.join(WAIT_S)
    assert not waiter.is_alive(), "the get never returned"
    assert got["bytes"] == content[:SLOW_BYTES]
    assert cache.stats()["reads"] == 1  # whole once: read on, or stopped and then read on demand


@pytest.mark.parametrize("spin_wait", [0.0, 5.0])
def test_a_get_waiting_for_a_read_returns_when_it_lands_spinning_or_asleep(tmp_path, make_cache, spin_wait):
    store, big, small, content = slow_store(tmp_path)
    cache = make_cache(store, store.slot_bytes(big), io_threads=1)
    cache.spin_wait = spin_wait
    assert cache.spin_wait == spin_wait
    cache.prefetch([big])
    assert bytes(cache.get(big)) == content[:SLOW_BYTES]
    assert cache.stats()["reads"] == 1


def test_close_wakes_a_get_spinning_for_a_read(tmp_path):
    store, big, small, content = slow_store(tmp_path)
    cache = ExpertCache(store, store.slot_bytes(big), io_threads=1)
    cache.spin_wait = 10.0  # the longest spin: the get must still end with the close, not hang
    got: dict = {}

    def get():
        try:
            got["bytes"] = bytes(cache.get(big))
        except RuntimeError as err:
            got["error"] = str(err)

    waiter = threading.Thread(target=get, daemon=True)
    waiter.start()
    time.sleep(0.002)
    cache.close()
    waiter.join(WAIT_S)
    assert not waiter.is_alive(), "the get never returned"
    # the read it waited for either landed before the close or was stopped by it
    assert got.get("bytes") == content[:SLOW_BYTES] or "closed" in got.get("error", "")


def test_cancel_with_nothing_queued_returns_zero(make_experts, make_cache):
    e = make_experts(2)
    cache = make_cache(e.store, 2 * e.slot)
    assert cache.cancel_prefetches() == 0
    assert cache.cancel_prefetches([e.keys[0]]) == 0
    assert cache.prefetch([e.keys[0]]) == 1
    wait_until(lambda: cache.contains(e.keys[0]), "prefetch to complete")
    assert cache.cancel_prefetches() == 0
    assert cache.stats()["prefetch_cancelled"] == 0


# Many 64 KiB experts and one IO thread: right after prefetch() returns nearly all
# of them are still queued. A run where the IO thread won the race outright is
# retried (on a fresh cache), so the test does not depend on timing.
MANY = 256
BIG = 16 * PAGE
ATTEMPTS = 5


def test_cancel_all_prefetches_counts_add_up(make_experts, make_cache):
    e = make_experts(MANY, nbytes=BIG)
    for _ in range(ATTEMPTS):
        cache = make_cache(e.store, MANY * e.slot, io_threads=1)
        assert cache.prefetch(e.keys) == MANY
        cancelled = cache.cancel_prefetches()
        assert 0 <= cancelled <= MANY
        s = settle_prefetches(cache, e.keys)
        assert s["prefetch_issued"] == MANY
        assert s["prefetch_cancelled"] == cancelled
        assert s["prefetch_dropped"] == 0  # the budget holds everything
        assert s["ready"] == MANY - cancelled
        assert s["bytes_read"] == (MANY - cancelled) * BIG
        assert cache.cancel_prefetches() == 0  # nothing left queued
        # a cancelled key can be prefetched again
        gone = [k for k in e.keys if not cache.contains(k)]
        assert len(gone) == cancelled
        if gone:
            assert cache.prefetch(gone[:1]) == 1
            wait_until(lambda: cache.contains(gone[0]), "re-prefetch to complete")
            assert bytes(cache.get(gone[0])) == e.expected(gone[0])
        cache.close()
        if cancelled > 0:
            return
    pytest.fail(f"no prefetch was still queued right after prefetch() in {ATTEMPTS} attempts")


def test_cancel_some_prefetches(make_experts, make_cache):
    e = make_experts(MANY, nbytes=BIG)
    keep, drop = e.keys[: MANY // 2], e.keys[MANY // 2:]
    for _ in range(ATTEMPTS):
        cache = make_cache(e.store, MANY * e.slot, io_threads=1)
        assert cache.prefetch(e.keys) == MANY
        cancelled = cache.cancel_prefetches(drop)
        assert 0 <= cancelled <= len(drop)
        s = settle_prefetches(cache, e.keys)
        assert s["prefetch_cancelled"] == cancelled
        assert ready_keys(cache, keep) == keep  # none of these was cancelled
        assert len(drop) - len(ready_keys(cache, drop)) == cancelled
        cache.close()
        if cancelled > 0:
            return
    pytest.fail(f"no prefetch was still queued right after prefetch() in {ATTEMPTS} attempts")


def test_concurrent_gets_of_one_cold_key_read_it_once(make_experts, make_cache):
    e = make_experts(2, nbytes=BIG)
    cache = make_cache(e.store, 2 * e.slot, io_threads=2)
    k = e.keys[1]
    n = 8
    barrier = threading.Barrier(n)
    bufs, errors = [None] * n, []

    def worker(i):
        try:
            barrier.wait()
            bufs[i] = cache.get(k)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "get blocked"
    assert not errors, errors
    assert len({b.address for b in bufs}) == 1
    assert all(bytes(b) == e.expected(k) for b in bufs)
    s = cache.stats()
    assert s["hits"] + s["misses"] == n
    assert s["misses"] >= 1
    assert s["bytes_read"] == BIG  # one read, however many waited
    assert s["n_resident"] == 1


# --------------------------------------------------------------------------- close / destroy

def test_close_with_prefetches_in_flight(make_experts):
    e = make_experts(MANY, nbytes=BIG)
    cache = ExpertCache(e.store, MANY * e.slot, io_threads=2)
    assert cache.prefetch(e.keys) == MANY
    done = threading.Event()
    closer = threading.Thread(target=lambda: (cache.close(), done.set()), daemon=True)
    closer.start()
    closer.join(30)
    assert done.is_set(), "close() blocked with prefetches in flight"
    with pytest.raises(RuntimeError, match="(?i)closed"):
        cache.get(e.keys[0])
    # the store outlives the closed cache
    assert e.store.read(e.keys[-1]) == e.expected(e.keys[-1])


def test_destroy_cache_with_prefetches_in_flight(make_experts):
    e = make_experts(MANY, nbytes=BIG)
    for io_threads in (1, 4):
        cache = ExpertCache(e.store, MANY * e.slot, io_threads=io_threads)
        assert cache.prefetch(e.keys) == MANY
        del cache
        gc.collect()
    # the store (shared with the dead caches) still works
    assert e.store.read(e.keys[3]) == e.expected(e.keys[3])
    with ExpertCache(e.store, 2 * e.slot) as cache:
        assert bytes(cache.get(e.keys[3])) == e.expected(e.keys[3])


def test_buffers_stay_valid_after_close_and_delete(make_experts):
    e = make_experts(3)
    cache = ExpertCache(e.store, 3 * e.slot)
    a, b = e.keys[:2]
    buf = cache.get(a)
    arr = np.frombuffer(cache.get(b), dtype=np.uint8)
    t = expert_view(cache.get(b), torch.int32)
    cache.close()
    assert bytes(buf) == e.expected(a)
    assert arr.tobytes() == e.expected(b)
    assert t.numpy().tobytes() == e.expected(b)
    del cache
    gc.collect()
    assert bytes(buf) == e.expected(a)
    assert arr.tobytes() == e.expected(b)
    assert t.numpy().tobytes() == e.expected(b)
    store = e.store
    e.store = None
    del store
    gc.collect()
    assert hashlib.sha256(memoryview(buf)).digest() == hashlib.sha256(e.expected(a)).digest()
    assert arr.tobytes() == e.expected(b)
    assert buf.key == a and buf.nbytes == EXPERT_BYTES


def test_buffers_stay_valid_after_delete_without_close(make_experts):
    e = make_experts(2)
    cache = ExpertCache(e.store, 2 * e.slot)
    buf = cache.get(e.keys[1])
    del cache
    gc.collect()
    assert bytes(buf) == e.expected(e.keys[1])


# --------------------------------------------------------------------------- stress

STRESS_THREADS = 4
STRESS_SECONDS = 3.0
MAX_HELD = 2  # buffers a worker holds while it calls get (so <= 3 pinned or loading)


def odd_experts(directory: Path, sizes: list[int]) -> Experts:
    """Experts of the given sizes, back to back at unaligned offsets, 3 bytes apart."""
    path = directory / "stress.bin"
    content = write_file(path, 11 + sum(sizes) + 3 * len(sizes), seed=99)
    ranges, offset = {}, 11
    for i, n in enumerate(sizes):
        ranges[key(7 + i % 3, i)] = [(0, offset, n)]
        offset += n + 3
    return Experts([str(path)], ranges, [content], open_store([path], ranges), list(ranges))


def test_stress_threads_get_verify_drop_prefetch(tmp_path, make_cache):
    # 96 experts of 1..5 pages minus an odd tail, at unaligned offsets
    rng = random.Random(2024)
    sizes = [rng.randint(1, 5) * PAGE - rng.randint(0, 300) for _ in range(96)]
    e = odd_experts(tmp_path, sizes)
    slot = max(e.store.slot_bytes(k) for k in e.keys)
    io_threads = 2
    # Non-evictable at worst: each worker holds MAX_HELD and loads one more; each IO
    # thread loads one prefetch. Two slots of slack on top.
    budget = (STRESS_THREADS * (MAX_HELD + 1) + io_threads + 2) * slot
    assert budget < sum(e.store.slot_bytes(k) for k in e.keys) // 2  # constant eviction
    cache = make_cache(e.store, budget, policy="lru", io_threads=io_threads)
    digests = {k: hashlib.sha256(e.expected(k)).digest() for k in e.keys}
    stop = time.monotonic() + STRESS_SECONDS
    gets = [0] * STRESS_THREADS
    errors: list[str] = []

    def worker(wid: int) -> None:
        r = random.Random(wid)
        held = []
        try:
            while time.monotonic() < stop and not errors:
                op = r.random()
                if op < 0.70:
                    k = r.choice(e.keys[: 48 + 16 * wid])  # overlapping key ranges
                    buf = cache.get(k)
                    gets[wid] += 1
                    if buf.key != k or hashlib.sha256(memoryview(buf)).digest() != digests[k]:
                        errors.append(f"worker {wid}: wrong bytes for key {k:#x}")
                    held.append(buf)
                    if len(held) > MAX_HELD or r.random() < 0.5:
                        old = held.pop(0)
                        if hashlib.sha256(memoryview(old)).digest() != digests[old.key]:
                            errors.append(f"worker {wid}: held key {old.key:#x} changed")
                        del old
                elif op < 0.90:
                    cache.prefetch(r.sample(e.keys, 3), priority=r.randint(0, 3))
                elif op < 0.95:
                    cache.cancel_prefetches(r.sample(e.keys, 5) if r.random() < 0.5 else None)
                else:
                    cache.resident_keys()
                    s = cache.stats()
                    if s["resident_bytes"] > s["budget_bytes"]:
                        errors.append(f"resident {s['resident_bytes']} > budget {s['budget_bytes']}")
            for old in held:
                if hashlib.sha256(memoryview(old)).digest() != digests[old.key]:
                    errors.append(f"worker {wid}: held key {old.key:#x} changed")
        except BudgetError as exc:
            errors.append(f"worker {wid}: BudgetError although the budget has room: {exc}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"worker {wid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(STRESS_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STRESS_SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    assert not errors, errors[:5]
    s = cache.stats()
    assert s["hits"] + s["misses"] == sum(gets)
    assert all(n > 0 for n in gets)
    assert s["evictions"] > 0
    assert s["peak_resident_bytes"] <= s["budget_bytes"] == budget
    assert s["pinned_bytes"] == 0
    assert s["io_errors"] == 0
    assert s["prefetch_hits"] <= s["prefetch_issued"]
