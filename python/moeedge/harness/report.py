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
        key = (r["model"], r["engine"], r["precision"], r["limit_label"])
        if key not in latest or r.get("finished_at", "") > latest[key].get("finished_at", ""):
            latest[key] = r
    return sorted(latest.values(), key=lambda r: (r["model"], r["precision"], -(r["limit_bytes"] or 1 << 62),
                                                  r["engine"]))


def _limit(r: dict) -> str:
    return "unlimited" if r["limit_bytes"] is None else f"{format_bytes(r['limit_bytes'])} ({r['limit_label']})"


def table(records: list[dict]) -> str:
    """Markdown: one row per run; `x llama.cpp` compares with llama.cpp at the same model,
    precision and limit."""
    llama = {(r["model"], r["precision"], r["limit_label"]): r.get("decode_tok_s") for r in records
             if r["engine"] == "llama.cpp"}
    rows = ["| model | precision | limit | engine | decode tok/s | x llama.cpp | steady tok/s | bound tok/s "
            "| of bound | p99 ms | peak | OOM kills |", "|" + "---|" * 12]
    for r in records:
        tok_s = r.get("decode_tok_s")
        ref = llama.get((r["model"], r["precision"], r["limit_label"]))
        ratio = f"{tok_s / ref:.2f}x" if tok_s and ref and r["engine"] != "llama.cpp" else "-"
        bound = r.get("bound_tok_s")
        rows.append(" | ".join([
            f"| {r['model']}", r["precision"], _limit(r), r["engine"],
            f"{tok_s:.2f}" if tok_s else _failure(r),
            ratio, f"{r['steady_tok_s']:.2f}" if r.get("steady_tok_s") else "-", f"{bound:.2f}" if bound else "-",
            f"{r['fraction_of_bound']:.2f}" if r.get("fraction_of_bound") else "-",
            f"{r['p99_ms']:.0f}" if r.get("p99_ms") else "-",
            format_bytes(r["peak_bytes"]), f"{r['oom_kills']} |"]))
    return "\n".join(rows)


def _failure(r: dict) -> str:
    error = r.get("error") or ""
    if "smallest workable budget" in error:
        return "refused: below its minimum"
    if r["oom_kills"]:
        return "OOM-killed"
    return error.split(":")[0] or "failed"
