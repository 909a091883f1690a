"""Bad inputs and failed reads raise the documented errors, with useful messages.

Bad ranges raise ValueError naming file, key, offset and length; unopenable
files raise the matching OSError subclass naming the file; a file truncated
after the store was opened makes ``get`` raise ExpertReadError naming file and
offset, and the cache works again once the file is restored.
"""
from __future__ import annotations

import os
import re

import pytest

from conftest import (EXPERT_BYTES, PAGE, assert_names_key, key, run_bounded, wait_until,
                      write_file)
from moeedge import BudgetError, ExpertCache, ExpertReadError, ExpertStore

FILE_SIZE = 3 * PAGE
BAD_KEY = key(1, 5)  # 4294967301


def test_exception_hierarchy():
    assert issubclass(BudgetError, MemoryError)
    assert issubclass(ExpertReadError, OSError)


# --------------------------------------------------------------------------- bad ranges

BAD_RANGES = {
    # id: (segment, offset and length strings the message must contain)
    "past_eof": ((0, 2 * PAGE, PAGE + 1), True),
    "offset_at_eof": ((0, FILE_SIZE, 1), True),
    "negative_offset": ((0, -5, 10), True),
    "offset_plus_length_overflows": ((0, 2**63 - 1, 10), True),
    "length_overflows": ((0, PAGE, 2**63 - 1), True),
    "zero_length": ((0, 0, 0), True),
    "negative_length": ((0, 0, -1), True),
    "offset_2_64": ((0, 2**64, 10), False),
    "offset_above_2_64": ((0, 2**64 + 4096, 10), False),
}


@pytest.mark.parametrize("case", list(BAD_RANGES))
def test_bad_range_raises_value_error(tmp_path, case):
    segment, exact = BAD_RANGES[case]
    path = tmp_path / "e.bin"
    write_file(path, FILE_SIZE, seed=1)
    ranges = {key(1, 4): [(0, 0, PAGE)], BAD_KEY: [segment]}
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        ExpertStore([str(path)], ranges)
    message = str(info.value)
    assert_names_key(message, BAD_KEY)
    if exact:
        _, offset, length = segment
        assert str(offset) in message, f"offset {offset} not named: {message!r}"
        assert str(length) in message, f"length {length} not named: {message!r}"


def test_bad_second_segment_is_found(tmp_path):
    path = tmp_path / "e.bin"
    write_file(path, FILE_SIZE, seed=1)
    ranges = {BAD_KEY: [(0, 0, 10), (0, FILE_SIZE - 4, 5)]}
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        ExpertStore([str(path)], ranges)
    assert str(FILE_SIZE - 4) in str(info.value)
    assert_names_key(str(info.value), BAD_KEY)


@pytest.mark.parametrize("index", [1, 2, -1])
def test_file_index_out_of_range(tmp_path, index):
    path = tmp_path / "e.bin"
    write_file(path, FILE_SIZE, seed=1)
    ranges = {key(1, 4): [(0, 0, PAGE)], BAD_KEY: [(0, 0, 10), (index, 4096, 10)]}
    with pytest.raises(ValueError, match=r"(?i)index|file") as info:
        ExpertStore([str(path)], ranges)
    message = str(info.value)
    assert_names_key(message, BAD_KEY)
    assert str(index) in message and "4096" in message


def test_range_ending_exactly_at_eof_is_valid(tmp_path):
    path = tmp_path / "e.bin"
    content = write_file(path, FILE_SIZE, seed=1)
    store = ExpertStore([str(path)], {BAD_KEY: [(0, FILE_SIZE - 5, 5)]})
    assert store.read(BAD_KEY) == content[-5:]


# --------------------------------------------------------------------------- files that cannot be opened

def test_missing_file_raises_file_not_found(tmp_path):
    good = tmp_path / "good.bin"
    write_file(good, FILE_SIZE, seed=1)
    missing = tmp_path / "nope" / "missing.bin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ExpertStore([str(good), str(missing)], {BAD_KEY: [(0, 0, 10)]})


