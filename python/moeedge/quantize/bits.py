"""`moeedge quantize --per-expert-bits auto`: which experts get 8 bits and which 4.

EdgeMoE's idea: experts differ in how much their output suffers from fewer bits, and in how
often the router uses them. Calibration runs the source model over text from the TRAINING
split of the default model's corpus (moeedge.data.corpus; never the held-out packages
that `moeedge eval` scores) and records, with the runtime's recorder hook, the hidden
state entering each MoE layer and the router's picks. For expert e of a layer, over the
calibration tokens t routed to it with gate g_t:

    err_b(e) = sum_t g_t^2 * |E_b(x_t) - E(x_t)|^2,    E_b: e with b-bit weights, E: as stored
    sensitivity(e) = (err_4(e) - err_8(e)) / sum_t |y_t|^2

where y_t is the layer's output (the gate-weighted sum of its experts) on all calibration
tokens: the share of the layer's output energy that giving e 8 bits instead of 4 removes
as squared error. Summing over routed tokens weights it by router usage; dividing by the
layer's energy makes layers comparable. The most sensitive experts get 8 bits until the
average bits per expert weight reach the target. Shapes: N = calibration tokens, H = hidden,
K = top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moeedge.progress import progress_bar

from moeedge.derived import record_routing
from moeedge.formats.group_quant import dequantize, quantize


@dataclass
class LayerCalibration:
    hidden: torch.Tensor   # [N, H] fp32: the states entering the MoE layer's router
    experts: torch.Tensor  # [N, K] int64: the router's picks
    gates: torch.Tensor    # [N, K] fp32: their gate weights


def gather(model, windows: list[list[int]], progress: bool = False) -> list[LayerCalibration]:
    """Run the loaded model over the windows; what enters each MoE layer and where it goes."""
    return [LayerCalibration(*layer) for layer in record_routing(model, windows, progress)]


def expert_forward(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """An expert's FFN on x [n, H] -> [n, H], fp32."""
    return F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])


def rounded(w: dict[str, torch.Tensor], bits: int, group: int) -> dict[str, torch.Tensor]:
    """The expert's matrices as they come back from `bits`-bit storage."""
    return {role: dequantize(*quantize(m, bits, group), bits, group) for role, m in w.items()}


def layer_sensitivity(calib: LayerCalibration, experts: list[dict[str, torch.Tensor]], group: int) -> list[float]:
    """sensitivity(e) for each expert of one layer (module docstring); experts: fp32 matrices by role."""
    y = torch.zeros_like(calib.hidden)                 # [N, H] the layer's output
    gain = []
    for e, w in enumerate(experts):
        picked = calib.experts == e                   # [N, K]
        tokens = torch.where(picked.any(-1))[0]
        if len(tokens) == 0:
            gain.append(0.0)
            continue
        g = (calib.gates * picked).sum(-1)[tokens, None]   # [n, 1]
        x = calib.hidden[tokens]
        exact = expert_forward(w, x)
        y.index_add_(0, tokens, g * exact)
        err = {b: float(((g * (expert_forward(rounded(w, b, group), x) - exact)) ** 2).sum()) for b in (4, 8)}
        gain.append(err[4] - err[8])
    energy = float((y ** 2).sum())
    return [v / energy if energy > 0 else 0.0 for v in gain]


def choose_bits(sensitivity: list[list[float]], target_bits: float) -> list[list[int]]:
    """8 bits for the most sensitive experts, as many as keep the average at most target_bits
    (all experts have the same number of weights in the supported families)."""
    flat = sorted(((s, layer, e) for layer, row in enumerate(sensitivity) for e, s in enumerate(row)), reverse=True)
    n8 = int((target_bits - 4) / 4 * len(flat) + 1e-9)
    bits = [[4] * len(row) for row in sensitivity]
    for _, layer, e in flat[:n8]:
        bits[layer][e] = 8
    return bits


def measure(calibration: list[LayerCalibration], read_expert, n_experts: int, group: int,
            progress: bool = False) -> list[list[float]]:
    """sensitivity[layer][expert]; read_expert(layer, e) gives an expert's fp32 matrices by role."""
    out = []
    for layer in progress_bar(range(len(calibration)), desc="sensitivity", unit="layer", show=progress):
        experts = [read_expert(layer, e) for e in range(n_experts)]
        out.append(layer_sensitivity(calibration[layer], experts, group))
    return out
