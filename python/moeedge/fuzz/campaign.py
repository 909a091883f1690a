"""A fuzz campaign: seeds built, the fork server warmed, inputs generated and run
(jobs children at a time, each in its own memory cgroup), outcomes tallied per class,
the inputs of bad outcomes written out for reproduction."""
from __future__ import annotations

import gc
import importlib
import json
import os
import re
import secrets
import select
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeedge.fuzz import inputs as I
from moeedge.fuzz.classes import CLASS_NAMES, generate
from moeedge.fuzz.forkserver import Child, ChildResult, run_child
from moeedge.fuzz.limits import MemoryLimit, memory_limit
from moeedge.fuzz.outcomes import BAD, ESCAPE, OUTCOMES, SUCCESS
from moeedge.fuzz.seeds import Seeds, build_seeds
from moeedge.fuzz.targets import CANARY_ENV, ESCAPE_MARKER, Settings, make_target

# Modules a child may import on first use that the fork server imports ahead, so that
# each child does not (a child's imports are lost with it).
# Inputs written out per distinct failure (class, outcome, exception, where): the rest
# are in the --json records and come back with --replay CLASS:INDEX.
SAVED_PER_FAILURE = 5
PRELOAD_PREFIXES = ("moeedge", "transformers", "tokenizers", "sentencepiece", "jinja2", "safetensors", "gguf",
                    "torch", "numpy", "huggingface_hub")


@dataclass
class Config:
    seed: int = 0
    count: int = 300
    classes: tuple[str, ...] = CLASS_NAMES
    timeout: float = 30.0
    memory_mib: int = 768
    jobs: int = 1
    reference: bool = True
    failures: Path | None = Path("fuzz-failures")
    replay: tuple[tuple[str, int], ...] = ()  # (class, index): just these inputs


@dataclass
class Record:
    name: str
    cls: str
    index: int
    seed: str
    target: str
    description: str
    outcome: str
    detail: str
    seconds: float
    exception: str = ""
    message: str = ""
    where: str = ""
    raised_at: str = ""


