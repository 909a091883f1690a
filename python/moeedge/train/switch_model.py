"""Train a Switch Transformers model from scratch, in one command:

    python -m moeedge.train.switch_model --out DIR [--minutes 45] [--seed 0] [--resume]

transformers' SwitchTransformersForConditionalGeneration (d_model 256, 4 encoder + 4
decoder blocks, every other block sparse with 32 experts, top-1 routing, a fixed expert
capacity per sequence) trained as Switch was: from scratch, with T5's span corruption
(15% of the tokens in spans of mean length 3, each span replaced by a sentinel), the
router z-loss and the load-balancing loss, Switch's reduced initialisation scale (0.1),
on the same CPython standard-library corpus as the default model.

The clock fixes the step count as in the default model's trainer (moeedge.train.common):
a speed probe gives the training a time budget within --minutes; the learning rate
decays over the last 15% of the steps, starting when it must for the run to end in time,
and --steps replays a run's count with no probe and no clock. Deterministic given the
seed, the step count and the thread count: batches and their corruption are functions of
(seed, step), and training draws no other random numbers (no dropout, no router jitter).
OUT/train_state/ holds a checkpoint every few minutes for --resume. OUT ends as a
transformers directory (fp32 weights, a tokenizer.model with the sentinels as its last
pieces, the model card), config.json last. span_corruption.py makes the examples,
switch_card.py the figures and the card.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from moeedge.data import corpus as corpus_lib
from moeedge.train import model_card, switch_card
from moeedge.train.common import StepClock, balance_loss, length_if_due, lr_at, open_run, publish, save_state
from moeedge.data.span_corruption import (EOS_ID, PAD_ID, TOKENIZER_FILE, SpanBatches, SpanCorruption, encode_stream,
                                           shift_right, tokenizer_config, train_tokenizer)


@dataclass
class SwitchTrainConfig:
    out: Path
    minutes: float = 45.0
    seed: int = 0
    resume: bool = False
    threads: int = 0                  # 0: every core
    # model
    d_model: int = 256
    d_kv: int = 64
    n_heads: int = 4
    d_ff: int = 1024                  # of the dense blocks and of every expert
    n_layers: int = 4                 # per stack
    n_experts: int = 32
    capacity_factor: float = 1.25     # expert capacity: this times an encoder input's tokens / n_experts
    vocab: int = 4096                 # sentencepiece pieces + sentinels
    n_sentinels: int = 100            # <extra_id_0> is the last id, as in T5
    init_scale: float = 0.1           # Switch's reduced initialisation scale (of each matrix's variance)
    # span corruption
    seq_len: int = 256                # corpus tokens per example, before corruption
    noise_density: float = 0.15
    mean_span: float = 3.0
    # optimiser
    batch: int = 16
    steps: int | None = None          # None: fixed by the clock to fit `minutes`
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    decay_percent: int = 15
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_lr_scale: float = 0.1      # the routers' learning rate, relative to the rest
    router_z_loss_coef: float = 1e-3  # per MoE layer, summed over layers as Switch and ST-MoE add them
    router_aux_loss_coef: float = 1e-2
    # bookkeeping
    held_out: tuple[str, ...] = corpus_lib.HELD_OUT
    limit_files: int | None = None    # first N files of each split (tests)
    eval_examples: int = 512          # held-out windows, spread over the whole split
    checkpoint_minutes: float = 3.0
    stop_after: int | None = None     # stop after this step, as a session that ends would
    keep_state: bool = False

    def recipe(self) -> dict:
        skip = {"out", "resume", "stop_after", "keep_state", "minutes", "steps"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @property
    def corruption(self) -> SpanCorruption:
        return SpanCorruption(self.seq_len, self.noise_density, self.mean_span, self.vocab)

    @property
    def expert_capacity(self) -> int:
        return math.ceil(self.capacity_factor * self.corruption.input_length / self.n_experts)


# -- model and step ----------------------------------------------------------------------

def switch_config(cfg: SwitchTrainConfig) -> SwitchTransformersConfig:
    return SwitchTransformersConfig(
        vocab_size=cfg.vocab, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.n_heads,
        num_layers=cfg.n_layers, num_decoder_layers=cfg.n_layers, num_experts=cfg.n_experts,
        num_sparse_encoder_layers=cfg.n_layers // 2, num_sparse_decoder_layers=cfg.n_layers // 2,  # every other block
        expert_capacity=cfg.expert_capacity, router_z_loss_coef=cfg.router_z_loss_coef,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        # transformers' jitter multiplies the router's input in place, which in fp32 is the
        # experts' input too. Without it and dropout, training draws no random numbers.
        router_jitter_noise=0.0, dropout_rate=0.0, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID, dtype="float32")


def build(cfg: SwitchTrainConfig, seed: int) -> SwitchTransformersForConditionalGeneration:
    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(switch_config(cfg))
    reduce_init(model, cfg.init_scale)
    return model


@torch.no_grad()
def reduce_init(model: SwitchTransformersForConditionalGeneration, scale: float) -> None:
    """Switch's initialisation (Fedus et al. 2021, section 2.4): T5's, as transformers draws
    it (unit-variance embeddings, matrices of variance 1/fan-in, the query's also divided by
    d_kv), with each matrix's variance cut to `scale` times that. The embeddings and norms
    keep T5's scale; transformers' initializer_factor would shrink them too. Two of
    transformers' draws differ from T5's and are redone: routers (std 1: routing one-hot
    from the start) and experts' wo (1/d_model where a dense wo has 1/d_ff)."""
    d_model, d_ff = model.config.d_model, model.config.d_ff
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":   # lm_head is the embedding, tied
            module.weight.mul_(math.sqrt(scale))
    for name, module in model.named_modules():
        if name.endswith(".mlp.router"):
            module.classifier.weight.normal_(0.0, math.sqrt(scale / d_model))
        if name.endswith(".mlp.experts"):
            for expert in module.values():
                expert.wo.weight.normal_(0.0, math.sqrt(scale / d_ff))