def test_directory_instead_of_file_raises(tmp_path):
    d = tmp_path / "a_directory"
    d.mkdir()
    with pytest.raises(IsADirectoryError, match=re.escape(str(d))):
        ExpertStore([str(d)], {BAD_KEY: [(0, 0, 10)]})


def test_unreadable_file_raises_permission_error(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop reads")
    path = tmp_path / "locked.bin"
    write_file(path, FILE_SIZE, seed=1)
    path.chmod(0)
    try:
        with pytest.raises(PermissionError, match=re.escape(str(path))):
            ExpertStore([str(path)], {BAD_KEY: [(0, 0, 10)]})
    finally:
        path.chmod(0o600)


# --------------------------------------------------------------------------- truncated after open

def _restore(path, content: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def test_truncated_file_get_raises_read_error_then_recovers(io_mode, make_experts, make_cache):
    # one page before the first expert, so no offset equals an expert's length
    e = make_experts(4, directory=io_mode.directory, direct_io=io_mode.direct_io, lead=PAGE)
    path, content = e.paths[0], e.contents[0]
    k0, k1, k2, _ = e.keys  # at offsets 4096, 20480, 36864, 53248
    cache = make_cache(e.store, 4 * e.slot)
    os.truncate(path, PAGE + EXPERT_BYTES + 100)  # k1 keeps 100 bytes, k2 and k3 are gone
    try:
        with pytest.raises(ExpertReadError, match=re.escape(path)) as info:
            run_bounded(lambda: cache.get(k1))
        assert isinstance(info.value, OSError)
        assert str(PAGE + EXPERT_BYTES) in str(info.value), f"offset not named: {info.value}"
        with pytest.raises(ExpertReadError, match=re.escape(path)) as info:
            run_bounded(lambda: cache.get(k2))
        assert str(PAGE + 2 * EXPERT_BYTES) in str(info.value), f"offset not named: {info.value}"
        s = cache.stats()
        assert s["io_errors"] == 2
        assert not cache.contains(k1) and not cache.contains(k2)
        assert s["n_resident"] == 0 and s["resident_bytes"] == 0
        # the cache stays usable: an intact expert reads fine
        assert bytes(run_bounded(lambda: cache.get(k0))) == e.expected(k0)
        # still truncated: a retry fails again rather than returning stale bytes
        with pytest.raises(ExpertReadError, match=re.escape(path)):
            run_bounded(lambda: cache.get(k1))
    finally:
        _restore(path, content)
    assert bytes(run_bounded(lambda: cache.get(k1))) == e.expected(k1)
    assert bytes(run_bounded(lambda: cache.get(k2))) == e.expected(k2)
    s = cache.stats()
    assert s["io_errors"] == 3
    assert s["n_resident"] == 3 and s["resident_bytes"] == 3 * e.slot


def test_truncated_file_store_read_raises_read_error(io_mode, make_experts):
    e = make_experts(3, directory=io_mode.directory, direct_io=io_mode.direct_io)
    path = e.paths[0]
    os.truncate(path, EXPERT_BYTES + 1)
    with pytest.raises(ExpertReadError, match=re.escape(path)):
        run_bounded(lambda: e.store.read(e.keys[2]))
    _restore(path, e.contents[0])
    assert run_bounded(lambda: e.store.read(e.keys[2])) == e.expected(e.keys[2])


def test_truncated_file_prefetch_then_get_raises_read_error(make_experts, make_cache):
    e = make_experts(3)
    path = e.paths[0]
    cache = make_cache(e.store, 3 * e.slot)
    k = e.keys[2]
    os.truncate(path, EXPERT_BYTES)
    try:
        assert cache.prefetch([k]) == 1
        # whether the prefetch already failed or is still in flight, the get fails
        with pytest.raises(ExpertReadError, match=re.escape(path)):
            run_bounded(lambda: cache.get(k))
        wait_until(lambda: cache.stats()["io_errors"] >= 1, "the failed read to be counted")
        assert not cache.contains(k)
    finally:
        _restore(path, e.contents[0])
    assert bytes(run_bounded(lambda: cache.get(k))) == e.expected(k)


# --------------------------------------------------------------------------- budget errors

def test_expert_larger_than_budget_raises_at_get(make_experts, make_cache):
    e = make_experts(2)
    cache = make_cache(e.store, e.slot - 1)
    with pytest.raises(BudgetError, match="(?i)budget"):
        cache.get(e.keys[0])
    assert cache.stats()["resident_bytes"] == 0
    assert cache.stats()["io_errors"] == 0


def test_expert_larger_than_budget_raises_at_prefetch(make_experts, make_cache):
    e = make_experts(2)
    cache = make_cache(e.store, e.slot - PAGE)
    with pytest.raises(BudgetError, match="(?i)budget"):
        cache.prefetch([e.keys[1]])
    assert cache.stats()["prefetch_issued"] == 0


def test_expert_exactly_the_budget_fits(make_experts, make_cache):
    e = make_experts(2)
    cache = make_cache(e.store, e.slot)
    assert bytes(cache.get(e.keys[0])) == e.expected(e.keys[0])
    assert bytes(cache.get(e.keys[1])) == e.expected(e.keys[1])
    assert cache.stats()["evictions"] == 1


# --------------------------------------------------------------------------- unknown keys, bad arguments

def test_unknown_key_get_raises_key_error(make_experts, make_cache):
    e = make_experts(2)
    cache = make_cache(e.store, 2 * e.slot)
    with pytest.raises(KeyError, match=str(BAD_KEY)):
        cache.get(BAD_KEY)


def test_unknown_key_prefetch_raises_key_error(make_experts, make_cache):
    e = make_experts(2)
    cache = make_cache(e.store, 2 * e.slot)
    with pytest.raises(KeyError, match=str(BAD_KEY)):
        cache.prefetch([BAD_KEY])


@pytest.mark.parametrize("policy", ["mru", "", "random", "lru "])
def test_invalid_policy_raises_value_error(make_experts, policy):
    e = make_experts(1)
    with pytest.raises(ValueError, match="(?i)policy"):
        ExpertCache(e.store, 2 * e.slot, policy=policy)


@pytest.mark.parametrize("budget", [0, -1, -(2**40)])
def test_invalid_budget_raises_value_error(make_experts, budget):
    e = make_experts(1)
    with pytest.raises(ValueError, match="(?i)budget"):
        ExpertCache(e.store, budget)


@pytest.mark.parametrize("budget", [0, -1])
def test_set_budget_invalid_raises_value_error(make_experts, make_cache, budget):
    e = make_experts(1)
    cache = make_cache(e.store, 2 * e.slot)
    with pytest.raises(ValueError, match="(?i)budget"):
        cache.set_budget(budget)
    assert cache.budget_bytes == 2 * e.slot


@pytest.mark.parametrize("io_threads", [0, -1])
def test_invalid_io_threads_raises_value_error(make_experts, io_threads):
    e = make_experts(1)
    with pytest.raises(ValueError, match="(?i)io_threads|thread"):
        ExpertCache(e.store, 2 * e.slot, io_threads=io_threads)


@pytest.mark.parametrize("seconds", [-0.001, 10.5, float("nan")])
def test_spin_wait_out_of_range_raises_value_error(make_experts, make_cache, seconds):
    e = make_experts(1)
    cache = make_cache(e.store, 2 * e.slot)
    with pytest.raises(ValueError, match="spin_wait"):
        cache.spin_wait = seconds
    assert cache.spin_wait == pytest.approx(0.1)  # unchanged


def test_get_after_close_raises_runtime_error(make_experts):
    e = make_experts(2)
    cache = ExpertCache(e.store, 2 * e.slot)
    assert bytes(cache.get(e.keys[0])) == e.expected(e.keys[0])
    cache.close()
    with pytest.raises(RuntimeError, match="(?i)closed"):
        cache.get(e.keys[0])
    with pytest.raises(RuntimeError, match="(?i)closed"):
        cache.get(e.keys[1])


def test_context_manager_closes_the_cache(make_experts):
    e = make_experts(2)
    with ExpertCache(e.store, 2 * e.slot) as cache:
        assert isinstance(cache, ExpertCache)
        assert bytes(cache.get(e.keys[1])) == e.expected(e.keys[1])
    with pytest.raises(RuntimeError, match="(?i)closed"):
        cache.get(e.keys[1])
