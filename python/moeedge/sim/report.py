"""What `moeedge sim` shows: a table, one JSON object, and a PNG of hit rate against capacity."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeedge.units import format_bytes


@dataclass
class PolicyReport:
    """One policy at the chosen capacity, its stall per token by prefetch mode, and its sweep."""

    policy: str
    hits: int
    accesses: int
    capacity: int
    per_layer: bool
    stall_s_per_token: dict[str, float] = field(default_factory=dict)
    sweep: list[tuple[int, float]] = field(default_factory=list)  # (capacity, hit rate)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict:
        out = {"hit_rate": self.hit_rate, "hits": self.hits, "accesses": self.accesses,
               "misses": self.accesses - self.hits, "capacity": self.capacity, "per_layer": self.per_layer}
        if self.stall_s_per_token:
            out["stall_s_per_token"] = dict(self.stall_s_per_token)
        if self.sweep:
            out["sweep"] = {"capacity": [c for c, _ in self.sweep], "hit_rate": [r for _, r in self.sweep]}
        return out


def default_capacities(top_k: int, most: int, points: int = 12) -> list[int]:
    """About `points` capacities spaced geometrically from top_k to `most` experts."""
    lo = max(1, min(top_k, most))
    return sorted({int(round(c)) for c in np.geomspace(lo, most, points)} | {lo, most})


def to_json(reports: list[PolicyReport]) -> dict:
    """One object mapping each policy name to its figures."""
    return {r.policy: r.as_dict() for r in reports}


def table(reports: list[PolicyReport], header: list[str]) -> str:
    lines = list(header)
    timed = any(r.stall_s_per_token for r in reports)
    head = f"{'policy':<8} {'hit rate':>8} {'hits':>10} {'misses':>10}"
    if timed:
        lines.append("stall ms per token: without prefetch, prefetching the true misses (oracle), "
                     "prefetching the previous token's experts")
        head += f" {'stall':>10} {'oracle':>10} {'prev-token':>10}"
    lines.append(head)
    for r in reports:
        line = f"{r.policy:<8} {r.hit_rate:8.3f} {r.hits:10d} {r.accesses - r.hits:10d}"
        if timed:
            line += "".join(f" {r.stall_s_per_token[m] * 1e3:10.2f}" for m in ("none", "oracle", "predicted"))
        lines.append(line)
    return "\n".join(lines)


def plot(reports: list[PolicyReport], path: str, title: str, per_layer: bool,
         expert_bytes: int | None = None) -> None:
    """Hit rate against capacity, one line per policy, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for r in reports:
            caps, rates = zip(*r.sweep)
            style = dict(color="black", linestyle="--") if r.policy == "belady" else {}
            ax.plot(caps, rates, marker="o", markersize=3, label=r.policy, **style)
        caps = [c for r in reports for c, _ in r.sweep]
        if max(caps) >= 8 * min(caps):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
        unit = "experts per layer" if per_layer else "experts, one cache for all layers"
        if expert_bytes:
            unit += f"; {format_bytes(expert_bytes)} each"
        ax.set_xlabel(f"capacity ({unit})")
        ax.set_ylabel("hit rate")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
