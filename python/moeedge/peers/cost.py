"""What fetching an expert's output costs, by where it comes from: one small model of costs
that the peer client uses now and a run-time controller can share.

    cache: the expert is resident: computed here, nothing to wait for
    disk:  read expert_bytes at the measured disk bandwidth, then computed here for these rows
           (this device's measured compute: LocalCompute)
    peer:  the hidden rows there and the outputs back (round trip and transfer at the link's
           measured bandwidth), plus the peer's measured service time per row (its compute,
           and whatever else the call took beyond round trip and transfer) for the rows this
           client has queued there ahead of these and these (a prompt's requests carry up to
           max_rows rows, a decode step's one or two)

Each side is charged its own compute: the peer's inside its service time, this device's as
timed on the experts it computed (a fixed part per call and a part per row). Before this
device has timed any expert (its first dispatch comes before its first expert compute), its
compute is taken as the cheapest candidate peer's service time per row: the same kernels on
the same bytes, so the two computes cancel, as in a model without either. A remote call
also overlaps the resident experts' compute here, which makes this choice conservative."""
from __future__ import annotations

from dataclasses import dataclass

# Before anything was read: a cold O_DIRECT read of 1-4 MiB on the project's machines
# (../shared/MACHINE.md); replaced by the cache's own measurement after the first reads.
PRIOR_DISK_BPS = 1.0e9
SMOOTH = 0.2  # weight of each new local timing (as of each call's in a peer's service time)
# Timed row counts spread less than this (a decode's one row every time) do not tell a fixed
# part from a per-row part: then all of it is charged per row, as a peer's service time is.
MIN_SPREAD_ROWS = 1.0


@dataclass
class LinkCost:
    rtt_s: float            # measured round trip of an empty call
    bandwidth_bps: float    # measured bytes/s on the link
    service_s: float        # measured time the peer took per row beyond the round trip and transfer
    queued: int = 0         # this client's rows at it not answered yet


class LocalCompute:
    """This device's time to compute one expert for n rows, per_call + per_row * n: the
    least-squares line through exponentially weighted moments of the timed (rows, seconds),
    each new timing weighing SMOOTH (the first: all)."""

    def __init__(self):
        self.timed = 0
        self.moments = (0.0, 0.0, 0.0, 0.0)  # weighted means of n, t, n*n, n*t

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not seconds >= 0:
            raise ValueError(f"a local compute of {rows} rows in {seconds} s")
        w = 1.0 if self.timed == 0 else SMOOTH
        sample = (rows, seconds, rows * rows, rows * seconds)
        self.moments = tuple(m + w * (s - m) for m, s in zip(self.moments, sample))
        self.timed += 1

    def parts(self) -> tuple[float, float] | None:
        """(seconds per call, seconds per row), None before any timing."""
        if not self.timed:
            return None
        n, t, nn, nt = self.moments
        spread = nn - n * n
        if spread >= MIN_SPREAD_ROWS ** 2:
            per_row = (nt - n * t) / spread
            per_call = t - per_row * n
            if per_row >= 0 and per_call >= 0:
                return per_call, per_row
        return 0.0, t / n  # no spread, or a line through noise that goes below zero

    def seconds(self, rows: int) -> float | None:
        parts = self.parts()
        return None if parts is None else parts[0] + parts[1] * rows


def transfer_bytes(rows: int, hidden: int) -> int:
    """A call's bytes both ways: fp32 rows out and back, an int64 expert index per row."""
    return rows * (2 * hidden * 4 + 8)


def peer_seconds(link: LinkCost, rows: int, hidden: int) -> float:
    return link.rtt_s + transfer_bytes(rows, hidden) / link.bandwidth_bps + link.service_s * (rows + link.queued)


def disk_seconds(expert_bytes: int, disk_bps: float) -> float:
    return expert_bytes / disk_bps


def local_seconds(local: LocalCompute | None, links: dict[str, LinkCost], rows: int) -> float:
    """Computing the expert here for rows rows: as timed here, or before any timing the
    cheapest candidate peer's service time for them (see the module's docstring)."""
    measured = None if local is None else local.seconds(rows)
    if measured is not None:
        return measured
    return min((link.service_s for link in links.values()), default=0.0) * rows


def disk_bandwidth(cache_stats: dict) -> float:
    """Bytes/s the cache's reads achieved (per IO thread), or the prior before any read."""
    if cache_stats.get("read_seconds", 0) > 0 and cache_stats.get("bytes_read", 0) > 0:
        return cache_stats["bytes_read"] / cache_stats["read_seconds"]
    return PRIOR_DISK_BPS


def choose(resident: bool, expert_bytes: int, disk_bps: float, links: dict[str, LinkCost], rows: int,
           hidden: int, local: LocalCompute | None = None) -> str:
    """'cache', 'disk', or the name of the peer whose call is cheapest, if it beats reading
    the expert and computing it here."""
    if resident:
        return "cache"
    best, best_s = "disk", disk_seconds(expert_bytes, disk_bps) + local_seconds(local, links, rows)
    for name, link in links.items():
        s = peer_seconds(link, rows, hidden)
        if s < best_s:
            best, best_s = name, s
    return best
