"""The table and plot of a replayed trace (bench/peers_trace.py), from its JSON:

    .venv/bin/python bench/peers_trace_report.py [bench/results/peers_trace.json] [--plot PNG]

Each token is matched to the link rate and round trip in force when it came out. Tokens
(after each sequence's first, which closes a prompt) are grouped by that rate: tokens/s and
what the client did with the experts it did not hold (sent to the peer, or read from disk),
and the same grouped by the client's own estimate of the bandwidth. The crossover the cost
model implies is computed from the client's median measurements; how closely the client's
choices follow the trace is the correlation, over 10 s windows, of the share sent with the
log of the rate."""
from __future__ import annotations

import argparse
import bisect
import json
import math
import statistics
from pathlib import Path

BINS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, math.inf]  # Mbit/s
WINDOW_S = 10.0
ROLLING = 10


def per_token(results: dict) -> list[dict]:
    """The traced run's decode tokens, each with the rate and round trip in force."""
    changes = sorted(results["changes"], key=lambda c: c["t"])
    times = [c["t"] for c in changes]
    out = []
    for r in results["traced"]["tokens"]:
        i = bisect.bisect_right(times, r["t"]) - 1
        if r["first"] or i < 0:
            continue
        out.append({**r, "rate_mbit": changes[i]["rate_mbit"], "rtt_ms": changes[i]["rtt_ms"],
                    "est_mbit": r["link"]["bandwidth_bps"] * 8 / 1e6, "elapsed": r["t"] - changes[0]["t"]})
    return out


def binned(tokens: list[dict], key: str) -> list[dict]:
    rows = []
    for lo, hi in zip(BINS, BINS[1:]):
        group = [t for t in tokens if lo <= t[key] < hi]
        if not group:
            continue
        sent, here = sum(t["sent"] for t in group), sum(t["read_here"] for t in group)
        rows.append({"from": lo, "to": hi, "tokens": len(group), "tok_s": 1 / statistics.median(t["s"] for t in group),
                     "sent": sent, "read_here": here, "share_sent": sent / max(1, sent + here),
                     "failed": sum(t["computed_here_after_failure"] for t in group),
                     "est_mbit": statistics.median(t["est_mbit"] for t in group),
                     "rtt_ms": statistics.median(t["rtt_ms"] for t in group)})
    return rows


def crossover_mbit(tokens: list[dict], results: dict) -> float | None:
    """The bandwidth below which the cost model reads from disk, at the median measured round
    trip, service time, disk bandwidth and compute here of one row (runs before it was
    measured: none; None: the round trip alone is dearer than a read)."""
    from moeedge.peers.cost import transfer_bytes

    links = [t["link"] for t in tokens]
    rtt, service = (statistics.median(x[k] for x in links) for k in ("rtt_s", "service_s"))
    disk_s = results["expert_bytes"] / statistics.median(x["disk_bps"] for x in links)
    local = [x["local_s"] for x in links if x.get("local_s") is not None]
    room = disk_s + (statistics.median(local) if local else 0.0) - rtt - service
    return transfer_bytes(1, results["hidden"]) / room * 8 / 1e6 if room > 0 else None


