"""What moeedge's trainers share: the learning-rate schedule whose length the clock
fixes mid-run, the step clock, AdamW, checkpoints in OUT/train_state/ and the final move
into OUT.

A trainer's config is any dataclass with the fields these read (lr, min_lr,
decay_percent, weight_decay, resume) and a recipe() method: the settings a resumed run
must share with the run it continues.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging
from moeedge.data import corpus as corpus_lib

# -- schedule ----------------------------------------------------------------------------
# Warm up, hold, and decay over the last decay_percent of the steps. The step count may be
# fixed late: the learning rate before the decay starts does not depend on it.


def decay_start(n_steps: int, cfg) -> int:
    return n_steps * (100 - cfg.decay_percent) // 100


def steps_if_decaying_after(done: int, cfg) -> int:
    """The fewest phase steps whose decay starts no earlier than step `done`."""
    return -(-done * 100 // (100 - cfg.decay_percent))


def lr_at(s: int, n_steps: int | None, peak: float, warmup: int, cfg) -> float:
    """Step s of a phase of n_steps (None: not fixed yet, so not decaying yet)."""
    lr = peak * min(1.0, (s + 1) / warmup)
    if n_steps is not None and s >= decay_start(n_steps, cfg):
        start = decay_start(n_steps, cfg)
        frac = (s - start + 1) / (n_steps - start)
        lr = cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr


class StepClock:
    """Seconds per step over the last few steps: when to start a phase's decay."""

    def __init__(self, window: int = 10):
        self.times: list[float] = []
        self.window = window

    def add(self, seconds: float) -> None:
        self.times = (self.times + [seconds])[-self.window:]

    def per_step(self) -> float:
        return sum(self.times) / len(self.times)


def length_if_due(done: int, left_s: float, clock: StepClock, cfg) -> int | None:
    """The phase's step count once its decay must start for it to end within left_s
    seconds (at the clock's current speed); None while there is time to keep going."""
    n = max(done + 1, steps_if_decaying_after(done, cfg))
    if left_s <= 0 or (len(clock.times) >= 3 and (n - done) * clock.per_step() >= left_s):
        return n
    return None


# -- losses ------------------------------------------------------------------------------

def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """The Switch Transformer's load-balancing loss of each layer, E * sum_i f_i * P_i
    (f: share of the top-k assignments, P: mean router probability), averaged over
    layers: 1.0 when every layer is balanced. transformers' own pools all layers'
    counts first, which lets each layer collapse onto different experts unpenalised."""
    losses = []
    for logits in router_logits:                                  # [N, E] per layer
        probs = logits.float().softmax(-1)
        top = probs.topk(top_k, dim=-1).indices                   # [N, K]
        share = torch.bincount(top.flatten(), minlength=probs.shape[1]).float() / top.numel()
        losses.append(probs.shape[1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# -- optimiser and checkpoints -----------------------------------------------------------

def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]    # norms
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def save_state(state_dir: Path, run: dict, model, optimizer) -> None:
    tmp = state_dir / "state.pt.tmp"
    torch.save({**run, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, state_dir / "state.pt")


def open_run(cfg) -> tuple[Path, Path, object, dict | None, dict | None]:
    """How every trainer starts: threads, directories, the corpus and any saved state.
    Returns (out, state_dir, corpus, meta or None for a fresh run, the record of a run
    that already finished, or None)."""
    hf_logging.disable_progress_bar()   # one progress bar: training's
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    out, state_dir = Path(cfg.out), Path(cfg.out) / "train_state"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume and not (state_dir / "state.pt").is_file() and (out / "training.json").is_file():
        print(f"{out}: finished already; nothing to resume", file=sys.stderr)
        return out, state_dir, None, None, json.loads((out / "training.json").read_text())
    corpus = corpus_lib.collect(held_out=cfg.held_out, limit=cfg.limit_files)
    meta = open_state(cfg, state_dir, corpus)
    print(f"corpus: {corpus.python_version}, {len(corpus.split('train'))} training files, "
          f"{len(corpus.split('heldout'))} held out ({', '.join(cfg.held_out)}), sha256 {corpus.sha256()[:16]}",
          file=sys.stderr)
    return out, state_dir, corpus, meta, None


def open_state(cfg, state_dir: Path, corpus) -> dict | None:
    """The run's meta.json if resuming one; refuses a different corpus or recipe."""
    if not (state_dir / "state.pt").is_file():
        if cfg.resume and state_dir.exists():
            print(f"{state_dir}: no checkpoint yet; starting from scratch", file=sys.stderr)
        shutil.rmtree(state_dir, ignore_errors=True)
        return None
    if not cfg.resume:
        raise SystemExit(f"{state_dir} holds an unfinished run: pass --resume to continue it, or remove it")
    meta = json.loads((state_dir / "meta.json").read_text())
    if meta["corpus"]["sha256"] != corpus.sha256():
        raise SystemExit(f"{state_dir}: the run was trained on corpus {meta['corpus']['sha256'][:12]}, this Python's "
                         f"is {corpus.sha256()[:12]} ({corpus.python_version})")
    if meta["recipe"] != json.loads(json.dumps(cfg.recipe())):
        raise SystemExit(f"{state_dir}: the run used another recipe: {meta['recipe']}")
    return meta


def publish(staging: Path, out: Path, max_bytes: int | None = None) -> int:
    """Move the finished files into OUT, config.json last (moeedge loads OUT once it is there)."""
    names = sorted(p.name for p in staging.iterdir() if p.name != "config.json") + ["config.json"]
    total = sum((staging / n).stat().st_size for n in names)
    if max_bytes is not None and total > max_bytes:
        raise SystemExit(f"{staging}: {total / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB the package allows")
    (out / "config.json").unlink(missing_ok=True)
    for n in names:
        os.chmod(staging / n, 0o644)   # safetensors writes 0600
        os.replace(staging / n, out / n)
    return total
