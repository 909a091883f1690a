"""The plan of a source in a budget: the memory split (moeedge.runtime.plan), this
machine's measurements (moeedge.ladder.machine) and the ladder's manifest, handed to the
planner; and the end-to-end check of the plan it chose."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moeedge.formats.open import open_checkpoint
from moeedge.ladder import machine, pack
from moeedge.ladder.build import policy_curve
from moeedge.ladder.cost import Curve, Machine
from moeedge.ladder.planner import Choice, choose, layer_options
from moeedge.models.family import resolve_policy, runner_class
from moeedge.runtime.embedding import embedding_on_disk
from moeedge.runtime.measure import resolve_budget
from moeedge.runtime.plan import MemoryPlan, plan_checkpoint


@dataclass
class SourcePlan:
    source: str
    ladder: Path
    memory: MemoryPlan
    choice: Choice
    machine: Machine
    max_kl: float

    def plan_file(self) -> dict:
        """What `-o` writes and moeedge.load(plan=...) reads."""
        return {"ladder": str(self.ladder.resolve()), "variants": self.choice.chosen.variants,
                "memory_budget": self.memory.budget_bytes, "max_kl": self.max_kl,
                "predicted": self.choice.chosen.as_dict()}

    def as_dict(self) -> dict:
        c = self.choice
        return {"source": self.source, "ladder": str(self.ladder), "max_kl": self.max_kl,
                "memory": self.memory.as_dict(), "expert_cache_bytes": c.cache_bytes,
                "chosen": c.chosen.as_dict(), "lossless": None if c.lossless is None else c.lossless.as_dict(),
                "binds": c.binds, "frontier": [p.as_dict() for p in c.frontier],
                "machine": {"read_bps": self.machine.read_bps, "ffn": self.machine.ffn,
                            "dense_s": self.machine.dense_s, "miss_latency_s": self.machine.miss_latency_s,
                            "cpu_key": machine.machine_key()}}


def measured_machine(ckpt, ladder: Path, identity: str, remeasure: bool) -> Machine:
    cfg = ckpt.config
    ffn = machine.compute_costs(cfg.hidden, cfg.expert_intermediate, remeasure)
    read = machine.read_bandwidth(ladder, ckpt.layer_expert_nbytes(0), remeasure)
    step = machine.decode_step_seconds(ckpt.source, identity, remeasure)
    experts = len(cfg.moe_layers) * cfg.top_k * ffn["stored"]["decode_s"]
    wait = machine.miss_wait_seconds(ckpt.source, identity, remeasure)
    latency = max(0.0, wait - ckpt.layer_expert_nbytes(0) / read)
    return Machine(read, ffn, max(0.0, step - experts), latency)


def plan_source(source, memory_budget, max_kl: float = 0.0, ladder=None, max_context: int = 2048,
                remeasure: bool = False, policy: str = "auto") -> SourcePlan:
    """The plan for a load with this budget, max_context and cache policy (the hit-rate
    curve is the simulator's for that policy)."""
    ckpt = open_checkpoint(source)
    fixed = machine.load_fixed_bytes(remeasure)
    directory = Path(ladder) if ladder is not None else pack.default_dir(ckpt)
    manifest = pack.read_manifest(directory)
    if manifest is None:
        raise ValueError(f"{directory}: no ladder there; build it with `moeedge ladder "
                         f"{source or ''} {'-o ' + str(ladder) if ladder else ''}`".replace("  ", " "))
    pack.check_source(manifest, ckpt, directory)
    cfg = ckpt.config
    options = layer_options(manifest, len(cfg.moe_layers))
    runner = runner_class(cfg)
    on_disk = embedding_on_disk(ckpt)
    smallest = min(o.max_slot for row in options for o in row)
    memory = plan_checkpoint(ckpt, runner, smallest, resolve_budget(memory_budget), fixed,
                             min(max_context, cfg.max_position), runner.compute_dtype(ckpt),
                             on_disk.info.nbytes if on_disk is not None else 0)
    m = measured_machine(ckpt, directory, pack.identity_hash(manifest["identity"]), remeasure)
    curve = Curve.of(policy_curve(directory, manifest, resolve_policy(policy, runner)))
    choice = choose(options, memory.expert_cache_bytes, m, curve, cfg.top_k, memory.prefill_chunk, max_kl)
    return SourcePlan(str(ckpt.source), directory, memory, choice, m, max_kl)


def check(plan: SourcePlan) -> dict:
    """The chosen plan measured end to end against the source on held-out text."""
    return {**check_variants(plan.source, plan.ladder, plan.choice.chosen.variants),
            "kl_sum_predicted": plan.choice.chosen.kl}


def check_variants(source, ladder: Path, variants: list[str]) -> dict:
    """A plan of these variants against the source on the ladder's held-out tokens."""
    import moeedge
    from moeedge.evaluate import corpus_windows, measure

    s = pack.read_manifest(ladder)["settings"]
    tokens = s["eval_tokens"] or 2048
    with moeedge.load(source, max_context=s["window"]) as ref:
        windows = corpus_windows(ref.tokenizer, "heldout", tokens, s["window"])
        plan = {"ladder": str(Path(ladder).resolve()), "variants": list(variants)}
        with moeedge.load(source, max_context=s["window"], plan=plan) as model:
            q = measure(model, windows, ref)
    return {"kl_mean": q.kl_mean, "top1_agreement": q.top1_agreement, "ppl_ratio": q.ppl_ratio, "tokens": q.tokens}


def write_plan(plan: SourcePlan, path) -> None:
    Path(path).write_text(json.dumps(plan.plan_file(), indent=1) + "\n")
