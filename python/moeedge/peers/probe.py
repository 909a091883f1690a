"""How fast a link to a peer is: the bandwidth it sustains, not the burst it lets through.

A shaped link (tc's tbf, a cell's scheduler) sends a burst at line rate before it holds the
sender to its rate: one short padded call times the burst, not the link (a 32 KiB probe fits
tbf's 32 KiB bucket whole, so a 0.1 Mbit/s link measured as fast as loopback). So padded
calls grow (START_BYTES, then twice the last) back to back until one's transfer takes at
least MIN_TRANSFER_S beyond the round trip: by then the calls before it have emptied the
bucket. Half that size and that size are then timed from an empty bucket, and the link's
rate is their difference in bytes over their difference in time: the call that stopped the
growth may still have begun in the bucket (1.2-4x too fast), and a fixed cost per call (the
peer's handling, a CPU busy under load) made one timed call read 0.57x of a 3 Mbit/s link.
Not larger sizes: past tbf's queue TCP loses packets and a transfer slows by more than its
size (64 KiB took 4x as long as 32 KiB at 0.3 Mbit/s); so where the difference says the rate
is lower than the larger call alone, or is too small to trust, the larger call alone is the
rate. A link that reaches the largest size before a transfer is long is fast: that call alone
is its rate. A call that misses its timeout says the link is at most that fast (size /
timeout). Small first calls keep the probe short on a slow link with a small bucket (8 KiB
at 0.05 Mbit/s take 1.3 s)."""
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
    size, spent, sent = START_BYTES, 0.0, 0
    while True:
        took = await _timed(send, size, timeout_s)
        if took is None:
            return size / timeout_s, spent + timeout_s, sent + size
        spent, sent = spent + took, sent + size
        if took - rtt_s >= MIN_TRANSFER_S and size > START_BYTES:
            break
        if size >= MAX_BYTES:
            return size / max(took - rtt_s, 1e-6), spent, sent
        size = min(size * GROWTH, MAX_BYTES)
    times = []
    for pad in (size // GROWTH, size):
        took = await _timed(send, pad, timeout_s)
        if took is None:
            return pad / timeout_s, spent + timeout_s, sent + pad
        spent, sent = spent + took, sent + pad
        times.append(took)
    alone = size / max(times[1] - rtt_s, 1e-6)
    if times[1] - times[0] < 0.25 * (times[1] - rtt_s):  # a fixed cost above the transfer, or noise
        return alone, spent, sent
    return max(alone, (size - size // GROWTH) / (times[1] - times[0])), spent, sent


async def _timed(send: Callable[[int, float], Awaitable[object]], pad: int, timeout_s: float) -> float | None:
    """Seconds one padded call took, None past its timeout."""
    start = time.perf_counter()
    try:
        await send(pad, timeout_s)
    except asyncio.TimeoutError:
        return None
    return time.perf_counter() - start
