"""Train moeedge's bundled default model from scratch, in one command:

    python -m moeedge.train.default_model --out DIR [--minutes 45] [--seed 0] [--resume]

A Mixtral (hidden 192, 4 layers, 8 experts, top-2, intermediate 320, ~7.9M parameters)
on CPython's standard library, made by sparse upcycling: a dense model (one expert,
top-1: the same network with a plain FFN) trains first; its FFN is copied into every
expert with a little noise, the routers start random, and training continues as an MoE
with the load-balancing loss.

Each phase's learning rate warms up, holds, and decays over the phase's last 15% of
steps. A probe of this machine's speed gives each phase a time budget within
--minutes; a phase's step count is fixed when the decay must start for the phase to end
in time, and the learning rate before that point does not depend on it. So the run
ends in time on a busy machine, and is deterministic given the seed and the two step
counts it records (--dense-steps/--moe-steps replay them; no probe, no clock).
OUT/train_state/ holds a checkpoint every few minutes for --resume. DIR ends as a
Hugging Face directory, config.json written last.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from moeedge.data import corpus as corpus_lib
from moeedge.train import model_card
from moeedge.train.mixtral_experts import EXPERTS_IMPL
from moeedge.train.common import (StepClock, balance_loss, decay_start, length_if_due, lr_at,  # noqa: F401
                                  make_optimizer, open_run, open_state, publish, save_state,
                                  steps_if_decaying_after)

MAX_BYTES = 20 * 1000 * 1000


@dataclass
class TrainConfig:
    out: Path
    minutes: float = 45.0
    seed: int = 0
    resume: bool = False
    threads: int = 0                  # 0: every core
    # model
    hidden: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    n_experts: int = 8
    top_k: int = 2
    intermediate: int = 320
    vocab: int = 4096
    max_position: int = 1024          # trained on seq_len windows; RoPE carries it somewhat further
    rope_theta: float = 10000.0
    # data and optimiser
    seq_len: int = 256
    batch: int = 16
    dense_steps: int | None = None    # None: fixed by the clock to fit `minutes`
    moe_steps: int | None = None
    dense_share: float = 0.25         # of the training time, when the clock decides
    lr: float = 2e-3                  # dense peak
    moe_lr: float = 1e-3              # MoE peak: continued training, not a fresh start
    min_lr: float = 1e-4              # both phases end here
    warmup_steps: int = 50
    rewarm_steps: int = 30            # after upcycling: the MoE's fresh AdamW ramps up again
    decay_percent: int = 15           # of each phase's steps, at its end
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    upcycle_noise: float = 0.02       # noise std per expert, relative to each weight's std
    router_aux_loss_coef: float = 0.01
    # bookkeeping
    held_out: tuple[str, ...] = corpus_lib.HELD_OUT
    limit_files: int | None = None    # first N files of each split (tests)
    eval_tokens: int = 1 << 17        # about half the held-out split, spread over all of it
    checkpoint_minutes: float = 3.0
    stop_after: int | None = None     # stop after this global step, as a session that ends would
    keep_state: bool = False

    def recipe(self) -> dict:
        skip = {"out", "resume", "stop_after", "keep_state", "minutes", "dense_steps", "moe_steps"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


# -- models ------------------------------------------------------------------------------

def mixtral_config(cfg: TrainConfig, n_experts: int, top_k: int) -> MixtralConfig:
    conf = MixtralConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.hidden // cfg.n_heads, num_local_experts=n_experts, num_experts_per_tok=top_k,
        max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta, sliding_window=None,
        router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=n_experts > 1,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, dtype="float32")
    conf._experts_implementation = EXPERTS_IMPL
    return conf


def build(cfg: TrainConfig, moe: bool, seed: int) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(mixtral_config(cfg, cfg.n_experts if moe else 1, cfg.top_k if moe else 1))


def upcycle(dense: MixtralForCausalLM, cfg: TrainConfig, seed: int) -> MixtralForCausalLM:
    """The dense FFN copied into every expert plus noise; routers as initialised; the rest as trained."""
    moe = build(cfg, moe=True, seed=seed + 1)
    trained = dense.state_dict()
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                src = trained[name][0]                          # the one dense FFN
                noise = torch.randn(p.shape, generator=g) * (cfg.upcycle_noise * src.std())
                p.copy_(src.expand_as(p) + noise)
            elif not name.endswith(".mlp.gate.weight"):         # routers stay random
                p.copy_(trained[name])
    return moe


# -- training step (schedule and losses: common.py) --------------------------------------

def train_step(model, optimizer, ids: torch.Tensor, lr: float, cfg: TrainConfig) -> tuple[float, float]:
    """One optimiser step on ids [B, T]; returns (cross-entropy, load-balancing loss)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    moe = model.config.num_local_experts > 1
    out = model(input_ids=ids, output_router_logits=moe)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ce = loss.item()
    aux = balance_loss(out.router_logits, model.config.num_experts_per_tok) if moe else None
    if aux is not None:
        loss = loss + cfg.router_aux_loss_coef * aux
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce, aux.item() if aux is not None else 0.0


