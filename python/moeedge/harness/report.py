"""Tables and plots of the harness's records: tokens/s by limit and engine, each against
the physical bound and against llama.cpp measured in the same matrix."""
from __future__ import annotations

import json
from pathlib import Path

from moeedge.units import format_bytes


def load_records(results: Path, commit: str | None = None) -> list[dict]:
    """Every record under results/runs (of one commit if given); the latest per run."""
    latest: dict[tuple, dict] = {}
    for path in sorted((results / "runs").rglob("*.json")):
        r = json.loads(path.read_text())
        if commit is not None and not r.get("commit", "").startswith(commit):
            continue
        key = (r["model"], r["engine"], r["precision"], r["limit_label"], r.get("prefill_cell"))
        if key not in latest or r.get("finished_at", "") > latest[key].get("finished_at", ""):
            latest[key] = r
    return sorted(latest.values(), key=lambda r: (r["model"], r["precision"], -(r["limit_bytes"] or 1 << 62),
                                                  r["engine"]))


def _limit(r: dict) -> str:
    return "unlimited" if r["limit_bytes"] is None else f"{format_bytes(r['limit_bytes'])} ({r['limit_label']})"


def table(records: list[dict]) -> str:
    """Markdown: one row per run; `x llama.cpp` compares with the faster llama.cpp engine (as it
    loads by default, or with repacking off) at the same model, precision and limit. Prefill cells (a long prompt in its own run) follow in a table of their own."""
    prefill = [r for r in records if r.get("prefill_cell")]
    records = [r for r in records if not r.get("prefill_cell")]
    llama = _best_llama(records, "decode_tok_s", lambda r: (r["model"], r["precision"], r["limit_label"]))
    rows = ["| model | precision | limit | engine | decode tok/s | x llama.cpp | steady tok/s | bound tok/s "
            "| of bound | read MB/token (Belady's) | policy | IO | occupancy | p99 ms | peak | OOM kills |",
            "|" + "---|" * 16]
    for r in records:
        tok_s = r.get("decode_tok_s")
        ref = llama.get((r["model"], r["precision"], r["limit_label"]))
        ratio = f"{tok_s / ref:.2f}x" if tok_s and ref and not r["engine"].startswith("llama.cpp") else "-"
        bound = r.get("bound_tok_s")
        rows.append(" | ".join([
            f"| {r['model']}", r["precision"], _limit(r), r["engine"],
            f"{tok_s:.2f}" if tok_s else _failure(r),
            ratio, f"{r['steady_tok_s']:.2f}" if r.get("steady_tok_s") else "-", f"{bound:.2f}" if bound else "-",
            f"{r['fraction_of_bound']:.2f}" if r.get("fraction_of_bound") else "-",
            _per_token(r), *(_ratio(r.get(k)) for k in ("policy_ratio", "io_ratio", "occupancy")),
            f"{r['p99_ms']:.0f}" if r.get("p99_ms") else "-",
            format_bytes(r["peak_bytes"]), f"{r['oom_kills']} |"]))
    return "\n".join(rows) + (f"\n\n{prefill_table(prefill)}" if prefill else "")


def prefill_table(records: list[dict]) -> str:
    """Markdown: prefill tokens/s of each prefill cell, against llama.cpp's on the same prompt."""
    llama = _best_llama(records, "prefill_tok_s",
                        lambda r: (r["model"], r["precision"], r["limit_label"], r["prefill_cell"]))
    rows = ["| model | precision | limit | engine | prompt tokens | prefill tok/s | x llama.cpp | peak | OOM kills |",
            "|" + "---|" * 9]
    for r in records:
        tok_s = r.get("prefill_tok_s")
        ref = llama.get((r["model"], r["precision"], r["limit_label"], r["prefill_cell"]))
        ratio = f"{tok_s / ref:.2f}x" if tok_s and ref and not r["engine"].startswith("llama.cpp") else "-"
        rows.append(" | ".join([f"| {r['model']}", r["precision"], _limit(r), r["engine"], str(r["prefill_cell"]),
                                f"{tok_s:.1f}" if tok_s else _failure(r), ratio, format_bytes(r["peak_bytes"]),
                                f"{r['oom_kills']} |"]))
    return "\n".join(rows)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _per_token(r: dict) -> str:
    """Storage bytes the engine read per decode token, and Belady's for the same cache size."""
    engine, belady = r.get("read_bytes_per_token"), r.get("belady_bytes_per_token")
    if engine is None and belady is None:
        return "-"
    mb = (lambda v: "-" if v is None else f"{v / 1e6:.1f}")
    return f"{mb(engine)} ({mb(belady)})"


