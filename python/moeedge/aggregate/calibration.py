"""Calibration: what the source model does on training text, per MoE layer.

The text comes from the TRAINING split of the default model's corpus (moeedge.train.corpus),
never from the held-out packages that `moeedge eval` scores. The runtime's recorder hook
hands over each MoE layer's input and routing as the model runs. Shapes: N = calibration
tokens, H = hidden, E = experts, K = top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moeedge.derived import record_routing
from moeedge.evaluate import DEFAULT_WINDOW, corpus_windows

DEFAULT_TOKENS = 4096
HELD_OUT_EVERY = 4  # every 4th calibration window is held out from fitting


@dataclass
class LayerCalibration:
    hidden: torch.Tensor     # [N, H] fp32: the (normalised) states entering the MoE layer
    counts: torch.Tensor     # [E] int64: how often the router picked each expert (top-k slots)
    gate_mass: torch.Tensor  # [E] fp64: the sum of each expert's gate weights
    held_out: torch.Tensor   # [N] bool: tokens that methods which fit weights (distill) only measure on


def calibration_windows(tokenizer, n_tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW) -> list[list[int]]:
    return corpus_windows(tokenizer, "train", n_tokens, window)


def held_out_tokens(lengths: list[int]) -> torch.Tensor:
    """[N] bool: whole windows (every HELD_OUT_EVERY-th), so that no held-out token shares a
    window with a fitted one; with fewer windows than that, the last quarter of the tokens."""
    if len(lengths) >= HELD_OUT_EVERY:
        return torch.cat([torch.full((n,), i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) for i, n in enumerate(lengths)])
    n = sum(lengths)
    return torch.arange(n) >= n - n // 4


def gather(model, windows: list[list[int]], progress: bool = False) -> list[LayerCalibration]:
    """Run the loaded source model over the windows; one LayerCalibration per MoE layer."""
    n_experts = model.config.n_experts
    held_out = held_out_tokens([len(w) for w in windows])
    out = []
    for hidden, experts, gates in record_routing(model, windows, progress):
        counts = torch.bincount(experts.flatten(), minlength=n_experts)
        mass = torch.zeros(n_experts, dtype=torch.float64).index_add_(0, experts.flatten(), gates.flatten().double())
        out.append(LayerCalibration(hidden, counts, mass, held_out))
    return out
