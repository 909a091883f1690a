"""ExpertStore and the bytes the cache hands out.

The bytes of every expert must equal the file's bytes for single-segment,
multi-segment and multi-file experts, at unaligned offsets and odd lengths, with
buffered and O_DIRECT reads, whether read by ``store.read``, ``cache.get`` +
numpy, or ``expert_view`` (torch). Buffers are read-only and zero-copy; with O_DIRECT
most segments are read into place (no copy) at the remainder their file offsets share.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PAGE, Experts, key, open_store, pack, round_up, write_file
from moeedge import ExpertBuffer, ExpertCache, ExpertStore
from moeedge.expert_tensor import expert_view

LAYOUTS = ["single", "unaligned", "multi_segment", "multi_file"]


def build_layout(kind: str, directory: Path, direct_io: bool) -> Experts:
    """Seeded files and ranges for one layout kind."""
    d = Path(directory)
    if kind == "single":
        # Page-aligned, one segment per expert, 4 pages each.
        contents = [write_file(d / "single.bin", 6 * 4 * PAGE, seed=11)]
        ranges = {key(0, i): [(0, i * 4 * PAGE, 4 * PAGE)] for i in range(6)}
    elif kind == "unaligned":
        # Odd offsets and lengths; the file size is not a multiple of the page
        # size and the last expert ends exactly at end of file.
        size = 70001
        contents = [write_file(d / "unaligned.bin", size, seed=12)]
        ranges = {
            key(2, 0): [(0, 13, 10007)],
            key(2, 1): [(0, 10020, 1)],
            key(2, 2): [(0, 4095, 4098)],
            key(2, 3): [(0, size - 5003, 5003)],
            key(2, 4): [(0, 0, size)],
        }
    elif kind == "multi_segment":
        # Several segments per expert, out of file order, unaligned.
        contents = [write_file(d / "multiseg.bin", 65536 + 333, seed=13)]
        ranges = {
            key(3, 0): [(0, 40000, 3), (0, 13, 10007), (0, 20481, 4096)],
            key(3, 1): [(0, 4096, 4096), (0, 0, 4096), (0, 8192, 8192)],
            key(3, 7): [(0, 65536 + 333 - 100, 100), (0, 1, 1), (0, 30001, 12345)],
        }
    elif kind == "multi_file":
        # Experts whose segments live in different files of different sizes.
        sizes = [3 * PAGE, 10007, 2 * PAGE + 1]
        contents = [write_file(d / f"shard{i}.bin", n, seed=20 + i) for i, n in enumerate(sizes)]
        ranges = {
            key(4, 0): [(2, 7, 5000), (0, 4096, 8192), (1, 1, 1)],
            key(4, 1): [(1, 0, 10007)],
            key(4, 2): [(0, 0, PAGE), (1, 10000, 7), (2, 2 * PAGE, 1)],
            key(5, 0): [(2, 0, 2 * PAGE + 1), (0, 3 * PAGE - 5, 5)],
        }
    else:  # pragma: no cover
        raise AssertionError(kind)
    names = {"single": ["single.bin"], "unaligned": ["unaligned.bin"],
             "multi_segment": ["multiseg.bin"],
             "multi_file": ["shard0.bin", "shard1.bin", "shard2.bin"]}[kind]
    paths = [str(d / n) for n in names]
    store = open_store(paths, ranges, direct_io)
    return Experts(paths, ranges, contents, store, list(ranges))


@pytest.fixture(params=LAYOUTS)
def layout(request, io_mode) -> Experts:
    return build_layout(request.param, io_mode.directory, io_mode.direct_io)


def full_cache(experts: Experts, **kw) -> ExpertCache:
    """A cache that holds every expert of the store at once."""
    budget = sum(experts.store.slot_bytes(k) for k in experts.keys)
    return ExpertCache(experts.store, budget, **kw)


# --------------------------------------------------------------------------- metadata

def test_store_metadata(tmp_path):
    e = build_layout("multi_file", tmp_path, direct_io=False)
    s = e.store
    assert s.paths == e.paths
    assert sorted(s.keys()) == sorted(e.ranges)
    assert len(s) == 4
    assert key(4, 0) in s and key(5, 0) in s
    assert key(4, 3) not in s and 4 not in s  # layer 0 expert 4 is not layer 4 expert 0
    assert s.nbytes(key(4, 0)) == 5000 + 8192 + 1
    assert s.nbytes(key(5, 0)) == 2 * PAGE + 1 + 5
    assert [tuple(seg) for seg in s.segments(key(4, 2))] == [(0, 0, PAGE), (1, 10000, 7), (2, 2 * PAGE, 1)]
    assert s.total_bytes() == sum(sum(n for _, _, n in segs) for segs in e.ranges.values())


def test_buffered_slot_bytes_are_nbytes_rounded_to_pages(tmp_path):
    e = build_layout("unaligned", tmp_path, direct_io=False)
    for k in e.keys:
        assert e.store.slot_bytes(k) == round_up(e.store.nbytes(k)), hex(k)
    assert e.store.slot_bytes(key(2, 1)) == PAGE  # a 1-byte expert still takes a page


def test_direct_slot_bytes_cover_the_pages(odirect_dir):
    e = build_layout("unaligned", odirect_dir, direct_io=True)
    for k in e.keys:
        slot = e.store.slot_bytes(k)
        assert slot >= round_up(e.store.nbytes(k)), hex(k)
        assert slot % PAGE == 0, hex(k)


def test_buffered_reads_start_the_slot(tmp_path):
    e = build_layout("multi_segment", tmp_path, direct_io=False)
    assert all(e.store.data_offset(k) == 0 for k in e.keys)


def test_direct_reads_place_segments_by_the_remainder_most_bytes_share(odirect_dir):
    # A 50-byte segment, then 4000 bytes whose file offset leaves the remainder the packed
    # position needs (in place: its aligned read covers the page under the first segment,
    # whose bytes must survive), then 300 bytes at another remainder (read aside, moved).
    content = write_file(odirect_dir / "placed.bin", 6 * PAGE, seed=5)
    first = (0, PAGE + 100, 50)
    second = (0, 3 * PAGE + 150, 4000)
    third = (0, 5 * PAGE + 7, 300)
    ranges = {key(0, 0): [first, second, third], key(0, 1): [second], key(0, 2): [third, first]}
    store = open_store([odirect_dir / "placed.bin"], ranges, direct_io=True)
    assert store.direct_io
    assert store.data_offset(key(0, 0)) == 100  # 150 - 50: the 4000 bytes' remainder
    assert store.data_offset(key(0, 1)) == 150
    assert store.data_offset(key(0, 2)) == 7    # 300 bytes at 7 beat 50 at 100 - 300
    for k, segments in ranges.items():
        expected = b"".join(content[o:o + n] for _, o, n in segments)
        assert store.read(k) == expected, hex(k)
        assert store.slot_bytes(k) >= store.data_offset(k) + len(expected)
        with ExpertCache(store, store.slot_bytes(k)) as cache:
            assert bytes(cache.get(k)) == expected, hex(k)


def test_store_unknown_key_raises_key_error(tmp_path):
    e = build_layout("single", tmp_path, direct_io=False)
    missing = key(9, 9)
    for method in (e.store.nbytes, e.store.slot_bytes, e.store.data_offset, e.store.segments, e.store.read):
        with pytest.raises(KeyError, match=str(missing)):
            method(missing)


def test_store_accepts_64_bit_keys(tmp_path):
    path = tmp_path / "k.bin"
    content = write_file(path, 3 * PAGE, seed=3)
    big = key(2**32 - 1, 2**32 - 1)  # 2**64 - 1
    low = key(0, 2**32 - 1)
    ranges = {big: [(0, 0, PAGE)], low: [(0, PAGE, PAGE)], key(1, 0): [(0, 2 * PAGE, PAGE)]}
    store = open_store([path], ranges)
    assert sorted(store.keys()) == sorted(ranges)
    assert store.read(big) == content[:PAGE]
    assert store.read(low) == content[PAGE:2 * PAGE]
    assert store.read(key(1, 0)) == content[2 * PAGE:]


# --------------------------------------------------------------------------- direct IO flags

def test_buffered_store_reports_no_direct_io(tmp_path):
    e = build_layout("single", tmp_path, direct_io=False)
    assert e.store.direct_io is False
    assert e.store.direct_io_fallback == ""


def test_direct_store_reports_direct_io(odirect_dir):
    e = build_layout("single", odirect_dir, direct_io=True)
    assert e.store.direct_io is True
    assert e.store.direct_io_fallback == ""
    with ExpertCache(e.store, 8 * e.slot) as cache:
        s = cache.stats()
        assert s["direct_io"] is True and s["direct_io_fallback"] == ""


def test_direct_io_on_tmpfs_falls_back_or_works_and_reads_right_bytes():
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("/dev/shm (tmpfs) is not available")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        path = Path(d) / "t.bin"
        content = write_file(path, 70001, seed=5)
        ranges = {key(1, 1): [(0, 13, 10007)], key(1, 2): [(0, 70001 - 3, 3)]}
        store = ExpertStore([str(path)], ranges, direct_io=True)
        if store.direct_io:
            assert store.direct_io_fallback == ""
        else:
            assert store.direct_io_fallback.strip(), "fell back without saying why"
        assert store.read(key(1, 1)) == content[13:13 + 10007]
        assert store.read(key(1, 2)) == content[-3:]
        with ExpertCache(store, 4 * 4 * PAGE) as cache:
            assert cache.stats()["direct_io"] is store.direct_io
            assert cache.stats()["direct_io_fallback"] == store.direct_io_fallback
            assert bytes(cache.get(key(1, 1))) == content[13:13 + 10007]


# --------------------------------------------------------------------------- bytes

def test_store_read_returns_file_bytes(layout):
    for k in layout.keys:
        data = layout.store.read(k)
        assert isinstance(data, bytes)
        assert len(data) == layout.store.nbytes(k)
        assert data == layout.expected(k), hex(k)


def test_cache_get_numpy_bytes_equal_file(layout):
    with full_cache(layout) as cache:
        for k in layout.keys:
            buf = cache.get(k)
            arr = np.frombuffer(buf, dtype=np.uint8)
            expected = np.frombuffer(layout.expected(k), dtype=np.uint8)
            assert arr.shape == expected.shape
            assert np.array_equal(arr, expected), hex(k)
            assert arr.ctypes.data == buf.address  # zero copy


def test_cache_get_expert_view_bytes_equal_file(layout):
    with full_cache(layout) as cache:
        for k in layout.keys:
            t = expert_view(cache.get(k), torch.uint8)
            assert t.dtype == torch.uint8 and t.dim() == 1
            assert t.numel() == layout.store.nbytes(k)
            assert t.numpy().tobytes() == layout.expected(k), hex(k)


def test_expert_view_float32_is_zero_copy(make_experts):
    e = make_experts(3)
    with ExpertCache(e.store, 3 * e.slot) as cache:
        k = e.keys[1]
        buf = cache.get(k)
        t = expert_view(buf, torch.float32)
        assert t.dtype == torch.float32
        assert t.numel() == e.store.nbytes(k) // 4
        assert t.data_ptr() == buf.address
        want = torch.frombuffer(bytearray(e.expected(k)), dtype=torch.int32)
        assert torch.equal(t.view(torch.int32), want)  # bitwise: random bytes include NaNs
        part = expert_view(buf, torch.float32, offset=8, count=5)
        assert part.numel() == 5
        assert part.numpy().tobytes() == e.expected(k)[8:28]


def test_cache_get_bytes_equal_file_with_padding_between_experts(io_mode, make_experts):
    e = make_experts(4, nbytes=10007, lead=13, gap=333, directory=io_mode.directory,
                     direct_io=io_mode.direct_io)
    with ExpertCache(e.store, 4 * e.slot) as cache:
        for k in e.keys:
            assert bytes(cache.get(k)) == e.expected(k), hex(k)
        # and a second round, now all hits
        for k in e.keys:
            assert bytes(cache.get(k)) == e.expected(k), hex(k)
        assert cache.stats()["hits"] == 4


# --------------------------------------------------------------------------- ExpertBuffer

def test_buffer_properties(io_mode):
    e = build_layout("unaligned", io_mode.directory, io_mode.direct_io)
    with full_cache(e) as cache:
        for k in e.keys:
            buf = cache.get(k)
            assert isinstance(buf, ExpertBuffer)
            assert buf.key == k
            assert buf.nbytes == len(buf) == e.store.nbytes(k)
            # the packed bytes start where the store placed them in a page-aligned slot
            assert buf.address % PAGE == e.store.data_offset(k), hex(k)
            mv = memoryview(buf)
            assert mv.ndim == 1 and mv.format == "B" and mv.itemsize == 1
            assert mv.shape == (e.store.nbytes(k),)
            mv.release()


def test_buffer_is_read_only_via_numpy(make_experts):
    e = make_experts(2)
    with ExpertCache(e.store, 2 * e.slot) as cache:
        buf = cache.get(e.keys[0])
        arr = np.frombuffer(buf, dtype=np.uint8)
        assert arr.flags.writeable is False
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1
        with pytest.raises(ValueError, match="WRITEABLE"):
            arr.setflags(write=True)
        assert bytes(buf) == e.expected(e.keys[0])


def test_buffer_is_read_only_via_memoryview(make_experts):
    e = make_experts(2)
    with ExpertCache(e.store, 2 * e.slot) as cache:
        buf = cache.get(e.keys[0])
        mv = memoryview(buf)
        assert mv.readonly
        with pytest.raises(TypeError, match="read-only"):
            mv[0] = 1
        with pytest.raises(TypeError, match="read-only"):
            mv[0:4] = b"abcd"
        mv.release()
        assert bytes(buf) == e.expected(e.keys[0])


def test_expected_helper_packs_segments_in_order():
    # Guards the oracle itself: segments are concatenated in the given order.
    contents = [b"0123456789", b"abcdef"]
    assert pack(contents, [(1, 2, 3), (0, 0, 2), (1, 0, 1)]) == b"cde01a"
