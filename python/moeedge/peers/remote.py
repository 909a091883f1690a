"""The client side of the peer tier: which missing experts a step sends to peers.

DecoderFFN calls dispatch(moe_layer, {expert: rows}) for the experts not resident here,
before it computes the resident ones; each expert whose call is cheaper than reading it from
disk and computing it here (moeedge.peers.cost; DecoderFFN times what it computes here,
computed_here) goes to the cheapest live peer that holds it. A peer's rows go in requests of
at most its max_rows; a prompt's rows (pieces: each chunk's share of an expert's rows) go
chunk by chunk, so that the first chunk's come back first and the next layer can
start on that chunk while the peer computes the others. A call that fails or misses the
deadline gives None, and DecoderFFN computes that expert here; outputs are summed in expert
order wherever they were computed, so they do not depend on where an expert ran."""
from __future__ import annotations

import os
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from moeedge.keys import ExpertKey
from moeedge.peers.client import PeerClient
from moeedge.peers.cost import LocalCompute, choose, disk_bandwidth
from moeedge.peers.helpers_memory import helper_bytes
from moeedge.peers.names import model_id
from moeedge.runtime.experts import ExpertAccess

DISK_REFRESH_CALLS = 64  # dispatches between readings of the cache's measured disk bandwidth
GUARD_S = 60.0  # past a call's own deadline (which grows with its rows): the loop thread is stuck


class RemoteCall:
    """One expert's rows, in pieces that may be in several requests: result(upto) waits (at
    most the deadline) for the pieces that hold its first `upto` rows (all: None)."""

    def __init__(self, owner: "RemoteExperts"):
        self.owner = owner
        self.parts: list[tuple[object, int, int]] = []  # (future, start, stop) in the reply, in row order
        self.got: list[torch.Tensor] = []
        self.failed = False

    def result(self, upto: int | None = None) -> torch.Tensor | None:
        have = sum(len(g) for g in self.got)
        while not self.failed and len(self.got) < len(self.parts) and (upto is None or have < upto):
            future, start, stop = self.parts[len(self.got)]
            try:  # the call itself ends at its deadline; this bound only guards the loop thread
                out = future.result(timeout=2 * self.owner.client.deadline_s + GUARD_S)
            except FutureTimeout:
                out = None
            if out is None:
                self.failed = True
                self.owner.counters["computed_here_after_failure"] += 1
                break
            self.got.append(out[start:stop])
            have += stop - start
        if self.failed:
            return None
        return self.got[0] if len(self.got) == 1 else torch.cat(self.got)


class RemoteExperts:
    def __init__(self, client: PeerClient, experts: ExpertAccess, hidden: int):
        self.client, self.experts, self.hidden = client, experts, hidden
        self.disk_bps = disk_bandwidth({})
        self.dispatches = 0
        self.local = LocalCompute()  # this device's compute of an expert, timed by DecoderFFN
        self.counters = {"sent": 0, "read_here": 0, "computed_here_after_failure": 0, "prompt_rows_sent": 0,
                         "explored": 0}

    def dispatch(self, moe_layer: int, offered: dict[int, torch.Tensor],
                 pieces: dict[int, list[int]] | None = None) -> dict[int, RemoteCall]:
        """pieces: each expert's rows cut into runs of these sizes (a prompt's chunks), sent
        in that order; without it, each expert's rows are one piece."""
        if self.dispatches % DISK_REFRESH_CALLS == 0:
            self.disk_bps = disk_bandwidth(self.experts.cache.stats())
        self.dispatches += 1
        plan: dict[str, list[int]] = {}
        for e, rows in offered.items():
            links = {link.name: link.cost for link in self.client.links if link.alive and link.holds(moe_layer, e)}
            size = self.experts.cache.store.slot_bytes(ExpertKey(moe_layer, e).packed)
            where = choose(False, size, self.disk_bps, links, rows.shape[0], self.hidden, self.local)
            stale = [link.name for link in self.client.links if link.name in links and self.client.stale(link)]
            if where == "disk" and stale and stale[0] not in plan:
                where = stale[0]  # one call to a link unused for a while: its service time measured again
                self.counters["explored"] += 1
            if where == "disk":
                self.counters["read_here"] += 1
            else:
                plan.setdefault(where, []).append(e)
        calls = {}
        by_name = {link.name: link for link in self.client.links}
        for name, experts in plan.items():
            link = by_name[name]
            runs = []  # (piece index, expert, first row, rows): the first chunk's pieces first
            for e in experts:
                sizes, first = (pieces or {}).get(e, [offered[e].shape[0]]), 0
                for i, n in enumerate(sizes):
                    for lo in range(first, first + n, link.max_rows):  # a piece past max_rows: split
                        runs.append((i, e, lo, min(lo + link.max_rows, first + n) - lo))
                    first += n
                calls[e] = RemoteCall(self)
            runs.sort(key=lambda r: r[0])
            while runs:
                request, rows = [], 0
                while runs and rows + runs[0][3] <= link.max_rows:
                    request.append(runs.pop(0))
                    rows += request[-1][3]
                x = torch.cat([offered[e][lo:lo + n] for _, e, lo, n in request]).contiguous()
                future = self.client.call(link, moe_layer, x, [e for _, e, _, n in request for _ in range(n)])
                start = 0
                for _, e, lo, n in request:
                    calls[e].parts.append((future, start, start + n))
                    start += n
            self.counters["sent"] += len(experts)
            if pieces is not None:
                self.counters["prompt_rows_sent"] += sum(offered[e].shape[0] for e in experts)
        return calls

    def computed_here(self, rows: int, seconds: float) -> None:
        """DecoderFFN's timing of one expert it computed for rows rows (its bytes in memory
        already): what the cost model charges an expert read from disk besides the read."""
        self.local.observe(rows, seconds)

    def stats(self) -> dict:
        parts = self.local.parts() or (None, None)
        local = {"per_call": parts[0], "per_row": parts[1], "timed": self.local.timed}
        return {**self.counters, "disk_bps": self.disk_bps, "local_compute_s": local,
                "deadline_s": self.client.deadline_s,
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
