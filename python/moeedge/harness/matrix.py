"""The benchmark matrix: engine x model x precision x memory limit, from a TOML file.

Each run starts cold (model files evicted from the page cache, and the whole page cache
dropped where root may) in its own memory cgroup, limited to the run's limit, page cache
included (moeedge.cgroup). One JSON record per run lands under RESULTS/runs/ as soon as
it finishes; a rerun skips every run already recorded for the same commit and settings,
so a long matrix completes across sessions.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
import platform
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from moeedge.cgroup import CgroupUnavailable, drop_page_cache, evict_files, run_limited
from moeedge.read_throttle import ReadThrottle, disk_of
from moeedge.harness.engines import ENGINES, GGUF_ONLY, HF_ONLY, Run, command
from moeedge.harness.llama_build import check_native, describe
from moeedge.progress import progress_bar
from moeedge.runtime.plan import FIXED_JITTER_BYTES
from moeedge.units import parse_bytes

PROBE_BYTES = 512 << 20  # read before every run: the disk's bandwidth then (probe_disk)

# Top-level keys every record has (bench/README.md documents them all).
RECORD_KEYS = ("engine", "model", "precision", "limit_bytes", "decode_tok_s", "prefill_tok_s", "p50_ms", "p99_ms",
               "peak_bytes", "oom_kills", "bound_tok_s", "cold")


@dataclass
class Settings:
    tokens: int = 32
    prompt_tokens: int = 16
    threads: int = 2
    max_context: int = 256     # the KV cache every engine sets up (llama.cpp's n_ctx)
    timeout_s: float = 900.0
    disk_probe: bool = True    # measure the disk before every run (512 MiB of the run's own weight files)
    llama_cpp_python: str = ""  # an interpreter whose llama_cpp is built for this CPU ("": the harness's own)
    # Reads of the model's disk held to this many bytes/s ("200MiB") in every run, and the bound
    # uses it: set below the slowest rate the disk has shown, every engine sees the same disk.
    read_throttle: str | None = None

    @property
    def read_throttle_bytes_per_s(self) -> int | None:
        return None if self.read_throttle is None else parse_bytes(self.read_throttle)


@dataclass
class Model:
    name: str
    hf: str | None = None   # the Hugging Face directory (bf16); a GGUF-only model has none
    gguf: dict[str, str] = field(default_factory=dict)
    precisions: list[str] = field(default_factory=lambda: ["bf16"])
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    limits: list[str] = field(default_factory=lambda: ["unlimited"])
    prefill_tokens: list[int] = field(default_factory=list)  # also a cold run with a prompt of each length


def read_config(path: str | Path) -> tuple[Settings, list[Model]]:
    """Settings and models of a matrix file; ValueError naming the file and the entry at fault."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not TOML: {e}") from None
    try:
        settings = Settings(**raw.get("settings", {}))
        settings.read_throttle_bytes_per_s
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: [settings]: {e}") from None
    models = []
    for i, entry in enumerate(raw.get("model", [])):
        try:
            model = Model(**entry)
        except TypeError as e:
            raise ValueError(f"{path}: [[model]] #{i + 1}: {e}") from None
        unknown = [e for e in model.engines if e not in ENGINES]
        if unknown:
            raise ValueError(f"{path}: model {model.name}: unknown engine {unknown[0]!r}; "
                             f"choose from {', '.join(ENGINES)}")
        for limit in model.limits:
            _check_limit(path, model.name, limit)
        if not all(isinstance(n, int) and 1 <= n <= 32768 for n in model.prefill_tokens):
            raise ValueError(f"{path}: model {model.name}: prefill_tokens {model.prefill_tokens!r} are not "
                             f"prompt lengths of 1 to 32768 tokens")
        models.append(model)
    if not models:
        raise ValueError(f"{path}: no [[model]] entries")
    return settings, models


def _check_limit(path: Path, model: str, label: str) -> None:
    if label in ("unlimited", "min") or _fraction(label) is not None or _expert_fraction(label) is not None:
        return
    try:
        parse_bytes(label)
    except ValueError:
        raise ValueError(f"{path}: model {model}: limit {label!r} is not 'unlimited', 'min', a fraction of the "
                         f"file size such as '0.5', 'experts:0.25' (moeedge's fixed cost, dense weights, KV "
                         f"cache and buffers, and that fraction of the expert bytes), or a byte count such as '2GiB'") from None


