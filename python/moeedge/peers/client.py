"""Calls to peers, each with moeedge's own deadline (hivemind's remote-expert forward has none).

One p2pd of our own (started as a program, not forked, so it is safe beside moeedge's
threads) and one event-loop thread. A peer is judged by its calls: one that misses a
deadline or fails is not called again until a probe (rpc_info, itself under the deadline)
answers, tried every retry_s in the background; then it is used again. Everything a peer
sends back is checked (shape, dtype) before use."""
from __future__ import annotations

import asyncio
import statistics
import threading
import time
from concurrent.futures import Future

import torch

from moeedge.peers import require_hivemind
from moeedge.peers.cost import LinkCost
from moeedge.peers.names import INFO_UID, layer_uid
from moeedge.peers.probe import sustained_bandwidth

# One padded probe call may take this long (a slow link is slow, not dead: 64 KiB at
# 0.1 Mbit/s take 5.2 s); past it the link's bandwidth is taken as at most what that implies.
PROBE_PAD_TIMEOUT_S = 10.0
# A live link's round trip is measured again this often, its bandwidth at most this often and
# at most a tenth of the time (a slow link's probe is long: it is not to crowd out the calls).
REFRESH_S = 2.0
BANDWIDTH_REFRESH_S = 10.0
# Until calls are measured: a peer's service time per row is guessed as this much.
PRIOR_SERVICE_S = 0.002
EWMA = 0.2  # weight of each new measurement
# A live link without a call for this long gets one (moeedge.peers.remote), whose time
# replaces its service time: the only way a service time measured while the link was bad
# (an outage's slow calls count as service) is measured again once the link is unused.
EXPLORE_S = 5.0


class PeerLink:
    """One peer: where it is, what it holds, what its calls cost, whether it answers."""

    def __init__(self, address: str, peer_id):
        self.address, self.peer_id = address, peer_id
        self.name = peer_id.to_base58()
        self.held: dict[int, frozenset[int]] = {}
        self.max_rows = 1
        self.cost = LinkCost(rtt_s=1.0, bandwidth_bps=1e6, service_s=PRIOR_SERVICE_S)
        self.alive = False
        self.next_probe = 0.0
        self.next_refresh = self.next_bandwidth = 0.0
        self.last_call = time.monotonic()
        self.last_error = ""
        self.stats = {"calls": 0, "rows": 0, "failures": 0, "deadline_misses": 0, "revivals": 0,
                      "probe_bytes": 0, "probe_s": 0.0}

    def holds(self, layer: int, expert: int) -> bool:
        return expert in self.held.get(layer, ())


