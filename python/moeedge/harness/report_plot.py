"""The harness's plots, drawn from data a test can read: per model, tokens/s against the
memory limit, a series per engine and precision, each labelled by the engine's own name,
a colour per engine and a marker per precision; a bound line per precision, told apart
by its dash; the unlimited runs apart on the right, never joined to the limited ones."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# tab10 without its grey (kept for the bounds), then more; one per engine, by sorted name
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#393b79", "#637939", "#8c6d31")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BOUND_DASHES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
BOUND_COLOUR = "#555555"


@dataclass
class Series:
    label: str                 # the legend's text; "" for a series that shares another's entry
    xs: list[float]            # memory limit, MiB (unlimited: UNLIMITED_AT x the largest limit)
    ys: list[float]            # decode tokens/s
    colour: str
    marker: str | None
    linestyle: object          # "-", a dash, or "none" (points only)
    role: str                  # "measured", "unlimited" or "bound"


UNLIMITED_AT = 1.25


def _mib(r: dict) -> float:
    return r["limit_bytes"] / 2 ** 20


def unlimited_x(rs: list[dict]) -> float:
    return UNLIMITED_AT * max([_mib(r) for r in rs if r["limit_bytes"]] or [1024.0])


def speed_series(rs: list[dict]) -> list[Series]:
    """One model's records -> what the tokens/s panel draws."""
    engines = sorted({r["engine"] for r in rs})
    precisions = sorted({r["precision"] for r in rs})
    far = unlimited_x(rs)
    series = []
    for engine, precision in sorted({(r["engine"], r["precision"]) for r in rs}):
        mine = [r for r in rs if r["engine"] == engine and r["precision"] == precision]
        style = dict(colour=COLOURS[engines.index(engine) % len(COLOURS)],
                     marker=MARKERS[precisions.index(precision) % len(MARKERS)])
        limited = sorted((_mib(r), r.get("decode_tok_s") or 0.0) for r in mine if r["limit_bytes"])
        free = [r.get("decode_tok_s") or 0.0 for r in mine if not r["limit_bytes"]]
        label = f"{engine} {precision}"
        if limited:
            series.append(Series(label, [x for x, _ in limited], [y for _, y in limited], linestyle="-",
                                 role="measured", **style))
        if free:
            series.append(Series("" if limited else label, [far] * len(free), free, linestyle="none",
                                 role="unlimited", **style))
    for i, precision in enumerate(precisions):
        bound = sorted((_mib(r) if r["limit_bytes"] else far, r["bound_tok_s"]) for r in rs
                       if r["precision"] == precision and r["engine"] == "moeedge" and r.get("bound_tok_s"))
        limited = [(x, y) for x, y in bound if x != far]
        if bound:
            series.append(Series(f"bound {precision}", [x for x, _ in limited] or [far],
                                 [y for _, y in limited] or [bound[-1][1]], BOUND_COLOUR, None if limited else "_",
                                 BOUND_DASHES[i % len(BOUND_DASHES)], "bound"))
    return series


def split_bars(rs: list[dict]) -> list[tuple[str, float, float]]:
    """moeedge's runs -> (label, mean ms per token waiting for experts, the rest)."""
    bars = []
    for r in rs:
        if r["engine"].startswith("moeedge") and r["result"].get("token_wait_s"):
            wait, other = r["result"]["token_wait_s"], r["result"]["token_other_s"]
            bars.append((f"{r['engine']}\n{r['precision']} {r['limit_label']}", 1000 * sum(wait) / len(wait),
                         1000 * sum(other) / len(other)))
    return bars


def plot(records: list[dict], out: Path) -> list[Path]:
    """A PNG per model: the tokens/s panel (speed_series) and where a token's time goes (split_bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    records = [r for r in records if not r.get("prefill_cell")]  # a long prompt's run: the report's own table
    for model in sorted({r["model"] for r in records}):
        rs = [r for r in records if r["model"] == model]
        fig, (speed, split) = plt.subplots(1, 2, figsize=(12, 4.5))
        for s in speed_series(rs):
            speed.plot(s.xs, s.ys, color=s.colour, marker=s.marker, linestyle=s.linestyle, label=s.label or None,
                       alpha=0.6 if s.role == "bound" else 1.0)
        if any(not r["limit_bytes"] for r in rs):
            far = unlimited_x(rs)
            speed.axvline(far / (UNLIMITED_AT ** 0.5), color="#bbbbbb", linewidth=0.8)
            speed.annotate("unlimited", (far, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                           textcoords="offset points", ha="center", fontsize=7)
        speed.set_xlabel("memory limit, MiB")
        speed.set_ylabel("decode tokens/s (median)")
        speed.set_yscale("log")
        speed.set_title(f"{model}: tokens/s under a cgroup memory limit")
        speed.legend(fontsize=7)
        bars = split_bars(rs)
        rest = [b[2] for b in bars]
        split.bar(range(len(bars)), rest, label="compute and the rest")
        split.bar(range(len(bars)), [b[1] for b in bars], bottom=rest, label="waiting for experts")
        split.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=6, rotation=60)
        split.set_ylabel("mean ms per token")
        split.set_title("moeedge: where a token's time goes")
        split.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
