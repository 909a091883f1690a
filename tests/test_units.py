"""moeedge.units (parse_bytes, format_bytes) and moeedge.keys (ExpertKey)."""
from __future__ import annotations

import pytest

from moeedge import ExpertKey, format_bytes, parse_bytes

# --------------------------------------------------------------------------- parse_bytes


@pytest.mark.parametrize(("text", "expected"), [
    (0, 0),
    (4096, 4096),
    ("4096", 4096),
    ("  4096  ", 4096),
    ("4096B", 4096),
    ("1.5GiB", 1536 * 2**20),
    ("1.5 gib", 1536 * 2**20),
    ("800MB", 800_000_000),
    ("800mb", 800_000_000),
    ("2 MiB", 2 * 2**20),
    ("1k", 1024),
    ("1K", 1024),
    ("3m", 3 * 2**20),
    ("2G", 2 * 2**30),
    ("1T", 2**40),
    ("1TiB", 2**40),
    ("1tb", 10**12),
    ("1.5kb", 1500),
    (".5K", 512),
    ("10.", 10),
    ("1.9", 1),  # fractions of a byte are truncated
])
def test_parse_bytes_accepts(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", [
    -1, True, False, None, 1.5, "", "  ", "abc", "1.2.3", "1XB", "-5", "1 0", "GiB", "1e3", [4096],
])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match=r"byte count"):
        parse_bytes(bad)


def test_parse_bytes_error_names_the_value():
    with pytest.raises(ValueError, match=r"'12 parsecs'"):
        parse_bytes("12 parsecs")
    with pytest.raises(ValueError, match=r"-7"):
        parse_bytes(-7)


# --------------------------------------------------------------------------- format_bytes


@pytest.mark.parametrize(("n", "expected"), [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (2**20, "1.0 MiB"),
    (int(1.25 * 2**30), "1.2 GiB"),
    (3 * 2**30, "3.0 GiB"),
    (2**40, "1024.0 GiB"),
])
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


@pytest.mark.parametrize("n", [0, 1, 512, 1536, 3 * 2**20, 5 * 2**30])
def test_format_then_parse_round_trips_exact_values(n):
    assert parse_bytes(format_bytes(n)) == n


# --------------------------------------------------------------------------- ExpertKey


@pytest.mark.parametrize(("layer", "expert", "packed"), [
    (0, 0, 0),
    (0, 7, 7),
    (1, 0, 2**32),
    (1, 5, 2**32 + 5),
    (61, 255, 61 * 2**32 + 255),
    (2**32 - 1, 2**32 - 1, 2**64 - 1),
])
def test_expert_key_packs(layer, expert, packed):
    k = ExpertKey(layer, expert)
    assert k.packed == packed
    assert int(k) == packed
    assert ExpertKey.unpack(packed) == k
    assert ExpertKey.unpack(packed) == (layer, expert)
    assert isinstance(ExpertKey.unpack(packed), ExpertKey)


def test_expert_key_round_trip_seeded():
    import random

    rng = random.Random(5)
    for _ in range(1000):
        layer, expert = rng.randrange(2**32), rng.randrange(2**32)
        k = ExpertKey(layer, expert)
        assert ExpertKey.unpack(k.packed) == k
        packed = rng.randrange(2**64)
        assert ExpertKey.unpack(packed).packed == packed


def test_expert_key_order_matches_packed_order():
    keys = [ExpertKey(2, 0), ExpertKey(0, 9), ExpertKey(1, 2**32 - 1), ExpertKey(1, 3)]
    assert sorted(keys) == sorted(keys, key=int)
    assert [k.layer for k in sorted(keys)] == [0, 1, 1, 2]


def test_expert_key_fields():
    k = ExpertKey(layer=3, expert=11)
    assert (k.layer, k.expert) == (3, 11)
    assert k == (3, 11)


@pytest.mark.parametrize(("layer", "expert"), [(-1, 0), (0, -1), (2**32, 0), (0, 2**32), (2**40, 2**40)])
def test_expert_key_out_of_range_raises(layer, expert):
    with pytest.raises(ValueError, match=r"out of range"):
        ExpertKey(layer, expert).packed
    with pytest.raises(ValueError, match=r"out of range"):
        int(ExpertKey(layer, expert))


@pytest.mark.parametrize("packed", [-1, 2**64, 2**70])
def test_expert_key_unpack_out_of_range_raises(packed):
    with pytest.raises(ValueError, match=rf"out of range: {packed}"):
        ExpertKey.unpack(packed)
