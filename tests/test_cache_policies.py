"""Eviction policies and counters: exact hits, misses, evictions and residents.

Every sequence below is traced by hand in its comments. Each expert is 4 pages,
so with buffered reads one slot is ``EXPERT_BYTES`` and a budget of ``n * slot``
holds exactly ``n`` experts. Buffers are dropped right after each get, so no
entry stays pinned. The sequence "ECBBEACBDE" ends differently under all three
policies (hits 2 / 3 / 4), and "AABCBCBABCA" fails an LFU that forgets counts
on eviction.
"""
from __future__ import annotations

import pytest

from conftest import EXPERT_BYTES
from moeedge import ExpertCache

LETTERS = "ABCDE"


@pytest.fixture
def five(make_experts):
    """Five 4-page experts named A..E; one slot each."""
    e = make_experts(5, nbytes=EXPERT_BYTES)
    assert all(e.store.slot_bytes(k) == EXPERT_BYTES for k in e.keys)
    e.name = dict(zip(LETTERS, e.keys))
    e.letter = {k: n for n, k in e.name.items()}
    return e


def play(cache: ExpertCache, experts, sequence: str) -> None:
    """Get each letter in turn, check its bytes, drop the buffer at once."""
    for step, letter in enumerate(sequence, 1):
        k = experts.name[letter]
        buf = cache.get(k)
        assert bytes(buf) == experts.expected(k), f"wrong bytes for {letter} at step {step}"
        del buf
        s = cache.stats()
        assert s["resident_bytes"] <= s["budget_bytes"], f"step {step}"
        assert s["peak_resident_bytes"] <= s["budget_bytes"], f"step {step}"
        assert s["pinned_bytes"] == 0, f"step {step}"


def resident(cache: ExpertCache, experts) -> str:
    return "".join(sorted(experts.letter[k] for k in cache.resident_keys()))


def counts(cache: ExpertCache) -> tuple[int, int, int]:
    s = cache.stats()
    return s["hits"], s["misses"], s["evictions"]


# --------------------------------------------------------------------------- lru

def test_lru_sequence(five, make_cache):
    cache = make_cache(five.store, 3 * five.slot, policy="lru")
    # capacity 3, list oldest -> newest
    #  1 E miss [E]         2 C miss [E C]      3 B miss [E C B]
    #  4 B hit  [E C B]     5 E hit  [C B E]
    #  6 A miss, evict C -> [B E A]
    #  7 C miss, evict B -> [E A C]
    #  8 B miss, evict E -> [A C B]
    #  9 D miss, evict A -> [C B D]
    # 10 E miss, evict C -> [B D E]
    play(cache, five, "ECBBEACBDE")
    assert counts(cache) == (2, 8, 5)
    assert resident(cache, five) == "BDE"
    s = cache.stats()
    assert s["n_resident"] == 3
    assert s["resident_bytes"] == 3 * five.slot
    assert s["bytes_read"] == 8 * EXPERT_BYTES


def test_lru_hit_refreshes_recency(five, make_cache):
    cache = make_cache(five.store, 3 * five.slot, policy="lru")
    # A B C miss; A hit makes B the oldest; D evicts B, not A; A and C still hit.
    play(cache, five, "ABCAD")
    assert resident(cache, five) == "ACD"
    play(cache, five, "AC")
    assert counts(cache) == (3, 4, 1)


# --------------------------------------------------------------------------- lfu

def test_lfu_sequence(five, make_cache):
    cache = make_cache(five.store, 3 * five.slot, policy="lfu")
    # gets so far in (), ties broken by least recent get (t = step)
    #  1 E miss E1   2 C miss C1   3 B miss B1   [E C B]
    #  4 B hit  B2   5 E hit  E2
    #  6 A miss A1: E2 C1 B2 -> evict C           [E B A]
    #  7 C miss C2: E2(t5) B2(t4) A1 -> evict A  [E B C]
    #  8 B hit  B3
    #  9 D miss D1: E2(t5) B3 C2(t7) -> tie E/C, least recent E -> evict E  [B C D]
    # 10 E miss E3: B3 C2 D1 -> evict D          [B C E]
    play(cache, five, "ECBBEACBDE")
    assert counts(cache) == (3, 7, 4)
    assert resident(cache, five) == "BCE"


