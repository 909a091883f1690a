"""Calibration: what the source model does on training text, per MoE layer.

The text comes from the TRAINING split of the default model's corpus (moeedge.data.corpus),
never from the held-out packages that `moeedge eval` scores. The runtime's recorder hook
hands over each MoE layer's input and routing as the model runs. A Switch model runs the
same windows span-corrupted as its trainer corrupts them (moeedge.data.span_corruption),
without the </s> that ends each file (its trainer streams files back to back); its
encoder layers see the corrupted inputs, its decoder layers the teacher-forced targets.
Shapes: N = calibration tokens, H = hidden, E = experts, K = top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from moeedge.progress import progress_bar

from moeedge.derived import record_routing
from moeedge.evaluate import DEFAULT_WINDOW, MEAN_SPAN, NOISE_DENSITY, corpus_windows
from moeedge.data.span_corruption import SpanCorruption, shift_right

DEFAULT_TOKENS = 4096
HELD_OUT_EVERY = 4  # every 4th calibration window is held out from fitting
SWITCH_SEED = 0     # the calibration windows' corruption (the held-out evaluation uses its own)


@dataclass
class LayerCalibration:
    hidden: torch.Tensor     # [N, H] fp32: the (normalised) states entering the MoE layer
    counts: torch.Tensor     # [E] int64: how often the router picked each expert (top-k slots)
    gate_mass: torch.Tensor  # [E] fp64: the sum of each expert's gate weights
    held_out: torch.Tensor   # [N] bool: tokens that methods which fit weights (distill) only measure on
    segments: list[int] | None = None  # Switch: tokens of each forward call, in order (capacity counts per call)


def calibration_windows(tokenizer, n_tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW) -> list[list[int]]:
    return corpus_windows(tokenizer, "train", n_tokens, window)


def calibration_examples(tokenizer, vocab: int, n_tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A Switch model's calibration: (inputs [Ti], targets [Tt]) per training-split window."""
    rng = np.random.default_rng(SWITCH_SEED)
    out = []
    for w in calibration_windows(tokenizer, n_tokens, window):
        ids = np.asarray([t for t in w if t not in tokenizer.eos_ids])
        if len(ids) >= 2:
            corruption = SpanCorruption(len(ids), NOISE_DENSITY, MEAN_SPAN, vocab)
            out.append(tuple(torch.from_numpy(t) for t in corruption.apply(ids, corruption.noise_mask(rng))))
    return out


def held_out_tokens(lengths: list[int]) -> torch.Tensor:
    """[N] bool: whole windows (every HELD_OUT_EVERY-th), so that no held-out token shares a
    window with a fitted one; with fewer windows than that, the last quarter of the tokens."""
    if len(lengths) >= HELD_OUT_EVERY:
        return torch.cat([torch.full((n,), i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) for i, n in enumerate(lengths)])
    n = sum(lengths)
    return torch.arange(n) >= n - n // 4


def gather(model, windows: list[list[int]], progress: bool = False) -> list[LayerCalibration]:
    """Run the loaded source model over the windows; one LayerCalibration per MoE layer."""
    return from_routing(record_routing(model, windows, progress), model.config.n_experts, [len(w) for w in windows])


def from_routing(routing: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_experts: int,
                 lengths: list[int]) -> list[LayerCalibration]:
    """One LayerCalibration per MoE layer from moeedge.derived.record_routing's (hidden,
    experts, gates) over windows of these lengths."""
    held_out = held_out_tokens(lengths)
    out = []
    for hidden, experts, gates in routing:
        counts = torch.bincount(experts.flatten(), minlength=n_experts)
        mass = torch.zeros(n_experts, dtype=torch.float64).index_add_(0, experts.flatten(), gates.flatten().double())
        out.append(LayerCalibration(hidden, counts, mass, held_out))
    return out


def gather_switch(model, examples: list[tuple[torch.Tensor, torch.Tensor]], progress: bool = False
                  ) -> list[LayerCalibration]:
    """Run a loaded Switch model over (inputs, targets) pairs; one LayerCalibration per MoE layer.
    Counts and gate mass are over the tokens each expert took (capacity drops the rest)."""
    n_experts = model.config.n_experts
    seen: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(model.config.moe_layers)]

    def record(layer: int, experts: torch.Tensor, gates: torch.Tensor, x: torch.Tensor) -> None:
        seen[layer].append((x.float().clone(), experts[:, 0].clone(), gates[:, 0].float().clone()))

    with model.recording(record):
        for inputs, targets in progress_bar(examples, desc="calibration", unit="window", show=progress):
            model.logits(inputs.tolist(), shift_right(targets[None])[0].tolist())
    out = []
    for calls in seen:
        hidden, experts, gates = (torch.cat(parts) for parts in zip(*calls))
        took = experts >= 0
        counts = torch.bincount(experts[took], minlength=n_experts)
        mass = torch.zeros(n_experts, dtype=torch.float64).index_add_(0, experts[took], gates[took].double())
        segments = [len(x) for x, _, _ in calls]
        out.append(LayerCalibration(hidden, counts, mass, held_out_tokens(segments), segments))
    return out
