"""The peer tier's parts that need no network: which experts a peer holds, the cost model,
and what the base install (without hivemind) says."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from moeedge.peers.cost import LinkCost, LocalCompute, choose, disk_bandwidth, peer_seconds
from moeedge.peers.holdings import choose_auto, parse_experts, usage


def test_named_experts_are_parsed_and_merged():
    assert parse_experts(["0:3,1", "2:0", "0:2"], 3, 4) == {0: [1, 2, 3], 2: [0]}


@pytest.mark.parametrize("spec, match", [
    (["0"], "LAYER:E"), (["x:1"], "integers"), (["0:"], "LAYER:E"), (["3:0"], "MoE layer 3 out of range"),
    (["0:4"], "expert 4 out of range"), (["0:-1"], "expert -1 out of range"), (["0:1,a"], "integers")])
def test_bad_expert_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_experts(spec, 3, 4)


def test_auto_takes_the_most_used_that_fit_and_skips_those_held_elsewhere():
    counts = np.array([[5, 1, 9, 0], [7, 7, 2, 3]], dtype=float)
    held = choose_auto(counts, taken={(0, 2)}, slot_bytes=lambda layer, e: 10, budget_bytes=35)
    assert held == {0: [0], 1: [0, 1]}  # (0,2) is taken; then 7, 7 (layer 1), 5 (layer 0)


def test_auto_fills_with_smaller_experts_past_one_that_does_not_fit():
    counts = np.array([[3, 2, 1]], dtype=float)
    held = choose_auto(counts, set(), slot_bytes=lambda layer, e: 20 if e == 1 else 10, budget_bytes=25)
    assert held == {0: [0, 2]}
    assert choose_auto(counts, set(), lambda layer, e: 10, 100, skip_most_used=1) == {0: [1, 2]}


def test_usage_counts_a_trace_and_refuses_one_of_another_model(tmp_path):
    picks = np.array([[[0, 1], [2, 2]], [[0, 3], [1, 2]]], dtype=np.int32)  # [tokens, layers, k]
    np.savez(tmp_path / "t.npz", experts=picks)
    assert usage(str(tmp_path / "t.npz"), 2, 4).tolist() == [[2, 1, 0, 1], [0, 1, 3, 0]]
    with pytest.raises(ValueError, match="does not fit this model"):
        usage(str(tmp_path / "t.npz"), 3, 4)
    np.savez(tmp_path / "x.npz", other=picks)
    with pytest.raises(ValueError, match="not a routing trace"):
        usage(str(tmp_path / "x.npz"), 2, 4)


def test_cost_model_picks_cache_then_the_cheaper_of_disk_and_peers():
    fast = LinkCost(rtt_s=0.001, bandwidth_bps=12.5e6, service_s=0.002)
    slow = LinkCost(rtt_s=0.05, bandwidth_bps=1e6, service_s=0.002)
    mib64 = 64 << 20
    assert choose(True, mib64, 1e9, {"a": fast}, 1, 1024) == "cache"
    assert choose(False, mib64, 1e9, {"a": fast, "b": slow}, 1, 1024) == "a"  # 4 ms against 67 ms
    assert choose(False, 1 << 20, 1e9, {"a": fast}, 1, 1024) == "disk"  # 1 ms of disk beats a call
    busy = LinkCost(rtt_s=0.001, bandwidth_bps=12.5e6, service_s=0.002, queued=50)
    assert peer_seconds(busy, 1, 1024) > peer_seconds(fast, 1, 1024)
    # a prompt's 64 rows cost the peer 64 rows of service: then the disk can be cheaper, where
    # this device computes them faster (timed: 11 ms for 64 rows)
    here = LocalCompute()
    here.observe(64, 0.011)
    assert choose(False, 64 << 20, 1e9, {"a": fast}, 64, 1024, here) == "disk"  # 133 ms against 78 ms
    assert disk_bandwidth({"bytes_read": 100, "read_seconds": 0.5}) == 200
    assert disk_bandwidth({}) > 0  # the prior, before any read


@pytest.mark.parametrize("argv", [["serve-experts"], ["run", "--prompt", "hi", "--peer", "/ip4/127.0.0.1/tcp/1"],
                                  ["peer-id", "/tmp/never-made-moeedge.key"]])
def test_without_hivemind_peer_commands_say_how_to_install_and_exit_2(argv):
    # hivemind made unimportable, as in the base install
    code = ("import sys; sys.modules['hivemind'] = None; from moeedge.cli import main; "
            f"sys.exit(main({argv!r}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert 'pip install "moeedge[peers]"' in run.stderr
    assert "Traceback" not in run.stderr


def test_the_bandwidth_probe_grows_until_a_transfer_is_long_and_bounds_a_link_that_times_out(monkeypatch):
    import asyncio
    import types

    from moeedge.peers import probe

    clock = types.SimpleNamespace(now=0.0)  # the link's time, not the machine's: no timing here
    monkeypatch.setattr(probe, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    sizes = []

    async def link(pad, timeout):  # 1 MB/s past a 40 KiB burst, as tbf; each call also costs 50 ms
        sizes.append(pad)
        burst = max(0, (40 << 10) - sum(sizes[:-1]))
        clock.now += 0.05 + max(0, pad - burst) / 1e6

    bps, spent, sent = asyncio.run(probe.sustained_bandwidth(link, 0.0, 10.0))
    # 256 KiB: the first to take 0.2 s beyond the round trip; then 128 and 256 KiB from an
    # empty bucket, whose difference is the rate whatever each call's fixed cost
    assert sizes == [4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 128 << 10, 256 << 10]
    assert bps == pytest.approx(1e6) and sent == sum(sizes) and spent == pytest.approx(clock.now)

    sizes.clear()

    async def deep(pad, timeout):  # 100 KB/s past a bucket that holds every call below the largest
        sizes.append(pad)
        burst = max(0, (1 << 20) - (4 << 10) - sum(sizes[:-1]))  # 4 KiB .. 512 KiB
        clock.now += 0.05 + max(0, pad - burst) / 1e5

    bps, _, _ = asyncio.run(probe.sustained_bandwidth(deep, 0.0, 100.0))
    # the largest size stopped the growth: timed with half of it
    assert sizes[-3:] == [probe.MAX_BYTES, probe.MAX_BYTES // 2, probe.MAX_BYTES] and bps == pytest.approx(1e5)

    async def stuck(pad, timeout):
        raise asyncio.TimeoutError

    assert asyncio.run(probe.sustained_bandwidth(stuck, 0.0, 4.0))[0] == (4 << 10) / 4.0  # at most that fast
    with pytest.raises(ValueError, match="timeout must be positive"):
        asyncio.run(probe.sustained_bandwidth(stuck, 0.0, 0))
