"""Expert prediction: which experts the next MoE layers will need (moeedge.predict.predictors),
measured on held-out traces (metrics) and used by the runtime to prefetch.

Predictors: "frequency" (usage prior, the baseline), "previous" (the previous token's
experts), "stale-gate" (the next layers' routers on this layer's input), "history"
(activation-matrix matching, MoE-Infinity), "learned" (small MLPs, SiDA/ProMoE).
The last two, and the prior, come from a predictor file trained on a trace
(moeedge.predict.bundle; `moeedge predict train`).
"""
from __future__ import annotations

import torch

from moeedge.formats.quant_tensor import QuantTensor
from moeedge.predict.predictors import FrequencyPrior, Predictor, PreviousToken, StaleGate

PREDICTORS = ("frequency", "previous", "stale-gate", "history", "learned")
NEEDS_FILE = ("frequency", "history", "learned")


def router_weights(cfg, dense: dict) -> list[torch.Tensor]:
    """Each MoE layer's router [E, H], as fp32."""
    block = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"

    def fp32(t):
        return t.dequantize(torch.float32) if isinstance(t, QuantTensor) else t.float()

    return [fp32(dense[f"model.layers.{layer}.{block}.gate.weight"]) for layer in cfg.moe_layers]


def make_predictor(name: str, cfg, dense: dict, bundle=None) -> Predictor:
    """A predictor by name for a decoder model; `bundle` (moeedge.predict.bundle) is needed
    for the trace-trained ones."""
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")
    if name in NEEDS_FILE and bundle is None:
        raise ValueError(f"predictor {name!r} is trained on a trace and this model has no predictor file: "
                         f"train one with `moeedge predict train`, or use 'stale-gate'")
    prior = bundle.prior if bundle is not None else torch.ones(len(cfg.moe_layers), cfg.n_experts)
    if name == "frequency":
        return FrequencyPrior(prior)
    if name == "previous":
        return PreviousToken(prior)
    if name == "stale-gate":
        return StaleGate(prior, router_weights(cfg, dense))
    if name == "history":
        return bundle.history
    return bundle.learned
