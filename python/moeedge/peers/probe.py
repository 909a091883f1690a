"""How fast a link to a peer is: the bandwidth it sustains, not the burst it lets through.

A shaped link (tc's tbf, a cell's scheduler) sends a burst at line rate before it holds the
sender to its rate: one short padded call times the burst, not the link (a 32 KiB probe fits
tbf's 32 KiB bucket whole, so a 0.1 Mbit/s link measured as fast as loopback). So padded
calls grow (START_BYTES, then twice the last) back to back until one's transfer takes at
least MIN_TRANSFER_S beyond the round trip: by then the calls before it have emptied the
bucket. That size is sent once more and timed: the one that stopped the growth may still
have begun in the bucket (a bucket half emptied before it made it slow enough to stop at,
and still 1.2-4x too fast). Past the largest size, the largest is timed. A call that misses
its timeout says the link is at most that fast (size / timeout). Small first calls keep the
probe short on a slow link with a small bucket (8 KiB at 0.05 Mbit/s take 1.3 s)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

START_BYTES = 4 << 10
# a peer answers info requests of up to 1 MiB (moeedge.peers.handler.MAX_PROBE_BYTES)
MAX_BYTES = (1 << 20) - 256
GROWTH = 2
MIN_TRANSFER_S = 0.2


async def sustained_bandwidth(send: Callable[[int, float], Awaitable[object]], rtt_s: float,
                              timeout_s: float) -> tuple[float, float, int]:
    """(bytes/s the link sustains, seconds the probe took, bytes it sent). send(pad, timeout)
    makes one call padded by pad bytes and raises asyncio.TimeoutError past timeout."""
    if timeout_s <= 0:
        raise ValueError(f"the probe's timeout must be positive, got {timeout_s}")
    size, spent, sent, again = START_BYTES, 0.0, 0, False
    while True:
        start = time.perf_counter()
        try:
            await send(size, timeout_s)
        except asyncio.TimeoutError:
            return size / timeout_s, spent + timeout_s, sent + size
        took = time.perf_counter() - start
        spent, sent = spent + took, sent + size
        transfer = took - rtt_s
        if again or size >= MAX_BYTES:
            return size / max(transfer, 1e-6), spent, sent
        if transfer >= MIN_TRANSFER_S and size > START_BYTES:
            again = True  # the same size once more, from an empty bucket
        else:
            size = min(size * GROWTH, MAX_BYTES)
