"""What fetching an expert's output costs, by where it comes from: one small model of costs
that the peer client uses now and a run-time controller can share.

    cache: the expert is resident: computed here, nothing to wait for
    disk:  read expert_bytes at the measured disk bandwidth, then computed here
    peer:  the hidden rows there and the outputs back (round trip and transfer at the link's
           measured bandwidth), plus the peer's measured service time per row for the rows
           this client has queued there ahead of these and these (a prompt's requests carry
           up to max_rows rows, a decode step's one or two)

Computing an expert here and there costs about the same (the same kernels on similar
cores), so it is left out of both sides; a remote call also overlaps the resident experts'
compute here, which makes this choice conservative."""
from __future__ import annotations

from dataclasses import dataclass

# Before anything was read: a cold O_DIRECT read of 1-4 MiB on the project's machines
# (../shared/MACHINE.md); replaced by the cache's own measurement after the first reads.
PRIOR_DISK_BPS = 1.0e9


@dataclass
class LinkCost:
    rtt_s: float            # measured round trip of an empty call
    bandwidth_bps: float    # measured bytes/s on the link
    service_s: float        # measured time the peer took per row beyond the round trip and transfer
    queued: int = 0         # this client's rows at it not answered yet


def transfer_bytes(rows: int, hidden: int) -> int:
    """A call's bytes both ways: fp32 rows out and back, an int64 expert index per row."""
    return rows * (2 * hidden * 4 + 8)


def peer_seconds(link: LinkCost, rows: int, hidden: int) -> float:
    return link.rtt_s + transfer_bytes(rows, hidden) / link.bandwidth_bps + link.service_s * (rows + link.queued)


def disk_seconds(expert_bytes: int, disk_bps: float) -> float:
    return expert_bytes / disk_bps


def disk_bandwidth(cache_stats: dict) -> float:
    """Bytes/s the cache's reads achieved (per IO thread), or the prior before any read."""
    if cache_stats.get("read_seconds", 0) > 0 and cache_stats.get("bytes_read", 0) > 0:
        return cache_stats["bytes_read"] / cache_stats["read_seconds"]
    return PRIOR_DISK_BPS


def choose(resident: bool, expert_bytes: int, disk_bps: float, links: dict[str, LinkCost], rows: int,
           hidden: int) -> str:
    """'cache', 'disk', or the name of the peer whose call is cheapest, if it beats the disk."""
    if resident:
        return "cache"
    best, best_s = "disk", disk_seconds(expert_bytes, disk_bps)
    for name, link in links.items():
        s = peer_seconds(link, rows, hidden)
        if s < best_s:
            best, best_s = name, s
    return best