def test_lfu_counts_survive_eviction(five, make_cache):
    cache = make_cache(five.store, 2 * five.slot, policy="lfu")
    # capacity 2
    #  1 A miss A1  2 A hit A2  3 B miss B1       [A B]
    #  4 C miss C1: A2 B1 -> evict B              [A C]
    #  5 B miss B2 (its first get still counts): A2 C1 -> evict C   [A B]
    #  6 C miss C2: A2(t2) B2(t5) tie -> least recent A -> evict A  [B C]
    #     (an LFU that reset B to 1 on reload would evict B here)
    #  7 B hit B3
    #  8 A miss A3: B3 C2 -> evict C              [B A]
    #  9 B hit B4
    # 10 C miss C3: B4 A3 -> evict A              [B C]
    # 11 A miss A4: B4(t9) C3 -> evict C          [B A]
    play(cache, five, "AABCBC")
    assert resident(cache, five) == "BC"
    play(cache, five, "BABCA")
    assert counts(cache) == (3, 8, 6)
    assert resident(cache, five) == "AB"


def test_lfu_ties_go_to_least_recent(five, make_cache):
    cache = make_cache(five.store, 3 * five.slot, policy="lfu")
    # A B C got once each. D: A1 B1 C1 tie -> least recent A -> [B C D].
    # E: B1 C1 D1 tie -> least recent B -> [C D E].
    play(cache, five, "ABCDE")
    assert counts(cache) == (0, 5, 2)
    assert resident(cache, five) == "CDE"


# --------------------------------------------------------------------------- score

def test_score_sequence(five, make_cache):
    cache = make_cache(five.store, 3 * five.slot, policy="score")
    scores = {"A": 3.0, "B": -1.0, "C": 0.0, "D": 1.0, "E": 2.0}
    cache.set_scores({five.name[n]: v for n, v in scores.items()})
    #  1 E miss  2 C miss  3 B miss [E C B]   4 B hit   5 E hit
    #  6 A miss: E2 C0 B-1 -> evict B   [E C A]
    #  7 C hit
    #  8 B miss: E2 C0 A3 -> evict C    [E A B]
    #  9 D miss: E2 A3 B-1 -> evict B   [E A D]
    # 10 E hit
    play(cache, five, "ECBBEACBDE")
    assert counts(cache) == (4, 6, 3)
    assert resident(cache, five) == "ADE"


def test_score_default_is_zero(five, make_cache):
    cache = make_cache(five.store, 2 * five.slot, policy="score")
    cache.set_scores({five.name["A"]: 0.5, five.name["E"]: -0.5})
    # A B miss [A B]; C miss: A0.5 B0 -> evict B [A C]; D miss: A0.5 C0 -> evict C [A D]
    play(cache, five, "ABCD")
    assert resident(cache, five) == "AD"
    # E miss: A0.5 D0 -> evict D [A E]; B miss: A0.5 E-0.5 -> evict E [A B]
    play(cache, five, "EB")
    assert counts(cache) == (0, 6, 4)
    assert resident(cache, five) == "AB"


def test_score_ties_go_to_least_recent(five, make_cache):
    cache = make_cache(five.store, 2 * five.slot, policy="score")
    # no scores: all 0.0 -> behaves as LRU. A B miss, A hit, C evicts B, D evicts A.
    play(cache, five, "ABAC")
    assert resident(cache, five) == "AC"
    play(cache, five, "D")
    assert counts(cache) == (1, 4, 2)
    assert resident(cache, five) == "CD"


def test_set_scores_on_resident_entries_changes_the_victim(five, make_cache):
    cache = make_cache(five.store, 2 * five.slot, policy="score")
    play(cache, five, "ABA")  # B is least recent
    cache.set_scores({five.name["A"]: -1.0, five.name["B"]: 1.0})
    play(cache, five, "C")  # evicts A (lowest score), where LRU would evict B
    assert resident(cache, five) == "BC"
    cache.set_scores({five.name["B"]: -5.0})  # later call updates B, keeps A's -1
    play(cache, five, "A")  # B -5 < C 0 -> evict B
    assert resident(cache, five) == "AC"
    assert counts(cache) == (1, 4, 2)


# --------------------------------------------------------------------------- same sequence, three policies