def _fraction(label: str) -> float | None:
    try:
        value = float(label)
    except ValueError:
        return None
    return value if "." in label and 0 < value <= 4 else None


def _expert_fraction(label: str) -> float | None:
    if not label.startswith("experts:"):
        return None
    value = _fraction(label.removeprefix("experts:"))
    return value if value is not None and value <= 1 else None


def source_of(model: Model, engine: str, precision: str) -> str | None:
    """What the engine loads for this precision; None where the pair does not run."""
    if precision == "bf16" and engine not in GGUF_ONLY:
        return model.hf
    if engine in HF_ONLY:
        return None
    return model.gguf.get(precision)


def files_of(source: str) -> list[str]:
    p = Path(source)
    return sorted(str(f) for f in p.iterdir() if f.is_file()) if p.is_dir() else [str(p)]


def weight_bytes(source: str) -> int:
    return sum(Path(f).stat().st_size for f in files_of(source) if f.endswith((".safetensors", ".gguf")))


def plan(models: list[Model], info) -> list[Run]:
    """Every run of the matrix, in order. info(source) gives `moeedge info --json`'s facts."""
    runs = []
    for model in models:
        for precision in model.precisions:
            for label in model.limits:
                for engine in model.engines:
                    source = source_of(model, engine, precision)
                    if source is None:
                        continue
                    reference = source_of(model, "moeedge", precision)
                    limit = limit_bytes(label, reference, info)
                    for prompt in [None, *model.prefill_tokens]:
                        runs.append(Run(model.name, engine, precision, label, limit, source, tuple(files_of(source)),
                                        prompt))
    return runs


def limit_bytes(label: str, source: str, info) -> int | None:
    if label == "unlimited":
        return None
    if label == "min":
        return info(source)["min_budget_bytes"]
    experts = _expert_fraction(label)
    if experts is not None:
        f = info(source)
        # everything moeedge plans beside experts, so that the fraction is its expert cache
        rest = f["fixed_bytes"] + FIXED_JITTER_BYTES + f["dense_bytes"] + f["kv_cache_bytes"] + f["buffer_bytes"]
        return rest + int(experts * f["expert_bytes"])
    fraction = _fraction(label)
    return int(fraction * weight_bytes(source)) if fraction is not None else parse_bytes(label)


def commit() -> str:
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def for_run(settings: Settings, run: Run) -> Settings:
    """The settings a run takes: a prefill cell's prompt length, with the context to hold it."""
    if run.prompt_tokens is None:
        return settings
    return replace(settings, prompt_tokens=run.prompt_tokens,
                   max_context=max(settings.max_context, run.prompt_tokens + settings.tokens))