def router_logits(out) -> list[torch.Tensor]:
    """[N, E] router logits of every sparse layer, encoder first, as moeedge numbers them."""
    return [logits.flatten(0, 1) for logits in out.encoder_router_logits + out.decoder_router_logits]


def z_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss (mean squared log-partition), averaged over layers: keeps logits small."""
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).square().mean() for lg in logits]).mean()


def make_optimizer(model, cfg: SwitchTrainConfig) -> torch.optim.AdamW:
    """AdamW; the routers at router_lr_scale of the learning rate. Adam moves every weight
    by about the learning rate a step whatever its size: a router drawn at std 0.02 would
    change by a tenth each step; at the full rate the balance loss went from 1.0 to 5.9 in
    30 steps here (most tokens on a few experts), at a tenth it came back to 1.06 by step
    40. Switch trained with Adafactor, whose steps scale with each weight's size."""
    routers = [p for name, p in model.named_parameters() if ".router." in name]
    rest = [p for name, p in model.named_parameters() if ".router." not in name]
    return torch.optim.AdamW([
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},    # norms
        {"params": routers, "weight_decay": cfg.weight_decay, "lr_scale": cfg.router_lr_scale}],
        lr=cfg.lr, betas=(0.9, 0.95))


def train_step(model, optimizer, batch: tuple[torch.Tensor, torch.Tensor], lr: float,
               cfg: SwitchTrainConfig) -> dict:
    """One optimiser step; returns the cross-entropy per target token and the two router
    losses averaged over the MoE layers (balance: 1.0 when every layer is balanced)."""
    inputs, targets = batch                                        # [B, Ti], [B, Tt]
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    out = model(input_ids=inputs, decoder_input_ids=shift_right(targets), output_router_logits=True)
    ce = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    routers = router_logits(out)
    aux, z = balance_loss(routers, top_k=1), z_loss(routers)
    (ce + len(routers) * (cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": ce.item(), "aux": aux.item(), "z": z.item()}


# -- probe and plan ----------------------------------------------------------------------

# Evaluation: forward passes over the held-out examples (model, averaged experts) and a
# quarter as many training examples. A forward pass is about a third of a training step.
EVAL_PASSES = 2.25
EVAL_SPEEDUP = 3.0
EVAL_FIXED_S = 60.0   # export (fp32), loading it twice, moeedge's check and sample


def probe(cfg: SwitchTrainConfig, batches: SpanBatches, steps: int = 2) -> dict:
    """Seconds per step on this machine (a throwaway model of the same shapes)."""
    model = build(cfg, seed=cfg.seed + 99).train()
    optimizer = make_optimizer(model, cfg)
    train_step(model, optimizer, batches.get(0), 1e-4, cfg)        # warm-up: allocations, thread pools
    start = time.perf_counter()
    for s in range(steps):
        train_step(model, optimizer, batches.get(s + 1), 1e-4, cfg)
    s_per_step = (time.perf_counter() - start) / steps
    return {"s_per_step": s_per_step, "tokens_per_s": cfg.batch * cfg.seq_len / s_per_step}


def make_plan(cfg: SwitchTrainConfig, batches: SpanBatches, spent_s: float) -> dict:
    """The step count if given; otherwise the time budget the clock fixes it by."""
    if cfg.steps is not None:
        return {"source": "given", "steps": cfg.steps, "eval_examples": cfg.eval_examples}
    start = time.monotonic()
    speed = probe(cfg, batches)
    spent_s += time.monotonic() - start
    budget_s = 0.92 * cfg.minutes * 60   # the rest: slack for a machine that slows down mid-decay
    eval_tps = EVAL_SPEEDUP * speed["tokens_per_s"]
    # A short budget evaluates fewer examples rather than train for nothing.
    eval_examples = min(cfg.eval_examples, int(0.06 * budget_s * eval_tps / EVAL_PASSES / cfg.seq_len))
    eval_examples = max(16, eval_examples)
    eval_s = EVAL_PASSES * eval_examples * cfg.seq_len / eval_tps + EVAL_FIXED_S
    train_s = budget_s - spent_s - eval_s
    if train_s < 20 * speed["s_per_step"]:
        raise SystemExit(f"--minutes {cfg.minutes:g} leaves no time to train here "
                         f"({speed['tokens_per_s']:.0f} tokens/s; evaluation alone takes ~{eval_s:.0f} s)")
    return {"source": f"clock, {cfg.minutes:g} minutes", "steps": None, "budget_s": budget_s,
            "before_training_s": spent_s, "eval_examples": eval_examples,
            "estimated_steps": int(train_s / speed["s_per_step"]), "probe": speed}


def time_left(plan: dict, run: dict, step_s: float, cfg: SwitchTrainConfig) -> float:
    """Training seconds left, keeping room for the evaluation at the machine's speed now."""
    eval_tps = EVAL_SPEEDUP * cfg.batch * cfg.seq_len / step_s
    eval_s = EVAL_PASSES * plan["eval_examples"] * cfg.seq_len / eval_tps + EVAL_FIXED_S
    return plan["budget_s"] - plan["before_training_s"] - eval_s - run["train_s"]


# -- training ----------------------------------------------------------------------------

def run_training(model, optimizer, batches: SpanBatches, run: dict, cfg: SwitchTrainConfig, state_dir: Path) -> bool:
    """Train the remaining steps; False if stopped at cfg.stop_after. `run` holds the step,
    the step count (None until the clock fixes it), the log and the training seconds."""
    from tqdm import tqdm

    model.train()
    plan, tokens = run["plan"], cfg.batch * cfg.seq_len
    clock, smooth, last_save = StepClock(), None, time.monotonic()
    bar = tqdm(total=run["steps"] or plan.get("estimated_steps"), initial=run["step"], desc="switch", unit="step",
               dynamic_ncols=True, file=sys.stderr)
    while run["steps"] is None or run["step"] < run["steps"]:
        start = time.perf_counter()
        lr = lr_at(run["step"], run["steps"], cfg.lr, cfg.warmup_steps, cfg)
        losses = train_step(model, optimizer, batches.get(run["step"]), lr, cfg)
        run["step"] = done = run["step"] + 1
        step_s = time.perf_counter() - start
        run["train_s"] += step_s
        clock.add(step_s)
        if run["steps"] is None:  # fix the length once the decay must start to end in time
            run["steps"] = length_if_due(done, time_left(plan, run, clock.per_step(), cfg), clock, cfg)
            bar.total = run["steps"] or bar.total
        smooth = losses["loss"] if smooth is None else 0.95 * smooth + 0.05 * losses["loss"]
        if done % 10 == 0 or done == run["steps"]:
            run["log"].append({"step": done, **{k: round(v, 4) for k, v in losses.items()}, "lr": lr,
                               "tokens_per_s": round(tokens / step_s)})
        stop = done == cfg.stop_after
        if done == run["steps"] or stop or time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
            save_start = time.perf_counter()
            save_state(state_dir, run, model, optimizer)
            run["train_s"] += time.perf_counter() - save_start
            last_save = time.monotonic()
        bar.set_postfix_str(f"loss {smooth:.3f} aux {losses['aux']:.3f} z {losses['z']:.2f} lr {lr:.1e} "
                            f"{tokens / step_s:,.0f} tok/s")
        bar.update(1)
        if stop:
            bar.close()
            return False
    bar.close()
    return True


# -- the whole run -----------------------------------------------------------------------

def prepare(cfg: SwitchTrainConfig, state_dir: Path, corpus: corpus_lib.Corpus) -> dict:
    """Tokenizer and token streams, made once and kept in train_state/."""
    state_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_tokenizer(corpus.texts("train"), cfg.vocab, cfg.n_sentinels, state_dir / TOKENIZER_FILE)
    tok_s = time.perf_counter() - start
    for split in corpus_lib.SPLITS:
        np.save(state_dir / f"{split}_tokens.npy", encode_stream(state_dir / TOKENIZER_FILE, corpus.texts(split)))
    return {"tokenizer_s": tok_s, "tokenize_s": time.perf_counter() - start - tok_s}


def export(model, cfg: SwitchTrainConfig, state_dir: Path, directory: Path) -> None:
    """fp32 weights as save_pretrained writes them, and the tokenizer. fp32 because
    moeedge's Switch runner computes in the weights' dtype: bf16 weights would make it
    compute in bf16, and its logits would no longer be transformers' (nor the card's)."""
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory)
    shutil.copyfile(state_dir / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    config = tokenizer_config(cfg.corruption.input_length)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def command_line(cfg: SwitchTrainConfig, run: dict) -> str:
    return (f"python -m moeedge.train.switch_model --out DIR --seed {cfg.seed} --threads {torch.get_num_threads()} "
            f"--steps {run['steps']}")


def start_run(cfg: SwitchTrainConfig, corpus: corpus_lib.Corpus, batches: SpanBatches, state_dir: Path,
              timings: dict, spent_s: float) -> tuple[dict, dict]:
    """A new run's meta.json and run state (a plan, step 0)."""
    if cfg.steps is None:
        print("probing this machine's speed", file=sys.stderr)
    plan = make_plan(cfg, batches, spent_s)
    meta = {"corpus": corpus.summary(), "recipe": cfg.recipe(), "plan": plan, "timings": timings,
            "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    (state_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta, {"step": 0, "steps": plan["steps"], "plan": plan, "log": [], "train_s": 0.0}


def train(cfg: SwitchTrainConfig) -> dict | None:
    """The whole run; returns what training.json records, or None if stopped at cfg.stop_after."""
    t0 = time.monotonic()
    out, state_dir, corpus, meta, finished = open_run(cfg)
    if finished is not None:
        return finished
    timings = prepare(cfg, state_dir, corpus) if meta is None else None
    batches = SpanBatches(np.load(state_dir / "train_tokens.npy"), cfg.corruption, cfg.batch, cfg.seed)
    model = build(cfg, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg)
    if meta is None:
        meta, run = start_run(cfg, corpus, batches, state_dir, timings, time.monotonic() - t0)
    else:
        state = torch.load(state_dir / "state.pt", weights_only=True)
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        run = state
    plan, c = run["plan"], cfg.corruption
    print(f"{plan['source']}: batches of {cfg.batch} windows of {cfg.seq_len} tokens ({c.input_length} in, "
          f"{c.target_length} out, expert capacity {cfg.expert_capacity}) from {len(batches.windows.stream):,}; "
          + (f"{run['steps']} steps" if plan["source"] == "given" else
             f"~{plan['estimated_steps']} steps at {plan['probe']['tokens_per_s']:,.0f} tokens/s"), file=sys.stderr)
    if not run_training(model, optimizer, batches, run, cfg, state_dir):
        return None
    del optimizer

    staging = state_dir / "final"
    export(model, cfg, state_dir, staging)
    del model
    eval_start = time.monotonic()
    figures = switch_card.evaluate(staging, state_dir, cfg, plan["eval_examples"])
    record = {**meta, "corpus": corpus.manifest(), "steps": run["steps"], "expert_capacity": cfg.expert_capacity,
              "input_length": c.input_length, "target_length": c.target_length,
              "tokens_seen": run["steps"] * cfg.batch * cfg.seq_len, "epochs": batches.windows.epochs(run["steps"]),
              "log": run["log"], "train_s": run["train_s"], "eval_s": time.monotonic() - eval_start,
              "figures": figures, "versions": model_card.versions(), "reproduce": command_line(cfg, run)}
    record["wall_s_this_session"] = time.monotonic() - t0
    model_card.write(staging, record, switch_card.render)
    total = publish(staging, out)
    if not cfg.keep_state:
        shutil.rmtree(state_dir)
    loss = figures["loss"]
    print(f"{out}: {total / 1e6:.1f} MB; held-out span-corruption loss {loss['model']['loss']:.3f} "
          f"(unigram {loss['unigram']['loss']:.3f}), accuracy {100 * loss['model']['accuracy']:.1f}%; "
          f"{record['wall_s_this_session'] / 60:.1f} minutes", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeedge.train.switch_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the transformers directory to write")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget for the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue OUT/train_state/ (or start if there is none)")
    p.add_argument("--steps", type=int, help="replay a run's step count (no probe, no clock)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--keep-state", action="store_true", help="keep OUT/train_state/ when done")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: end as a session would
    a = p.parse_args(argv)
    train(SwitchTrainConfig(out=a.out, minutes=a.minutes, seed=a.seed, resume=a.resume, threads=a.threads,
                            steps=a.steps, keep_state=a.keep_state, stop_after=a.stop_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