@dataclass
class Summary:
    config: dict
    limit: str                 # "cgroup v1", "cgroup v2" or "RLIMIT_AS"
    limit_note: str | None     # why not a cgroup
    seconds: float
    inputs_per_second: float
    table: dict[str, dict[str, int]]
    records: list[Record] = field(default_factory=list)

    @property
    def bad(self) -> list[Record]:
        return [r for r in self.records if r.outcome in BAD]

    def distinct_failures(self) -> list[dict]:
        """Bad records grouped by what went wrong and where: one fix each, roughly."""
        groups: dict[tuple, list[Record]] = {}
        for r in self.bad:
            groups.setdefault(failure_key(r), []).append(r)
        return [{"class": k[0], "outcome": k[1], "exception": k[2], "where": k[3], "count": len(v),
                 "examples": [r.name for r in v[:5]], "description": v[0].description, "detail": v[0].detail,
                 "message": v[0].message} for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        """A summary read back from --json (distinct_failures recomputed from the records)."""
        return cls(d["config"], d["limit"], d["limit_note"], d["seconds"], d["inputs_per_second"], d["table"],
                   [Record(**r) for r in d["records"]])

    def as_dict(self) -> dict:
        return {"config": self.config, "limit": self.limit, "limit_note": self.limit_note, "seconds": self.seconds,
                "inputs_per_second": self.inputs_per_second, "table": self.table,
                "distinct_failures": self.distinct_failures(), "records": [asdict(r) for r in self.records]}


def failure_key(r: Record) -> tuple[str, str, str, str]:
    """What tells two failures apart: class, outcome, exception and where it was raised;
    without an exception (a hang, a signal, wrong logits, an escape), what was mutated and
    what happened, numbers left out."""
    if r.exception:
        return r.cls, r.outcome, r.exception, r.where or r.raised_at
    # a template's payloads vary endlessly; what they did is one of a few things (one fix each)
    what = "chat template" if r.cls == "template" else re.split(r" = | -> |: type| nested | repeated |; ",
                                                                 r.description)[0]
    happened = re.split(r" \(|, then|; ", r.detail)[0]
    return r.cls, r.outcome, "", re.sub(r"\d+", "N", f"{what} | {happened}")[:160]


def _child_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _with_canary(target):
    def run(report):
        os.environ[CANARY_ENV] = secrets.token_hex(16)  # a secret only an escaped template could print
        return target(report)

    return run


def _with_module_report(target):
    def run(report):
        before = set(sys.modules)
        result = target(report)
        return {**result, "modules": sorted(set(sys.modules) - before)}

    return run


def warm_up(seeds: Seeds, settings: Settings, limit: MemoryLimit, workdir: Path, timeout: float) -> None:
    """Run each target once on an unchanged seed: every one must succeed (else the harness
    is broken), and what the children imported, the fork server imports."""
    cases = [("mixtral", "load"), ("qwen2_moe", "chat"), ("switch", "load"), ("mixtral-q8_0", "load"),
             ("mixtral-f32", "chat"), ("olmoe", "cli-run"), ("mixtral", "cli-info")]
    for seed, target in cases:
        inp = I.FuzzInput("warm-up", 0, seed, "the seed unchanged", target)
        scratch = Path(tempfile.mkdtemp(prefix="warm-", dir=workdir))
        try:
            path = I.materialize(inp, seeds, scratch)
            result = run_child(_with_module_report(_with_canary(make_target(target, str(path), settings))),
                               max(timeout, 120), limit, str(scratch / "child-output.txt"), str(scratch))
            compared = target != "load" or not settings.reference or "equal to the reference" in result.detail
            if result.outcome != SUCCESS or not compared:
                out = (scratch / "child-output.txt").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the unchanged seed {seed} under target {target} ended in {result.outcome}: "
                                   f"{result.detail} {result.final}\n{out}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for name in result.final.get("modules", []):
            if name.split(".")[0] in PRELOAD_PREFIXES and name not in sys.modules:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 -- a module that only imports in context: the child will
                    pass


def save_failure(inp: I.FuzzInput, record: Record, seeds: Seeds, scratch: Path, failures: Path, seed: int) -> Path:
    dest = failures / f"{inp.name}-{record.outcome.replace(' ', '-')}"
    shutil.rmtree(dest, ignore_errors=True)
    I.materialize(inp, seeds, dest)
    output = scratch / "child-output.txt"
    if output.is_file():
        shutil.copyfile(output, dest / "child-output.txt")
    info = {**asdict(record), "reproduce": f"python -m moeedge.fuzz --seed {seed} --replay {inp.cls}:{inp.index}"}
    (dest / "input.json").write_text(json.dumps(info, indent=2) + "\n")
    return dest


def _inputs(config: Config, seeds: Seeds):
    if config.replay:
        for cls, index in config.replay:
            yield generate(cls, config.seed, index, seeds)
        return
    for k in range(config.count):
        cls = config.classes[k % len(config.classes)]
        yield generate(cls, config.seed, k // len(config.classes), seeds)


def run_campaign(config: Config, progress=None) -> Summary:
    _child_env()
    seeds = build_seeds()
    limit_bytes = config.memory_mib << 20
    limits, note = [], None
    for _ in range(max(1, config.jobs)):
        lim, note = memory_limit(limit_bytes)
        limits.append(lim)
    settings = Settings(budget_bytes=limit_bytes // 2, reference=config.reference)
    workdir = Path(tempfile.mkdtemp(prefix="moeedge-fuzz-"))
    records: list[Record] = []
    try:
        warm_up(seeds, settings, limits[0], workdir, config.timeout)
        gc.freeze()  # the fork server's objects: children touching their GC headers would copy every page
        saved: Counter = Counter()
        start = time.monotonic()
        free = list(limits)
        running: dict[Child, tuple[I.FuzzInput, Path, MemoryLimit]] = {}
        pending = _inputs(config, seeds)
        exhausted = False
        while running or not exhausted:
            while free and not exhausted:
                inp = next(pending, None)
                if inp is None:
                    exhausted = True
                    break
                scratch = workdir / inp.name
                path = I.materialize(inp, seeds, scratch)
                lim = free.pop()
                target = _with_canary(make_target(inp.target, str(path), settings))
                child = Child(target, config.timeout, lim, str(scratch / "child-output.txt"), str(scratch))
                running[child] = (inp, scratch, lim)
            _poll(running)
            for child in [c for c in running if c.finished()]:
                inp, scratch, lim = running.pop(child)
                free.append(lim)
                record = _record(inp, child.result(), scratch)
                records.append(record)
                if record.outcome in BAD and config.failures is not None:
                    signature = failure_key(record)
                    saved[signature] += 1
                    if saved[signature] <= SAVED_PER_FAILURE:
                        save_failure(inp, record, seeds, scratch, config.failures, config.seed)
                shutil.rmtree(scratch, ignore_errors=True)
                if progress:
                    progress(record, len(records))
        seconds = time.monotonic() - start
    finally:
        for lim in limits:
            lim.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return Summary(config={**asdict(config), "failures": str(config.failures), "classes": list(config.classes)},
                   limit=limits[0].kind, limit_note=note, seconds=seconds,
                   inputs_per_second=len(records) / seconds if seconds else 0.0, table=tabulate(records),
                   records=records)


def _poll(running: dict) -> None:
    readable = [c for c in running if not c.eof]
    if readable:
        ready, _, _ = select.select(readable, [], [], 0.02)
        for child in ready:
            child.read()
    else:
        time.sleep(0.001)


def _record(inp: I.FuzzInput, result: ChildResult, scratch: Path) -> Record:
    f = result.final
    outcome, detail = result.outcome, result.detail
    if outcome != ESCAPE and (scratch / ESCAPE_MARKER).exists():  # it ran a command, then died or hung
        outcome, detail = ESCAPE, f"the input ran a command ({ESCAPE_MARKER} was written), then: {outcome}, {detail}"
    return Record(inp.name, inp.cls, inp.index, inp.seed, inp.target, inp.description, outcome, detail,
                  round(result.seconds, 3), f.get("exception", ""), f.get("message", ""), f.get("where", ""),
                  f.get("raised_at", ""))


def tabulate(records: list[Record]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = {}
    for r in sorted(records, key=lambda r: CLASS_NAMES.index(r.cls)):
        table.setdefault(r.cls, Counter())[r.outcome] += 1
    return {cls: {"tried": sum(c.values()), **{o: c.get(o, 0) for o in OUTCOMES}} for cls, c in table.items()}


def format_table(summary: Summary) -> str:
    columns = ("tried",) + OUTCOMES
    width = max([len("class"), len("total")] + [len(c) for c in summary.table])
    lines = ["  ".join([f"{'class':<{width}}"] + [f"{c:>{max(5, len(c))}}" for c in columns])]
    totals = Counter()
    for cls, row in summary.table.items():
        totals.update(row)
        lines.append("  ".join([f"{cls:<{width}}"] + [f"{row[c]:>{max(5, len(c))}}" for c in columns]))
    lines.append("  ".join([f"{'total':<{width}}"] + [f"{totals[c]:>{max(5, len(c))}}" for c in columns]))
    return "\n".join(lines)
