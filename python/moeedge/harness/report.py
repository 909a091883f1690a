"""Tables and plots of the harness's records: tokens/s by limit and engine, each against
the physical bound and against llama.cpp measured in the same matrix."""
from __future__ import annotations

import json
from pathlib import Path

from moeedge.harness.report_plot import plot  # noqa: F401 (the report's plots)
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