def following(tokens: list[dict]) -> float | None:
    """Pearson's r, over WINDOW_S windows, of the share of missing experts sent with log(rate)."""
    windows: dict[int, list[dict]] = {}
    for t in tokens:
        windows.setdefault(int(t["elapsed"] // WINDOW_S), []).append(t)
    xs, ys = [], []
    for group in windows.values():
        sent, here = sum(t["sent"] for t in group), sum(t["read_here"] for t in group)
        if sent + here:
            xs.append(statistics.mean(math.log(t["rate_mbit"]) for t in group))
            ys.append(sent / (sent + here))
    if len(xs) < 3 or len(set(ys)) < 2 or len(set(xs)) < 2:
        return None
    return statistics.correlation(xs, ys)


def table(rows: list[dict], what: str) -> str:
    lines = [f"| {what} (Mbit/s) | tokens | tok/s (median) | experts sent / read here | share sent | "
             "calls failed | client's estimate (Mbit/s) | round trip (ms) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        span = f"{r['from']:g}-{r['to']:g}" if r["to"] != math.inf else f">= {r['from']:g}"
        lines.append(f"| {span} | {r['tokens']} | {r['tok_s']:.2f} | {r['sent']} / {r['read_here']} | "
                     f"{r['share_sent']:.2f} | {r['failed']} | {r['est_mbit']:.3g} | {r['rtt_ms']:.0f} |")
    return "\n".join(lines)


def alone_tok_s(run: dict) -> float:
    return 1 / statistics.median(r["s"] for r in run["tokens"] if not r["first"])


def same_tokens(results: dict) -> bool:
    """The traced run's first sequence against the alone runs' (greedy: a common prefix)."""
    def first(run):
        return [r["token"] for r in run["tokens"] if r["sequence"] == 0]

    traced = first(results["traced"])
    return all(a[:len(traced)] == traced[:len(a)] for a in (first(results["alone_before"]),
                                                             first(results["alone_after"])))


def plot(tokens: list[dict], results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    changes = results["changes"]
    t0 = changes[0]["t"]
    fig, ax = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax[0].step([c["t"] - t0 for c in changes], [c["rate_mbit"] for c in changes], where="post", label="link rate (tbf)")
    ax[0].plot([t["elapsed"] for t in tokens], [t["est_mbit"] for t in tokens], ".", ms=3, label="client's estimate")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("Mbit/s")
    twin = ax[0].twinx()
    twin.plot([c["t"] - t0 for c in changes], [c["rtt_ms"] for c in changes], color="grey", lw=0.6)
    twin.set_ylabel("round trip added (ms)", color="grey")
    ax[0].legend(loc="upper left", fontsize=8)
    ax[1].plot([t["elapsed"] for t in tokens], [1 / t["s"] for t in tokens], ".", ms=3, label="with the peer")
    for name, style in (("alone_before", "--"), ("alone_after", ":")):
        ax[1].axhline(alone_tok_s(results[name]), ls=style, color="k", lw=0.8, label=name.replace("_", " ") + " (median)")
    ax[1].set_ylabel("tokens/s")
    ax[1].legend(loc="upper left", fontsize=8)
    share = []  # over the last ROLLING tokens: one token misses a handful of experts
    for i in range(len(tokens)):
        group = tokens[max(0, i - ROLLING + 1):i + 1]
        sent, here = sum(t["sent"] for t in group), sum(t["read_here"] for t in group)
        if sent + here:
            share.append((tokens[i]["elapsed"], sent / (sent + here)))
    ax[2].plot([x for x, _ in share], [y for _, y in share], lw=1)
    ax[2].set_ylim(-0.05, 1.05)
    ax[2].set_ylabel(f"missing experts sent\n(last {ROLLING} tokens)")
    ax[2].set_xlabel("seconds into the replay")
    fig.suptitle(f"{Path(results['model']).name}: {results['network']} x{results['scale']:g} from second "
                 f"{results['start']}, round trips {results['rtt']} (5Gophers)", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def report(results: dict, png: Path | None) -> None:
    tokens = per_token(results)
    print(table(binned(tokens, "rate_mbit"), "link rate in force"))
    print()
    print(table(binned(tokens, "est_mbit"), "client's estimate"))
    cross, r = crossover_mbit(tokens, results), following(tokens)
    print(f"\nalone: {alone_tok_s(results['alone_before']):.2f} tok/s before, {alone_tok_s(results['alone_after']):.2f} "
          f"after; with the peer: {1 / statistics.median(t['s'] for t in tokens):.2f} tok/s over the replay")
    print("cost model's crossover at the median measurements: "
          + (f"{cross:.3g} Mbit/s" if cross else "none (the round trip alone costs more than a read)"))
    print("share sent against log(rate), 10 s windows: r = " + (f"{r:.2f}" if r is not None else "n/a"))
    print(f"tokens equal to the runs alone: {same_tokens(results)}")
    if png is not None:
        plot(tokens, results, png)
        print(f"wrote {png}")


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", default=str(here / "results" / "peers_trace.json"))
    p.add_argument("--plot", default=str(here / "results" / "plots" / "peers_trace.png"))
    args = p.parse_args()
    report(json.loads(Path(args.json).read_text()), Path(args.plot))


if __name__ == "__main__":
    main()
