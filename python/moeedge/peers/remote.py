"""The client side of the peer tier: which missing experts a step sends to peers.

DecoderFFN calls dispatch(moe_layer, {expert: rows}) for the experts not resident here,
before it computes the resident ones; each expert whose call is cheaper than reading it from
disk (moeedge.peers.cost) goes to the cheapest live peer that holds it, one request per
peer for the layer. A call that fails or misses the deadline gives None, and DecoderFFN
computes that expert here; outputs are summed in expert order wherever they were computed,
so they do not depend on where an expert ran."""
from __future__ import annotations

import os
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from moeedge.keys import ExpertKey
from moeedge.peers.client import PeerClient
from moeedge.peers.cost import choose, disk_bandwidth
from moeedge.peers.helpers_memory import helper_bytes
from moeedge.peers.names import model_id
from moeedge.runtime.experts import ExpertAccess

DISK_REFRESH_CALLS = 64  # dispatches between readings of the cache's measured disk bandwidth


class RemoteCall:
    """One expert's rows in a peer's reply: result() waits at most the deadline."""

    def __init__(self, owner: "RemoteExperts", future, start: int, stop: int):
        self.owner, self.future, self.start, self.stop = owner, future, start, stop

    def result(self) -> torch.Tensor | None:
        try:
            # the call itself ends at the deadline; this bound only guards the loop thread
            out = self.future.result(timeout=2 * self.owner.client.deadline_s + 1)
        except FutureTimeout:
            out = None
        if out is None:
            self.owner.counters["computed_here_after_failure"] += 1
            return None
        return out[self.start:self.stop]


class RemoteExperts:
    def __init__(self, client: PeerClient, experts: ExpertAccess, hidden: int):
        self.client, self.experts, self.hidden = client, experts, hidden
        self.disk_bps = disk_bandwidth({})
        self.dispatches = 0
        self.counters = {"sent": 0, "read_here": 0, "computed_here_after_failure": 0}

    def dispatch(self, moe_layer: int, offered: dict[int, torch.Tensor]) -> dict[int, RemoteCall]:
        if self.dispatches % DISK_REFRESH_CALLS == 0:
            self.disk_bps = disk_bandwidth(self.experts.cache.stats())
        self.dispatches += 1
        plan: dict[str, list[int]] = {}
        for e, rows in offered.items():
            links = {link.name: link.cost for link in self.client.links
                     if link.alive and link.holds(moe_layer, e)
                     and sum(offered[x].shape[0] for x in plan.get(link.name, [])) + rows.shape[0] <= link.max_rows}
            size = self.experts.cache.store.slot_bytes(ExpertKey(moe_layer, e).packed)
            where = choose(False, size, self.disk_bps, links, rows.shape[0], self.hidden)
            if where == "disk":
                self.counters["read_here"] += 1
            else:
                plan.setdefault(where, []).append(e)
        calls = {}
        by_name = {link.name: link for link in self.client.links}
        for name, experts in plan.items():
            rows = torch.cat([offered[e] for e in experts]).contiguous()
            picks = [e for e in experts for _ in range(offered[e].shape[0])]
            future = self.client.call(by_name[name], moe_layer, rows, picks)
            start = 0
            for e in experts:
                calls[e] = RemoteCall(self, future, start, start + offered[e].shape[0])
                start += offered[e].shape[0]
            self.counters["sent"] += len(experts)
        return calls

    def stats(self) -> dict:
        return {**self.counters, "disk_bps": self.disk_bps, "deadline_s": self.client.deadline_s,
                "peers": [{"address": link.address, "alive": link.alive, "held": sum(map(len, link.held.values())),
                           "rtt_s": link.cost.rtt_s, "bandwidth_bps": link.cost.bandwidth_bps,
                           "service_s": link.cost.service_s, "last_error": link.last_error, **link.stats}
                          for link in self.client.links]}

    def close(self) -> None:
        self.client.close()


def connect(ckpt, addresses: list[str], deadline_s: float, identity=None) -> tuple[PeerClient, int]:
    """A client for these peers of this checkpoint, and the bytes its helper (p2pd) holds,
    which the caller's memory plan counts."""
    if isinstance(addresses, (str, bytes)):
        raise ValueError("peers is a list of multiaddrs, not one string")
    if getattr(ckpt.config, "family", None) not in ("mixtral", "qwen2_moe", "olmoe"):
        raise ValueError("peers serve decoder MoE models (Mixtral, Qwen2-MoE, OLMoE) only")
    client = PeerClient(list(addresses), model_id(ckpt), ckpt.config.hidden, deadline_s, identity=identity)
    helpers = helper_bytes(os.getpid())
    return client, helpers["forked"] + helpers["daemons"]