class PeerClient:
    def __init__(self, addresses: list[str], model: str, hidden: int, deadline_s: float = 1.0,
                 retry_s: float = 2.0, identity=None, refresh_s: float = REFRESH_S,
                 bandwidth_refresh_s: float = BANDWIDTH_REFRESH_S):
        require_hivemind()
        from hivemind.p2p import P2P, PeerID
        from hivemind.utils.multiaddr import Multiaddr

        if deadline_s <= 0 or retry_s <= 0:
            raise ValueError(f"peer deadline and retry must be positive, got {deadline_s} and {retry_s}")
        self.model, self.hidden, self.deadline_s, self.retry_s = model, hidden, deadline_s, retry_s
        self.refresh_s, self.bandwidth_refresh_s = refresh_s, bandwidth_refresh_s
        self.links: list[PeerLink] = []
        for address in addresses:
            try:
                peer_id = PeerID.from_base58(Multiaddr(address).value_for_protocol("p2p"))
            except Exception:  # noqa: BLE001 (any malformed address)
                raise ValueError(f"peer address {address!r} is not a multiaddr ending in /p2p/PEER_ID "
                                 "(serve-experts prints it)") from None
            self.links.append(PeerLink(address, peer_id))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="moeedge-peers", daemon=True)
        self.thread.start()
        identity = None if identity is None else str(identity)
        self.p2p = self._run(P2P.create(initial_peers=addresses, identity_path=identity), timeout=30)
        from moeedge.peers.handler import GuardedHandler

        self.stubs = {link.name: GuardedHandler.get_stub(self.p2p, link.peer_id) for link in self.links}
        self._closed = False
        try:
            for link in self.links:
                self._run(self._probe(link), timeout=None)
        except BaseException:
            self.close()
            raise
        self.prober = threading.Thread(target=self._probe_loop, name="moeedge-peers-probe", daemon=True)
        self.prober.start()

    def _run(self, coro, timeout: float | None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _info(self, link: PeerLink, pad: int = 0, timeout: float | None = None) -> dict:
        from hivemind.proto import runtime_pb2
        from hivemind.utils import MSGPackSerializer

        request = runtime_pb2.ExpertUID(uid=INFO_UID + "." * pad)
        reply = await asyncio.wait_for(self.stubs[link.name].rpc_info(request), timeout or self.deadline_s)
        return MSGPackSerializer.loads(reply.serialized_info)

    async def _probe(self, link: PeerLink) -> bool:
        """Ask what it holds and time the link: round trips, and a padded one for bandwidth."""
        try:
            info = await self._info(link)
            await self._info(link)  # the first calls on a new connection are slower: not timed
            if not isinstance(info, dict) or info.get("model") != self.model:
                link.alive, link.next_probe = False, float("inf")
                raise ValueError(f"peer {link.address} serves {info.get('model') if isinstance(info, dict) else '?'}, "
                                 f"not this model ({self.model})")
            if info.get("hidden") != self.hidden:
                raise ValueError(f"peer {link.address} reports hidden size {info.get('hidden')}, not {self.hidden}")
            rtt = await self._ping(link)
            if time.monotonic() >= link.next_bandwidth:  # a revival within the refresh period keeps it
                await self._measure_bandwidth(link, rtt, smooth=link.stats["probe_bytes"] > 0)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 (unreachable, refused, too slow: tried again later)
            link.last_error = f"{type(e).__name__}: {e}"[:300]
            link.alive, link.next_probe = False, time.monotonic() + self.retry_s
            return False
        link.held = {int(k): frozenset(int(e) for e in v) for k, v in info.get("held", {}).items()}
        link.max_rows = max(1, int(info.get("max_rows", 1)))
        link.cost.rtt_s = rtt
        link.cost.queued = 0
        if not link.alive and link.stats["calls"]:
            link.stats["revivals"] += 1
        link.alive = True
        link.next_refresh = time.monotonic() + self.refresh_s
        return True

    async def _ping(self, link: PeerLink) -> float:
        """The median of three empty calls' round trips."""
        times = []
        for _ in range(3):
            start = time.perf_counter()
            await self._info(link)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    async def _measure_bandwidth(self, link: PeerLink, rtt: float, smooth: bool) -> None:
        async def send(pad: int, timeout: float):
            return await self._info(link, pad, timeout)

        bps, spent, sent = await sustained_bandwidth(send, rtt, max(self.deadline_s, PROBE_PAD_TIMEOUT_S))
        link.cost.bandwidth_bps = bps if not smooth else link.cost.bandwidth_bps + 0.5 * (bps - link.cost.bandwidth_bps)
        link.stats["probe_bytes"] += sent
        link.stats["probe_s"] += spent
        link.next_bandwidth = time.monotonic() + max(self.bandwidth_refresh_s, 10 * spent)

    async def _refresh(self, link: PeerLink) -> None:
        """A live link measured again (its calls alone do not say when an unused link got
        faster): the round trip, and now and then the bandwidth, smoothed."""
        try:
            rtt = await self._ping(link)
            link.cost.rtt_s = rtt
            if time.monotonic() >= link.next_bandwidth:
                await self._measure_bandwidth(link, rtt, smooth=True)
        except Exception as e:  # noqa: BLE001 (a failed refresh is a failed call: probed until it answers)
            link.last_error = f"{type(e).__name__}: {e}"[:300]
            self._failed(link)
        link.next_refresh = time.monotonic() + self.refresh_s

    def _probe_loop(self) -> None:
        while not self._closed:
            now = time.monotonic()
            for link in self.links:
                if not link.alive and link.next_probe <= now:
                    try:
                        self._run(self._probe(link), timeout=None)
                    except ValueError:
                        link.next_probe = float("inf")
                elif link.alive and link.next_refresh <= now:
                    self._run(self._refresh(link), timeout=None)
            time.sleep(min(0.2, self.retry_s))

    def call_deadline(self, link: PeerLink, rows: int) -> float:
        """A call's deadline: the deadline, plus twice the peer's measured time for these rows
        (a prompt's request of 64 rows of a wide expert takes longer than a decode step's),
        at most ten deadlines (a service time measured during an outage may be long)."""
        return min(self.deadline_s + 2 * link.cost.service_s * rows, 10 * self.deadline_s)

    def stale(self, link: PeerLink) -> bool:
        """Whether a live link has gone EXPLORE_S without a call."""
        return link.alive and time.monotonic() - link.last_call > EXPLORE_S

    def call(self, link: PeerLink, layer: int, rows: torch.Tensor, experts: list[int]) -> Future:
        """A Future of expert[i] applied to rows[i] (unscaled [n, H]) by link's peer; its
        result is None where the call failed or missed the deadline (then the peer is down)."""
        link.cost.queued += len(experts)
        explore, link.last_call = self.stale(link), time.monotonic()
        return asyncio.run_coroutine_threadsafe(self._call(link, layer, rows, experts, explore), self.loop)

    async def _call(self, link: PeerLink, layer: int, rows: torch.Tensor, experts: list[int],
                    explore: bool = False) -> torch.Tensor | None:
        from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
        from hivemind.proto import runtime_pb2

        start = time.perf_counter()
        try:
            request = runtime_pb2.ExpertRequest(uid=layer_uid(self.model, layer), tensors=[
                serialize_torch_tensor(rows), serialize_torch_tensor(torch.tensor(experts, dtype=torch.int64))])
            reply = await asyncio.wait_for(self.stubs[link.name].rpc_forward(request), self.call_deadline(link, len(experts)))
            if len(reply.tensors) != 1:
                raise ValueError("a reply has one tensor")
            out = deserialize_torch_tensor(reply.tensors[0])
            if out.dtype != torch.float32 or tuple(out.shape) != tuple(rows.shape):
                raise ValueError(f"a reply of {out.dtype} {list(out.shape)} for rows {list(rows.shape)}")
        except asyncio.TimeoutError:
            link.stats["deadline_misses"] += 1
            return self._failed(link)
        except Exception as e:  # noqa: BLE001 (the peer failed, refused, or sent something wrong)
            link.stats["failures"] += 1
            link.last_error = f"{type(e).__name__}: {e}"[:300]
            return self._failed(link)
        finally:
            link.cost.queued = max(0, link.cost.queued - len(experts))
        took = time.perf_counter() - start
        sent = rows.numel() * 4 * 2 + len(experts) * 8
        service = max(0.0, took - link.cost.rtt_s - sent / link.cost.bandwidth_bps) / len(experts)
        link.cost.service_s += (1.0 if explore else EWMA) * (service - link.cost.service_s)
        link.stats["calls"] += 1
        link.stats["rows"] += len(experts)
        return out

    def _failed(self, link: PeerLink) -> None:
        link.alive, link.next_probe = False, time.monotonic() + self.retry_s
        return None

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._run(self.p2p.shutdown(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