# -- probe and plan ----------------------------------------------------------------------

def probe(cfg: TrainConfig, batches: corpus_lib.Batches, steps: int = 2) -> dict:
    """Seconds per step of each phase on this machine (throwaway models, same shapes)."""
    out = {}
    for phase in ("dense", "moe"):
        model = build(cfg, moe=phase == "moe", seed=cfg.seed + 99).train()
        optimizer = make_optimizer(model, cfg)
        train_step(model, optimizer, batches.get(0), 1e-4, cfg)     # warm-up: allocations, thread pools
        start = time.perf_counter()
        for s in range(steps):
            train_step(model, optimizer, batches.get(s + 1), 1e-4, cfg)
        out[f"{phase}_s_per_step"] = (time.perf_counter() - start) / steps
        out[f"{phase}_tokens_per_s"] = cfg.batch * cfg.seq_len / out[f"{phase}_s_per_step"]
    return out


# The model card's forward passes over eval_tokens: MoE, averaged experts, dense, 1/4 train.
EVAL_PASSES = 3.25
# Evaluation tokens per MoE training token's time: a forward pass is about a third of a
# step (backward costs two); 3.3 measured here. A constant, not a second noisy probe.
EVAL_SPEEDUP = 3.0
EVAL_FIXED_S = 40.0  # export, loading, moeedge's check and sample


