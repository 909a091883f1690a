"""The cost model's charge for computing an expert here (moeedge.peers.cost.LocalCompute):
an expert read from disk is charged the read and this device's timed compute, a peer's call
its round trip, transfer and service time. Injected numbers only: no timing is asserted."""
from __future__ import annotations

import types

import pytest

from moeedge.peers import cost
from moeedge.peers.cost import LinkCost, LocalCompute, choose, local_seconds
from moeedge.peers.remote import RemoteExperts

MIB64 = 64 << 20


def timed(*samples: tuple[int, float]) -> LocalCompute:
    local = LocalCompute()
    for rows, seconds in samples:
        local.observe(rows, seconds)
    return local


def test_the_peer_is_chosen_when_the_read_and_the_compute_here_cost_more_than_its_call():
    link = LinkCost(rtt_s=0.040, bandwidth_bps=12.5e6, service_s=0.050)  # 90.2 ms for a row
    disk_bps = MIB64 / 0.075  # a 75 ms read: alone, cheaper than the call
    assert choose(False, MIB64, disk_bps, {"p": link}, 1, 1024, timed((1, 0.005))) == "disk"  # 80 ms
    assert choose(False, MIB64, disk_bps, {"p": link}, 1, 1024, timed((1, 0.030))) == "p"  # 105 ms
    # a queue at the peer is charged to it, not here
    busy = LinkCost(rtt_s=0.040, bandwidth_bps=12.5e6, service_s=0.050, queued=1)
    assert choose(False, MIB64, disk_bps, {"p": busy}, 1, 1024, timed((1, 0.030))) == "disk"
    assert choose(True, MIB64, disk_bps, {"p": link}, 1, 1024, timed((1, 0.030))) == "cache"


def test_before_any_compute_here_is_timed_it_is_the_cheapest_peers_service_time():
    a = LinkCost(rtt_s=0.001, bandwidth_bps=1e9, service_s=0.004)
    b = LinkCost(rtt_s=0.001, bandwidth_bps=1e9, service_s=0.010)
    assert local_seconds(LocalCompute(), {"a": a, "b": b}, 3) == pytest.approx(0.012)
    assert local_seconds(None, {"a": a}, 2) == pytest.approx(0.008)
    assert local_seconds(None, {}, 2) == 0.0  # no peer to compare with: nothing to charge
    # the computes cancel: a 3 ms read against a call of 1 ms round trip and the same service
    assert choose(False, 3_000_000, 1e9, {"a": a}, 1, 1024) == "a"
    # once timed here, the timing is charged, not the peer's service time
    assert local_seconds(timed((3, 0.003)), {"a": a}, 3) == pytest.approx(0.003)


def test_a_fixed_part_and_a_part_per_row_are_fitted_from_timings_on_a_line():
    local = timed(*[(n, 0.003 + 0.0005 * n) for n in (1, 8, 2, 16, 4, 64, 1)])
    per_call, per_row = local.parts()
    assert per_call == pytest.approx(0.003) and per_row == pytest.approx(0.0005)
    assert local.seconds(32) == pytest.approx(0.019)


def test_rows_that_do_not_vary_are_charged_per_row_as_a_peers_service_time():
    local = timed((1, 0.004), (1, 0.004))
    assert local.parts() == pytest.approx((0.0, 0.004))
    assert local.seconds(10) == pytest.approx(0.04)
    # a line through noise that goes below zero at no rows, or down with more rows: per row
    # only, at the mean rate
    for noisy in (timed((10, 0.001), (20, 0.030)), timed((2, 0.010), (20, 0.001))):
        per_call, per_row = noisy.parts()
        assert per_call == 0.0 and per_row == pytest.approx(noisy.moments[1] / noisy.moments[0])


def test_timings_are_smoothed_each_new_one_weighing_smooth():
    local = timed((1, 0.010))
    assert local.seconds(1) == pytest.approx(0.010)  # the first timing is taken whole
    local.observe(1, 0.020)
    assert local.seconds(1) == pytest.approx(0.010 + cost.SMOOTH * 0.010)
    for _ in range(60):  # a lasting change is followed
        local.observe(1, 0.020)
    assert local.seconds(1) == pytest.approx(0.020, rel=1e-4)
    assert local.timed == 62


@pytest.mark.parametrize("rows, seconds", [(0, 0.01), (-1, 0.01), (1, -0.01), (1, float("nan"))])
def test_a_bad_timing_is_refused(rows, seconds):
    with pytest.raises(ValueError, match="local compute"):
        LocalCompute().observe(rows, seconds)


def test_stats_show_the_local_compute_per_call_and_per_row():
    client = types.SimpleNamespace(deadline_s=1.0, links=[])  # stats() reads only these of a client
    remote = RemoteExperts(client, experts=None, hidden=8)
    assert remote.stats()["local_compute_s"] == {"per_call": None, "per_row": None, "timed": 0}
    for n in (1, 5):
        remote.computed_here(n, 0.002 + 0.001 * n)
    assert remote.stats()["local_compute_s"] == pytest.approx({"per_call": 0.002, "per_row": 0.001, "timed": 2})