def record_path(results: Path, run: Run, settings: Settings, head: str) -> Path:
    settings = for_run(settings, run)
    # The label, not the bytes: "min" moves with the measured fixed cost from one info call to the next.
    key = json.dumps([head, asdict(settings), run.source, run.limit_label], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    prefill = "" if run.prompt_tokens is None else f"-p{run.prompt_tokens}"
    return results / "runs" / run.model / f"{run.engine}-{run.precision}-{run.limit_label}{prefill}-{digest}.json"


def execute(run: Run, settings: Settings, env: dict | None = None) -> dict:
    """One cold run in its own cgroup; the record's measured part (no bound yet)."""
    evict_files(run.files)
    throttle = settings.read_throttle_bytes_per_s
    disk = probe_disk(run) if settings.disk_probe and throttle is None else None
    cold = drop_page_cache()
    cmd = command(run, settings.tokens, settings.prompt_tokens, settings.threads, settings.max_context,
                  settings.llama_cpp_python)
    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        join = [stack.enter_context(ReadThrottle(disk_of(run.files[0]), throttle)).procs] if throttle else []
        result = run_limited(cmd, run.limit_bytes, settings.timeout_s, env=env, also_join=join)
    out: dict = {}
    error = None
    if result.returncode == 0:
        try:
            out = json.loads(result.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            error = f"no JSON on stdout: {result.stdout[-300:]!r}"
    else:
        error = {124: "timed out", 137: "killed (out of memory?)"}.get(result.returncode, "failed")
        error += f" (exit {result.returncode}): " + result.stderr.strip()[-600:]
    return {
        "engine": run.engine, "model": run.model, "precision": run.precision, "limit_bytes": run.limit_bytes,
        "limit_label": run.limit_label,
        **{k: out.get(k) for k in ("decode_tok_s", "steady_tok_s", "prefill_tok_s", "p50_ms", "p99_ms")},
        "peak_bytes": result.peak_bytes, "oom_kills": result.oom_kills, "failcnt": result.failcnt,
        "major_faults": result.major_faults, "read_bytes": result.read_bytes, "cold": cold,
        "returncode": result.returncode, "error": error, "seconds": result.seconds, "load_average": load,
        "disk_bytes_per_s_at_run": disk, "read_throttle_bytes_per_s": throttle,
        "source": run.source, "command": cmd, "result": out,
    }


def probe_disk(run: Run) -> float:
    """Bytes/s of cold O_DIRECT reads of the run's largest weight file just before the run,
    the faster of plain reads (two readers, 16 MiB each) and moeedge's cache reading 32 MiB
    pieces: the disk as the run will find it (a shared virtual disk varies several-fold
    within minutes)."""
    from moeedge.harness.machine import read_direct, read_native

    largest = Path(max(run.files, key=lambda f: Path(f).stat().st_size))
    nbytes = min(PROBE_BYTES, largest.stat().st_size)
    bandwidth = max(read_direct(largest, nbytes), read_native(largest, nbytes))
    evict_files([largest])
    return bandwidth


def select_cells(runs: list[Run], cells: str) -> list[Run]:
    """The decode cells, the prefill cells (a model's prefill_tokens), or all."""
    if cells not in ("all", "decode", "prefill"):
        raise ValueError(f"cells {cells!r} is not one of all, decode, prefill")
    return [r for r in runs if cells == "all" or (r.prompt_tokens is None) == (cells == "decode")]


def main_loop(config: Path, results: Path, only_models: list[str] | None = None,
              only_engines: list[str] | None = None, dry_run: bool = False, progress: bool = True,
              cells: str = "all") -> list[dict]:
    """Run what is missing of the matrix; the records of every run (old and new) in order."""
    from moeedge.harness.machine import load_or_measure

    settings, models = read_config(config)
    models = [m for m in models if only_models is None or m.name in only_models]
    for m in models:
        m.engines = [e for e in m.engines if only_engines is None or e in only_engines]
    info = Facts(settings.max_context)
    runs = select_cells(plan(models, info), cells)
    head = commit()
    if dry_run:
        for run in runs:
            done = record_path(results, run, settings, head).is_file()
            print(f"{'done' if done else 'todo'}  {run.model:18} {run.engine:17} {run.precision:5} "
                  f"{run.limit_label:9} {'-' if run.limit_bytes is None else run.limit_bytes >> 20} MiB"
                  f"{'' if run.prompt_tokens is None else f'  prefill {run.prompt_tokens}'}")
        return []
    if not runs:
        return []
    models_dir = Path(runs[0].source).parent  # the disk the models are read from
    machine = load_or_measure(results / "machine.json", models_dir, settings.threads)
    todo = [run for run in runs if not record_path(results, run, settings, head).is_file()]
    if any(run.limit_bytes is not None for run in todo) and not cgroup_writable():
        raise CgroupUnavailable("no writable memory cgroup here: refusing to label results as limited "
                                "(run as root on a machine with the memory controller)")
    llama = None
    if any(run.engine in GGUF_ONLY for run in todo):  # against a llama.cpp built for this CPU only
        llama = describe(settings.llama_cpp_python or None)
        check_native(llama)
    from tqdm import tqdm

    records = []
    bar = progress_bar(runs, unit="run", show=progress)
    for run in bar:
        path = record_path(results, run, settings, head)
        bar.set_description(f"{run.model} {run.engine} {run.precision} {run.limit_label}")
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        cell = for_run(settings, run)
        record = execute(run, cell)
        if run.engine in GGUF_ONLY:
            record["llama_cpp_build"] = llama
        reference_source = source_of_reference(models, run)
        reference = routing(results, run.model, run.precision, reference_source, cell)
        with_bound(record, info(reference_source), reference["routing"], cell.prompt_tokens, machine)
        generated = record["result"].get("generated")
        record["same_tokens_as_reference"] = None if generated is None else generated == reference["generated"]
        record["result"].pop("routing", None)
        record.update(settings=asdict(cell), prefill_cell=run.prompt_tokens, commit=head, versions=versions(),
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        records.append(record)
    return records


class Facts:
    """`moeedge info --json` of each source, asked once (in a fresh process: its fixed cost
    is a fresh process's)."""

    def __init__(self, max_context: int):
        self.max_context, self.known = max_context, {}

    def __call__(self, source: str) -> dict:
        if source not in self.known:
            out = subprocess.run([sys.executable, "-m", "moeedge.cli", "info", source, "--json", "--max-context",
                                  str(self.max_context)], capture_output=True, text=True)
            if out.returncode != 0:
                raise ValueError(f"moeedge info {source}: {out.stderr.strip()[-300:]}")
            self.known[source] = json.loads(out.stdout)
        return self.known[source]


def with_bound(record: dict, facts: dict, routing_: list, prompt_tokens: int, machine: dict) -> dict:
    """The record with its physical bound and its fraction of it (moeedge.harness.bound)."""
    from moeedge.harness.bound import physical_bound, shortfall

    # The bound models a decoder's token loop; an encoder-decoder's decode has no bound here.
    disk = (record.get("read_throttle_bytes_per_s") or record.get("disk_bytes_per_s_at_run")
            or machine["disk_bytes_per_s"])
    bound = None if facts["architecture"] == "switch_transformers" else physical_bound(
        facts, routing_, prompt_tokens, record["limit_bytes"], disk, machine["matvec_bytes_per_s"])
    record.update(bound.as_dict() if bound else {"bound_tok_s": None})
    tok_s = record["decode_tok_s"]
    record["fraction_of_bound"] = tok_s / bound.tok_s if bound and tok_s else None
    record.update(shortfall(record["result"], bound, disk))
    record["machine"] = machine
    return record


def refresh_bounds(results: Path) -> int:
    """Recompute every record's bound from results/machine.json as it is now (after the
    machine's facts were measured again); the number of records rewritten."""
    machine = json.loads((results / "machine.json").read_text())
    infos: dict[int, Facts] = {}
    count = 0
    for path in sorted((results / "runs").rglob("*.json")):
        record = json.loads(path.read_text())
        s = record["settings"]
        reference = json.loads((results / "routing" / f"{record['model']}-{record['precision']}-"
                                                      f"{s['prompt_tokens']}-{s['tokens']}.json").read_text())
        info = infos.setdefault(s["max_context"], Facts(s["max_context"]))
        with_bound(record, info(reference["source"]), reference["routing"], s["prompt_tokens"], machine)
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        count += 1
    return count


def source_of_reference(models: list[Model], run: Run) -> str:
    model = next(m for m in models if m.name == run.model)
    return source_of(model, "moeedge", run.precision)


def routing(results: Path, model: str, precision: str, source: str, settings: Settings) -> dict:
    """The routing and tokens of one unlimited moeedge run of this model and precision
    (warm, not timed): what the bound of every engine's run is computed from."""
    path = results / "routing" / f"{model}-{precision}-{settings.prompt_tokens}-{settings.tokens}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cmd = [sys.executable, "-m", "moeedge.decode_bench", source, "--tokens", str(settings.tokens),
           "--prompt-tokens", str(settings.prompt_tokens), "--threads", str(settings.threads),
           "--max-context", str(settings.max_context)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"reference run of {source} failed: {out.stderr.strip()[-500:]}")
    result = json.loads(out.stdout)
    kept = {"source": source, "routing": result["routing"], "generated": result["generated"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept) + "\n")
    return kept


def cgroup_writable() -> bool:
    try:
        run_limited(["true"], 1 << 30, 30)
        return True
    except CgroupUnavailable:
        return False


def versions() -> dict:
    """Versions read from package metadata: importing torch here would map its libraries
    into this process, and the runs' processes would share those pages uncharged to their
    cgroups (llama.cpp's libraries get no such help)."""

    def of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {"python": platform.python_version(), **{n: of(n) for n in ("moeedge", "torch", "transformers",
                                                                      "llama_cpp_python", "accelerate")}}