def make_plan(cfg: TrainConfig, batches: corpus_lib.Batches, spent_s: float) -> dict:
    """Step counts if given; otherwise the time budgets the clock fixes them by."""
    if cfg.dense_steps is not None and cfg.moe_steps is not None:
        return {"source": "given", "dense_steps": cfg.dense_steps, "moe_steps": cfg.moe_steps,
                "eval_tokens": cfg.eval_tokens}
    start = time.monotonic()
    speed = probe(cfg, batches)
    spent_s += time.monotonic() - start
    budget_s = 0.92 * cfg.minutes * 60   # the rest: slack for a machine that slows down mid-decay
    # A short budget evaluates fewer tokens rather than train for nothing.
    eval_tps = EVAL_SPEEDUP * speed["moe_tokens_per_s"]
    eval_tokens = min(cfg.eval_tokens, int(0.06 * budget_s * eval_tps / EVAL_PASSES))
    eval_tokens = max(16, eval_tokens // cfg.seq_len) * cfg.seq_len
    eval_s = EVAL_PASSES * eval_tokens / eval_tps + EVAL_FIXED_S
    train_s = budget_s - spent_s - eval_s
    if train_s < 10 * (speed["dense_s_per_step"] + speed["moe_s_per_step"]):
        raise SystemExit(f"--minutes {cfg.minutes:g} leaves no time to train here "
                         f"({speed['moe_tokens_per_s']:.0f} tokens/s; evaluation alone takes ~{eval_s:.0f} s)")
    return {"source": f"clock, {cfg.minutes:g} minutes", "dense_steps": None, "moe_steps": None,
            "budget_s": budget_s, "before_training_s": spent_s, "dense_budget_s": train_s * cfg.dense_share,
            "eval_tokens": eval_tokens,
            "estimated_dense_steps": int(train_s * cfg.dense_share / speed["dense_s_per_step"]),
            "estimated_moe_steps": int(train_s * (1 - cfg.dense_share) / speed["moe_s_per_step"]),
            "probe": speed}


def time_left(phase: str, plan: dict, run: dict, step_s: float, tokens_per_step: int) -> float:
    """Training seconds this phase may still use. The MoE phase leaves room for the
    evaluation at the speed the machine has now, not the speed it had at the probe."""
    if phase == "dense":
        return plan["dense_budget_s"] - run["train_s"]
    eval_s = EVAL_PASSES * plan["eval_tokens"] * step_s / tokens_per_step / EVAL_SPEEDUP + EVAL_FIXED_S
    return plan["budget_s"] - plan["before_training_s"] - eval_s - run["train_s"]


# -- training ----------------------------------------------------------------------------

def run_phase(phase: str, model, optimizer, batches: corpus_lib.Batches, run: dict, cfg: TrainConfig,
              state_dir: Path) -> bool:
    """Train the rest of the phase; False if stopped at cfg.stop_after. `run` holds the
    global step, both phases' step counts (None until fixed), the log and the clock."""
    from tqdm import tqdm

    model.train()
    first = 0 if phase == "dense" else run["dense_steps"]   # global step of the phase's step 0
    peak, warmup = (cfg.lr, cfg.warmup_steps) if phase == "dense" else (cfg.moe_lr, cfg.rewarm_steps)
    key, plan = f"{phase}_steps", run["plan"]
    tokens, clock, smooth, last_save = cfg.batch * cfg.seq_len, StepClock(), None, time.monotonic()
    bar = tqdm(total=run[key] or plan.get(f"estimated_{key}"), initial=run["step"] - first, desc=phase,
               unit="step", dynamic_ncols=True, file=sys.stderr)
    while run[key] is None or run["step"] - first < run[key]:
        start = time.perf_counter()
        s = run["step"] - first
        lr = lr_at(s, run[key], peak, warmup, cfg)
        ce, aux = train_step(model, optimizer, batches.get(run["step"]), lr, cfg)
        run["step"] += 1
        done = s + 1
        step_s = time.perf_counter() - start
        run["train_s"] += step_s
        clock.add(step_s)
        if run[key] is None:  # fix the phase's length once the decay must start to end in time
            n = length_if_due(done, time_left(phase, plan, run, clock.per_step(), tokens), clock, cfg)
            if n is not None:
                run[key] = bar.total = n
        smooth = ce if smooth is None else 0.95 * smooth + 0.05 * ce
        if done % 10 == 0 or done == run[key]:
            run["log"].append({"step": run["step"], "phase": phase, "loss": round(ce, 4), "aux": round(aux, 4),
                               "lr": lr, "tokens_per_s": round(tokens / step_s)})
        stop = run["step"] == cfg.stop_after
        if done == run[key] or stop or time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
            save_start = time.perf_counter()
            save_state(state_dir, run, model, optimizer)
            run["train_s"] += time.perf_counter() - save_start
            last_save = time.monotonic()
        bar.set_postfix_str(f"loss {smooth:.3f} aux {aux:.3f} lr {lr:.1e} {tokens / step_s:,.0f} tok/s")
        bar.update(1)
        if stop:
            bar.close()
            return False
    bar.close()
    return True


# -- the whole run -----------------------------------------------------------------------

def prepare(cfg: TrainConfig, state_dir: Path, corpus: corpus_lib.Corpus) -> dict:
    """Tokenizer and token streams, made once and kept in train_state/."""
    import numpy as np

    state_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    corpus_lib.train_tokenizer(corpus.texts("train"), cfg.vocab, state_dir / "tokenizer.model")
    tok_s = time.perf_counter() - start
    for split in corpus_lib.SPLITS:
        np.save(state_dir / f"{split}_tokens.npy",
                corpus_lib.encode_files(state_dir / "tokenizer.model", corpus.texts(split)))
    return {"tokenizer_s": tok_s, "tokenize_s": time.perf_counter() - start - tok_s}


def export(model: MixtralForCausalLM, cfg: TrainConfig, state_dir: Path, directory: Path) -> None:
    """bf16 weights as save_pretrained writes them (per-expert w1/w2/w3), and the tokenizer."""
    if directory.exists():
        shutil.rmtree(directory)
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False   # for inference; the recipe keeps the coefficient
    model.save_pretrained(directory)
    shutil.copyfile(state_dir / "tokenizer.model", directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(corpus_lib.tokenizer_config(cfg.max_position),
                                                                indent=2) + "\n")


def command_line(cfg: TrainConfig, run: dict) -> str:
    return (f"python -m moeedge.train.default_model --out DIR --seed {cfg.seed} --threads {torch.get_num_threads()} "
            f"--dense-steps {run['dense_steps']} --moe-steps {run['moe_steps']}")


def start_or_resume(cfg: TrainConfig, t0: float, state_dir: Path, corpus, meta: dict | None):
    """(meta, run, state, batches): a new run's plan, or a stopped run's record and state."""
    import numpy as np

    timings = prepare(cfg, state_dir, corpus) if meta is None else None
    batches = corpus_lib.Batches(np.load(state_dir / "train_tokens.npy"), cfg.seq_len, cfg.batch, cfg.seed)
    if meta is None:
        if cfg.dense_steps is None:
            print("probing this machine's speed", file=sys.stderr)
        plan = make_plan(cfg, batches, time.monotonic() - t0)
        meta = {"corpus": corpus.summary(), "recipe": cfg.recipe(), "plan": plan, "timings": timings,
                "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (state_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        run = {"phase": "dense", "step": 0, "plan": plan, "dense_steps": plan["dense_steps"],
               "moe_steps": plan["moe_steps"], "log": [], "train_s": 0.0}
        state = None
    else:
        state = torch.load(state_dir / "state.pt", weights_only=True)
        run = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    plan = run["plan"]
    print(f"{plan['source']}: batches of {cfg.batch}x{cfg.seq_len} tokens from {len(batches.stream):,} "
          f"({batches.n_windows:,} windows); steps " + (f"{run['dense_steps']} dense + {run['moe_steps']} MoE"
          if plan["source"] == "given" else f"~{plan['estimated_dense_steps']} dense + "
          f"~{plan['estimated_moe_steps']} MoE at {plan['probe']['moe_tokens_per_s']:,.0f} tokens/s"), file=sys.stderr)
    return meta, run, state, batches


def train_phases(cfg: TrainConfig, run: dict, state: dict | None, batches, state_dir: Path):
    """Dense training, upcycling, then MoE training, from wherever run stopped; the trained
    MoE model, or None if stopped at cfg.stop_after."""
    from safetensors.torch import save_file

    if run["phase"] == "dense":
        model = build(cfg, moe=False, seed=cfg.seed)
        optimizer = make_optimizer(model, cfg)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        if not run_phase("dense", model, optimizer, batches, run, cfg, state_dir):
            return None
        save_file(model.state_dict(), state_dir / "dense.safetensors")
        model = upcycle(model, cfg, cfg.seed)
        optimizer = make_optimizer(model, cfg)
        run["phase"] = "moe"
        save_state(state_dir, run, model, optimizer)
    else:
        model = build(cfg, moe=True, seed=cfg.seed + 1)
        optimizer = make_optimizer(model, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    del state
    if not run_phase("moe", model, optimizer, batches, run, cfg, state_dir):
        return None
    return model


def finish(cfg: TrainConfig, model, run: dict, meta: dict, corpus, batches, t0: float, out: Path,
           state_dir: Path) -> dict:
    """Export, measure (the model card), and publish the trained model; what training.json records."""
    from safetensors.torch import load_file

    staging = state_dir / "final"
    export(model, cfg, state_dir, staging)
    dense = build(cfg, moe=False, seed=cfg.seed)
    dense.load_state_dict(load_file(state_dir / "dense.safetensors"))
    eval_start = time.monotonic()
    figures = model_card.evaluate(staging, dense, state_dir, cfg, run["plan"]["eval_tokens"])
    record = {**meta, "corpus": corpus.manifest(), "dense_steps": run["dense_steps"], "moe_steps": run["moe_steps"],
              "tokens_seen": run["step"] * cfg.batch * cfg.seq_len, "epochs": batches.epochs(run["step"]),
              "log": run["log"], "train_s": run["train_s"], "eval_s": time.monotonic() - eval_start,
              "figures": figures, "versions": model_card.versions(), "reproduce": command_line(cfg, run)}
    record["wall_s_this_session"] = time.monotonic() - t0
    model_card.write(staging, record)
    total = publish(staging, out, MAX_BYTES)
    if not cfg.keep_state:
        shutil.rmtree(state_dir)
    print(f"{out}: {total / 1e6:.1f} MB; held-out perplexity {figures['perplexity']['moe']:.2f} "
          f"(unigram {figures['perplexity']['unigram']:.1f}); {record['wall_s_this_session'] / 60:.1f} minutes",
          file=sys.stderr)
    return record


def train(cfg: TrainConfig) -> dict | None:
    """The whole run; returns what training.json records, or None if stopped at cfg.stop_after."""
    t0 = time.monotonic()
    out, state_dir, corpus, meta, finished = open_run(cfg)
    if finished is not None:
        return finished
    meta, run, state, batches = start_or_resume(cfg, t0, state_dir, corpus, meta)
    model = train_phases(cfg, run, state, batches, state_dir)
    if model is None:
        return None
    return finish(cfg, model, run, meta, corpus, batches, t0, out, state_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeedge.train.default_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the Hugging Face directory to write")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget for the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue OUT/train_state/ (or start if there is none)")
    p.add_argument("--dense-steps", type=int, help="replay a run's step counts (no probe, no clock)")
    p.add_argument("--moe-steps", type=int)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--keep-state", action="store_true", help="keep OUT/train_state/ when done")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: end as a session would
    a = p.parse_args(argv)
    if (a.dense_steps is None) != (a.moe_steps is None):
        p.error("--dense-steps and --moe-steps go together")
    train(TrainConfig(out=a.out, minutes=a.minutes, seed=a.seed, resume=a.resume, threads=a.threads,
                      dense_steps=a.dense_steps, moe_steps=a.moe_steps, keep_state=a.keep_state,
                      stop_after=a.stop_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