@pytest.mark.parametrize(("policy", "hits", "evictions", "survivors"), [
    ("lru", 2, 5, "BDE"),
    ("lfu", 3, 4, "BCE"),
    ("score", 4, 3, "ADE"),
])
def test_policies_differ_on_the_same_sequence(five, make_cache, policy, hits, evictions, survivors):
    cache = make_cache(five.store, 3 * five.slot, policy=policy)
    scores = {"A": 3.0, "B": -1.0, "C": 0.0, "D": 1.0, "E": 2.0}
    cache.set_scores({five.name[n]: v for n, v in scores.items()})  # ignored by lru/lfu
    play(cache, five, "ECBBEACBDE")
    assert counts(cache) == (hits, 10 - hits, evictions)
    assert resident(cache, five) == survivors
    assert cache.policy == policy
    for letter in LETTERS:
        assert cache.contains(five.name[letter]) == (letter in survivors)


# --------------------------------------------------------------------------- counters

def test_stats_keys_and_types(five, make_cache):
    cache = make_cache(five.store, 3 * five.slot, policy="lfu", io_threads=3)
    s = cache.stats()
    ints = ["hits", "misses", "prefetch_issued", "prefetch_hits", "prefetch_cancelled",
            "prefetch_dropped", "prefetch_wasted", "prefetch_wasted_bytes", "evictions",
            "bytes_read", "io_errors", "resident_bytes", "peak_resident_bytes",
            "pinned_bytes", "budget_bytes", "n_resident", "io_threads"]
    for name in ints:
        assert type(s[name]) is int, name
        if name not in ("budget_bytes", "io_threads"):
            assert s[name] == 0, name
    assert isinstance(s["wait_seconds"], float) and s["wait_seconds"] == 0.0
    assert s["policy"] == "lfu"
    assert s["io_threads"] == 3
    assert s["budget_bytes"] == cache.budget_bytes == 3 * five.slot
    assert s["direct_io"] is False
    assert s["direct_io_fallback"] == ""
    assert cache.store.paths == five.store.paths


def test_every_get_is_a_hit_or_a_miss(five, make_cache):
    cache = make_cache(five.store, 2 * five.slot)
    play(cache, five, "AABBCCAAB")
    # A m h, B m h, C m(evict A) h, A m(evict B) h, B m(evict C)
    hits, misses, evictions = counts(cache)
    assert (hits, misses, evictions) == (4, 5, 3)
    assert cache.stats()["wait_seconds"] >= 0.0


def test_reset_stats(five, make_cache):
    cache = make_cache(five.store, 3 * five.slot)
    play(cache, five, "ABCDA")
    assert cache.stats()["peak_resident_bytes"] == 3 * five.slot
    cache.set_budget(5 * five.slot)
    play(cache, five, "B")
    cache.set_budget(2 * five.slot)  # evicts down to two entries
    cache.reset_stats()
    s = cache.stats()
    for name in ["hits", "misses", "evictions", "bytes_read", "prefetch_issued", "io_errors"]:
        assert s[name] == 0, name
    assert s["resident_bytes"] == 2 * five.slot
    assert s["peak_resident_bytes"] == 2 * five.slot  # restarts from resident, not 4 slots
    assert s["n_resident"] == 2
    assert s["budget_bytes"] == 2 * five.slot
    play(cache, five, "B")  # B was among the two most recent: a hit
    assert counts(cache) == (1, 0, 0)


def test_read_busy_seconds_is_the_union_of_the_reads(five, make_cache):
    """Wall time with a read in flight: above zero once something was read, never above the
    reads' summed durations (concurrent reads overlap) nor the wall time around them."""
    import time

    cache = make_cache(five.store, 5 * five.slot, io_threads=3)
    assert cache.stats()["read_busy_seconds"] == 0.0
    start = time.perf_counter()
    cache.prefetch(list(five.keys))
    play(cache, five, "ABCDE")
    wall = time.perf_counter() - start
    s = cache.stats()
    assert s["reads"] == 5 and 0.0 < s["read_busy_seconds"] <= s["read_seconds"] + 1e-9
    assert s["read_busy_seconds"] <= wall
    cache.reset_stats()
    assert cache.stats()["read_busy_seconds"] == 0.0
