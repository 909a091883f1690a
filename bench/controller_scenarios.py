"""The adaptive controller's scenarios, replayed and recorded per token, against the best
static plan in hindsight (docs/controller.md, "Scenarios").

    python bench/controller_scenarios.py --ladder DIR [SOURCE] [--scenarios 1,2,3] [--segment 64] \
        [--max-kl 0.003] [--repeats 3] [--json OUT.json] [--plot OUT.png]

1. the expert cache's share of the budget drops to a third mid-decode, then comes back
   (model.set_budget). The share is what the budget gives beyond the fixed cost, dense
   weights, KV cache, buffers and the bytes a prefill borrows from the cache (which
   decoding caches experts in too: on the default model at max_context 640 they are 8 MiB,
   against 11.4 MiB for all its experts); the whole process's budget cannot drop to a
   third: the fixed cost of the interpreter and torch is most of it;
2. the disk slows from full speed to 100 MB/s and back (a blkio read throttle,
   moeedge.read_throttle, on the process's reads) with the cache holding half the experts;
3. a long prompt (512 tokens), then decoding, with the cache holding half the experts.

Each run is a fresh process (`--worker`) in a memory cgroup of its own that measures
(moeedge.cgroup.run_limited, no limit: the budget is set_budget's), and writes a record
per token: time, the token's seconds, resident expert bytes, the process's and the
cgroup's memory now and its peak since the segment began (v1 max_usage_in_bytes, reset
at each segment), the budget and the plan in force. A segment's tok/s is its tokens over
their seconds, switch transients included. Then, for each segment's conditions, every
plan on the planner's frontier at that segment's budget is run alone the same way
(SEGMENT tokens after WARM tokens that fill the cache) and the best is the comparison.
Runs alternate (adaptive, then the static plans, in reverse order every other round),
--repeats rounds; each figure is a median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from moeedge.cgroup import run_limited
from moeedge.ladder.plan_source import plan_source
from moeedge.read_throttle import ReadThrottle, disk_of
from moeedge.runtime.measure import memory_cgroup
from moeedge.runtime.plan import budget_for_cache

WARM = 16
LONG_PROMPT = 512
SLOW_DISK = 100_000_000
MAX_CONTEXT = 640


def segments(scenario: int) -> list[dict]:
    """Each segment's conditions: the expert cache's share of all experts, the read limit
    (None: the disk's own speed), and whether it is a prompt of LONG_PROMPT tokens."""
    return {1: [{"cache": 1.0}, {"cache": 1 / 3}, {"cache": 1.0}],
            2: [{"cache": 0.5}, {"cache": 0.5, "read_bps": SLOW_DISK}, {"cache": 0.5}],
            3: [{"cache": 0.5, "prompt": LONG_PROMPT}, {"cache": 0.5}]}[scenario]


def cache_bytes(share: float, every: int, borrow: int, least: int) -> int:
    """The decode cache's bytes at a share of every expert: never below what the lossless
    plan needs (the prefill's borrowed bytes and one layer's top-k experts)."""
    return max(int(share * every), borrow + least)


# --- the worker: one run, in its own process and cgroup -----------------------------
def cgroup_file(name: str) -> Path | None:
    found = memory_cgroup()
    return None if found is None or found[1] != 1 else found[0] / name


def read_int(path: Path | None) -> int:
    try:
        return int(path.read_text()) if path is not None else 0
    except OSError:
        return 0


def prompt_ids(tokenizer, n: int) -> list[int]:
    from moeedge.data.corpus import collect

    ids = tokenizer.encode("\n".join(collect().texts("heldout")[:50]))
    return ids[:n]


def worker(args) -> None:
    """One run: a plan (static) or the controller (adaptive) through the segments."""
    import moeedge
    from moeedge.runtime.measure import rss_bytes

    spec = json.loads(args.worker)
    plan = {"ladder": spec["ladder"], "variants": spec["variants"]} if spec.get("variants") else None
    adaptive = spec["adaptive"]
    if adaptive:
        plan = {"ladder": spec["ladder"], "variants": spec["start"]}
    model = moeedge.load(spec["source"], memory_budget="2GiB", max_context=MAX_CONTEXT, plan=plan,
                         adaptive=adaptive, max_kl=spec["max_kl"])
    loaded, every = model.plan, spec["every"]
    peak, usage = cgroup_file("memory.max_usage_in_bytes"), cgroup_file("memory.usage_in_bytes")
    records, out = [], []
    segs = spec["segments"]

    def budget_of(seg) -> int:
        return budget_for_cache(loaded, cache_bytes(seg["cache"], every, model.plan.prefill_borrow_bytes, spec["least"]))

    def enter(i: int) -> None:
        seg = segs[i]
        model.set_budget(budget_of(seg))
        if spec.get("throttle"):
            rate = seg.get("read_bps") or 0
            Path(spec["throttle"]).write_text(f"{spec['disk']} {rate}")
        if peak is not None:
            peak.write_text("0")  # v1: the high-water mark restarts at the usage now

    base = prompt_ids(model.tokenizer, LONG_PROMPT + 64)
    start = time.perf_counter()

    def record(i: int, dt: float, n: int = 1) -> None:
        s = model.cache.stats()
        records.append({"t": time.perf_counter() - start, "dt": dt, "tokens": n, "segment": i,
                        "resident_bytes": s["resident_bytes"], "rss_bytes": rss_bytes(),
                        "cgroup_bytes": read_int(usage), "cgroup_peak_bytes": read_int(peak),
                        "budget_bytes": budget_of(segs[i]), "variants": list(model.plan.expert_variants),
                        "switches": len(model.adaptive.switches) if adaptive else 0})

    warm = 0 if adaptive else WARM
    wanted = sum(args.segment for s in segs if "prompt" not in s) + warm
    i = 0
    enter(0)
    if "prompt" in segs[0]:  # the prompt is segment 0, timed alone (prefill), then decoding
        t0 = time.perf_counter()
        stream = model.stream_ids(base[:segs[0]["prompt"]], max_new_tokens=wanted + 1, temperature=0)
        next(stream)
        record(0, time.perf_counter() - t0, segs[0]["prompt"])
        if len(segs) == 1:  # a static run of the prompt alone
            wanted = 0
        else:
            i = 1
            enter(1)
    else:
        stream = model.stream_ids(base[:64], max_new_tokens=wanted + 1, temperature=0)
        next(stream)
    done = 0
    while done < wanted:
        t0 = time.perf_counter()
        try:
            next(stream)
        except StopIteration:  # an end-of-sequence token: go on from another prompt
            stream = model.stream_ids(base[done % 256: done % 256 + 64], max_new_tokens=wanted + 1,
                                      temperature=0)
            continue
        done += 1
        if done > warm:
            record(i, time.perf_counter() - t0)
        seg_end = warm + sum(args.segment for s in segs[:i + 1] if "prompt" not in s)
        if done == seg_end and i + 1 < len(segs):
            i += 1
            enter(i)
    stream.close()
    out = {"records": records, "stats": {k: v for k, v in model.stats().items() if k != "prediction"}}
    model.close()
    Path(args.out).write_text(json.dumps(out, default=str))


# --- the driver ------------------------------------------------------------------
def run(spec: dict, segment: int, tmp: Path) -> dict:
    """spec run by a worker in its cgroup (joined to a read throttle where it has one)."""
    out = tmp / f"run-{time.monotonic_ns()}.json"
    throttle = None
    if any(s.get("read_bps") for s in spec["segments"]):
        throttle = ReadThrottle(disk_of(spec["ladder"]), 1 << 40)
        spec = {**spec, "throttle": str(throttle.dir / "blkio.throttle.read_bps_device"), "disk": throttle.disk}
    try:
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--out", str(out), "--segment", str(segment)]
        r = run_limited(cmd, None, timeout=1800, also_join=[throttle.procs] if throttle else ())
    finally:
        if throttle is not None:
            throttle.close()
    if r.returncode != 0:
        raise RuntimeError(f"worker failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return {**json.loads(out.read_text()), "oom_kills": r.oom_kills, "peak_bytes": r.peak_bytes}


def per_segment(records: list[dict]) -> list[dict]:
    out = []
    for i in sorted({r["segment"] for r in records}):
        rs = [r for r in records if r["segment"] == i]
        out.append({"segment": i, "tokens": sum(r["tokens"] for r in rs),
                    "tok_s": sum(r["tokens"] for r in rs) / sum(r["dt"] for r in rs),
                    "budget_bytes": rs[-1]["budget_bytes"], "cgroup_peak_bytes": max(r["cgroup_peak_bytes"] for r in rs),
                    "variants": rs[-1]["variants"], "plans": sorted({",".join(r["variants"]) for r in rs})})
    return out


def stored_bytes(source) -> tuple[int, int]:
    """The cache slots of every expert as stored (what the segments' shares are of), and
    of one layer's top-k (the least the lossless plan needs beside the prefill's bytes)."""
    from moeedge._core import ExpertStore
    from moeedge.formats.open import open_checkpoint

    ckpt = open_checkpoint(source)
    store = ExpertStore(ckpt.files, ckpt.expert_ranges, direct_io=True)
    slots = [store.slot_bytes(k) for k in store.keys()]
    return sum(slots), ckpt.config.top_k * max(slots)


def frontier(source, ladder: str, cache_share: float, max_kl: float, every: int, least: int) -> list[list[str]]:
    """Every plan on the planner's frontier within max_kl, the expert cache at this share of all experts."""
    probe = plan_source(source, "2GiB", max_kl, ladder, max_context=MAX_CONTEXT)
    m = probe.memory
    budget = budget_for_cache(m, cache_bytes(cache_share, every, m.prefill_borrow_bytes, least))
    sp = plan_source(source, budget, max_kl, ladder, max_context=MAX_CONTEXT)
    return [p.variants for p in sp.choice.frontier if p.kl <= max_kl]


def scenario(args, n: int, tmp: Path) -> dict:
    """The adaptive run and every segment's static plans, args.repeats times alternating; medians."""
    segs = segments(n)
    n_layers = len(json.loads((Path(args.ladder) / "manifest.json").read_text())["layers"])
    base = {"source": args.source, "ladder": args.ladder, "max_kl": args.max_kl, "segments": segs,
            **dict(zip(("every", "least"), stored_bytes(args.source)))}
    statics = [(i, v) for i, seg in enumerate(segs)
               for v in frontier(args.source, args.ladder, seg["cache"], args.max_kl, base["every"], base["least"])]
    adaptive_runs, static_tok_s = [], {k: [] for k in range(len(statics))}
    for rep in range(args.repeats):
        adaptive_runs.append(run({**base, "adaptive": True, "start": ["stored"] * n_layers}, args.segment, tmp))
        for k in (range(len(statics)) if rep % 2 == 0 else reversed(range(len(statics)))):
            i, variants = statics[k]
            r = run({**base, "adaptive": False, "max_kl": 0.0, "variants": variants, "segments": [segs[i]]},
                    args.segment, tmp)
            static_tok_s[k].append(per_segment(r["records"])[0]["tok_s"])
    runs = [per_segment(r["records"]) for r in adaptive_runs]
    rows = runs[0]
    for i, (row, seg) in enumerate(zip(rows, segs)):
        mine = [{"variants": v, "tok_s": statistics.median(static_tok_s[k]), "runs": static_tok_s[k]}
                for k, (j, v) in enumerate(statics) if j == i]
        best = max(mine, key=lambda s: s["tok_s"])
        row.update(conditions=seg, statics=mine, best_static=best, runs=[r[i]["tok_s"] for r in runs],
                   tok_s=statistics.median(r[i]["tok_s"] for r in runs),
                   cgroup_peak_bytes=max(r[i]["cgroup_peak_bytes"] for r in runs))
        row["ratio"] = row["tok_s"] / best["tok_s"]
        print(f"scenario {n} segment {i} {seg}: adaptive {row['tok_s']:.1f} tok/s ({'; '.join(row['plans'])}), "
              f"best static {best['tok_s']:.1f} ({','.join(best['variants'])}), ratio {row['ratio']:.2f}, "
              f"cgroup peak {row['cgroup_peak_bytes'] / 2**20:.1f} MiB / budget {row['budget_bytes'] / 2**20:.1f} MiB",
              flush=True)
    return {"scenario": n, "segments": rows, "records": adaptive_runs[0]["records"],
            "oom_kills": sum(r["oom_kills"] for r in adaptive_runs),
            "switches": [r["stats"].get("adaptive", {}).get("switches", []) for r in adaptive_runs]}


def table(results: list[dict]) -> str:
    """The markdown table of a run's JSON (--table), process and cgroup peaks per segment."""
    lines = ["| scenario | segment | adaptive tok/s (plans in force) | best static tok/s (plan) | ratio | "
             "process peak / budget | cgroup peak | OOM kills |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        for row in res["segments"]:
            i = row["segment"]
            rss = max(r["rss_bytes"] for r in res["records"] if r["segment"] == i)
            cond = ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["conditions"].items())
            lines.append(f"| {res['scenario']} | {i}: {cond} | {row['tok_s']:.1f} ({'; '.join(row['plans'])}) | "
                         f"{row['best_static']['tok_s']:.1f} ({','.join(row['best_static']['variants'])}) | "
                         f"{row['ratio']:.2f} | {rss / 2**20:.1f} / {row['budget_bytes'] / 2**20:.1f} MiB | "
                         f"{row['cgroup_peak_bytes'] / 2**20:.1f} MiB | {res['oom_kills']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(results), figsize=(5 * len(results), 8), squeeze=False, sharex="col")
    for col, res in enumerate(results):
        rs = res["records"]
        t = [r["t"] for r in rs]
        window = 8
        speed = [window / sum(r["dt"] for r in rs[max(0, k - window + 1):k + 1]) * min(1, (k + 1) / window)
                 for k in range(len(rs))]
        axes[0][col].plot(t, speed)
        axes[0][col].set_title(f"scenario {res['scenario']}")
        axes[0][col].set_ylabel("tok/s (8-token window)")
        axes[1][col].plot(t, [r["resident_bytes"] / 2**20 for r in rs], label="expert cache resident")
        axes[1][col].plot(t, [(r["budget_bytes"] - rs[0]["budget_bytes"]) / 2**20 for r in rs], "--",
                          label="budget - first budget")
        axes[1][col].set_ylabel("MiB")
        axes[1][col].legend(fontsize=7)
        names = sorted({",".join(r["variants"]) for r in rs})
        axes[2][col].step(t, [names.index(",".join(r["variants"])) for r in rs], where="post")
        axes[2][col].set_yticks(range(len(names)), names, fontsize=6)
        axes[2][col].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=None)
    p.add_argument("--ladder")
    p.add_argument("--scenarios", default="1,2,3")
    p.add_argument("--segment", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-kl", type=float, default=0.003)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--table", default=None, help="print the table of a JSON this script wrote, and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.table:
        return print(table(json.loads(Path(args.table).read_text())))
    if not args.ladder:
        p.error("--ladder is required")
    if args.segment < 64:
        p.error("--segment must be at least 64 tokens")
    with tempfile.TemporaryDirectory() as tmp:
        results = [scenario(args, int(n), Path(tmp)) for n in args.scenarios.split(",")]
    ratios = [s["ratio"] for r in results for s in r["segments"]]
    print(f"median ratio to the best static plan {statistics.median(ratios):.2f}, lowest {min(ratios):.2f}; "
          f"OOM kills {sum(r['oom_kills'] for r in results)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