def _best_llama(records: list[dict], key: str, cell) -> dict:
    """cell -> the highest `key` among the llama.cpp engines' records of that cell."""
    best: dict = {}
    for r in records:
        if r["engine"].startswith("llama.cpp") and r.get(key):
            best[cell(r)] = max(best.get(cell(r), 0.0), r[key])
    return best


def _failure(r: dict) -> str:
    error = r.get("error") or ""
    if "smallest workable budget" in error:
        return "refused: below its minimum"
    if r["oom_kills"]:
        return "OOM-killed"
    return error.split(":")[0] or "failed"


def plot(records: list[dict], out: Path) -> list[Path]:
    """Per model: tokens/s against the limit, a line per engine and precision, the bound
    dashed; and moeedge's mean per-token time split into waiting for experts and the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in sorted({r["model"] for r in records if not r.get("prefill_cell")}):
        rs = [r for r in records if r["model"] == model and not r.get("prefill_cell")]
        unlimited_x = 1.25 * max([r["limit_bytes"] for r in rs if r["limit_bytes"]] or [1 << 30]) / 2 ** 20
        x_of = lambda r: r["limit_bytes"] / 2 ** 20 if r["limit_bytes"] else unlimited_x  # noqa: E731
        fig, (speed, split) = plt.subplots(1, 2, figsize=(12, 4.5))
        for engine, precision in sorted({(r["engine"], r["precision"]) for r in rs}):
            line = sorted((x_of(r), r.get("decode_tok_s") or 0.0) for r in rs
                          if r["engine"] == engine and r["precision"] == precision)
            speed.plot(*zip(*line), marker="o", label=f"{engine} {precision}")
        for precision in sorted({r["precision"] for r in rs}):
            bound = sorted((x_of(r), r["bound_tok_s"]) for r in rs
                           if r["precision"] == precision and r["engine"] == "moeedge" and r.get("bound_tok_s"))
            if bound:
                speed.plot(*zip(*bound), linestyle="--", color="black", alpha=0.5, label=f"bound {precision}")
        speed.set_xlabel("memory limit, MiB (rightmost: unlimited)")
        speed.set_ylabel("decode tokens/s (median)")
        speed.set_yscale("log")
        speed.set_title(f"{model}: tokens/s under a cgroup memory limit")
        speed.legend(fontsize=7)
        ours = [r for r in rs if r["engine"].startswith("moeedge") and r["result"].get("token_wait_s")]
        labels = [f"{r['engine'].removeprefix('moeedge')[1:] or 'lru'}\n{r['precision']} {r['limit_label']}"
                  for r in ours]
        wait = [1000 * sum(r["result"]["token_wait_s"]) / len(r["result"]["token_wait_s"]) for r in ours]
        rest = [1000 * sum(r["result"]["token_other_s"]) / len(r["result"]["token_other_s"]) for r in ours]
        split.bar(range(len(ours)), rest, label="compute and the rest")
        split.bar(range(len(ours)), wait, bottom=rest, label="waiting for experts")
        split.set_xticks(range(len(ours)), labels, fontsize=6, rotation=60)
        split.set_ylabel("mean ms per token")
        split.set_title("moeedge: where a token's time goes")
        split.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
