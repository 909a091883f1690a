"""Trace-driven expert-cache simulator: replay a routing trace (moeedge.trace) through
cache policies and a timing model, and compare them against Belady's optimum.

The model of the cache, shared by every policy (moeedge.sim.policies):
- An expert is (layer, expert), one id ``layer * n_experts + expert``; layers count
  MoE layers in execution order (Switch: the encoder's first), as ``ExpertKey`` does.
- Accesses come token by token, within a token layer by layer. A (token, layer) pair
  is a *step*: the layer's distinct experts (-1, a Switch capacity drop, is skipped).
- A step's experts are resident together: the resident ones are got first (hits),
  then the missing ones in ascending expert order, and all stay pinned until the step
  ends, so a miss never evicts an expert of its own step. One access is one
  ``ExpertCache.get``; replaying a trace through the native cache with each step's
  buffers held until the step ends gives the simulator's counts exactly (lru, lfu,
  score). A cache must hold one step's experts (top-k). (The runtime pins one expert
  at a time while it computes; holding the step's experts is the simple convention
  that keeps a layer's hits independent of the order of its gets.)
- Every miss inserts (demand paging, no bypass); capacity counts experts, in one
  cache shared by all layers or, per layer, in one cache per layer.

A Switch trace is simulated as its encoder tokens (encoder layers) followed by its
decoder tokens (decoder layers).

Import the machinery from its modules: numba loads only where it is used
(``moeedge.sim.policies.simulate``, ``moeedge.sim.timing.stall_per_token``).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeedge.policies import PICK_RATE_ALPHA, PREDICTED_DISCOUNT  # noqa: F401 (the simulator's, too)
from moeedge.policies import SIM_POLICIES as POLICIES  # see moeedge.sim.policies

_ITEMSIZE = {"torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2}


@dataclass
class Trace:
    """A routing trace as steps.

    step_keys  int64 [S, k]: each step's distinct expert ids (layer * n_experts + expert),
               ascending, padded with -1 at the end; S = sum over tokens of their layers
    step_layer int64 [S]: the MoE layer of each step
    step_token int64 [S]: the token of each step (encoder tokens first for Switch)
    """

    step_keys: np.ndarray
    step_layer: np.ndarray
    step_token: np.ndarray
    n_layers: int
    n_experts: int
    expert_bytes: int | None = None  # from the trace's model_config when it says; None if unknown
    source: str = ""

    @property
    def n_keys(self) -> int:
        return self.n_layers * self.n_experts

    @property
    def n_tokens(self) -> int:
        return int(self.step_token[-1]) + 1 if len(self.step_token) else 0

    @property
    def n_accesses(self) -> int:
        return int((self.step_keys >= 0).sum())

    @property
    def top_k(self) -> int:
        return self.step_keys.shape[1]

    @property
    def step_size(self) -> int:
        """The most experts one step uses: what a cache must hold at least."""
        return int((self.step_keys >= 0).sum(axis=1).max(initial=0))

    def tokens(self, start: int, stop: int | None = None) -> Trace:
        """The steps of tokens [start, stop), renumbered from 0."""
        lo, hi = np.searchsorted(self.step_token, [start, self.n_tokens if stop is None else stop])
        return Trace(self.step_keys[lo:hi], self.step_layer[lo:hi], self.step_token[lo:hi] - start,
                     self.n_layers, self.n_experts, self.expert_bytes, self.source)


def _steps(experts: np.ndarray, layer0: int, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, L, k] expert indices -> [T*L, k] sorted distinct keys (-1 padded last), [T*L] layers."""
    t, n_layers, k = experts.shape
    e = np.sort(experts.astype(np.int64), axis=2)
    e[:, :, 1:][e[:, :, 1:] == e[:, :, :-1]] = -1  # a repeated expert counts once
    layers = layer0 + np.arange(n_layers, dtype=np.int64)
    pad = np.iinfo(np.int64).max
    keys = np.sort(np.where(e >= 0, layers[None, :, None] * n_experts + e, pad), axis=2)
    keys[keys == pad] = -1
    return keys.reshape(t * n_layers, k), np.tile(layers, t)


def from_experts(experts: np.ndarray, n_experts: int | None = None,
                 experts_encoder: np.ndarray | None = None, expert_bytes: int | None = None,
                 source: str = "") -> Trace:
    """A Trace from arrays shaped like a trace file's (int [tokens, moe_layers, k], -1 = none)."""
    parts = [p for p in (experts_encoder, experts) if p is not None]
    for p in parts:
        if p.ndim != 3 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"{source or 'trace'}: experts must be an integer array [tokens, layers, k], "
                             f"got {p.dtype} {list(p.shape)}")
        if p.size and p.min() < -1:
            raise ValueError(f"{source or 'trace'}: expert indices below -1")
    top = max((int(p.max()) for p in parts if p.size), default=-1)
    n_experts = top + 1 if n_experts is None else int(n_experts)
    if top >= n_experts or n_experts < 1:
        raise ValueError(f"{source or 'trace'}: expert index {top} out of range for {n_experts} experts")
    k = max(p.shape[2] for p in parts)
    keys, layers, tokens, layer0, token0 = [], [], [], 0, 0
    for p in parts:
        p = np.pad(p, ((0, 0), (0, 0), (0, k - p.shape[2])), constant_values=-1)
        sk, sl = _steps(p, layer0, n_experts)
        keys.append(sk)
        layers.append(sl)
        tokens.append(token0 + np.repeat(np.arange(p.shape[0], dtype=np.int64), p.shape[1]))
        layer0, token0 = layer0 + p.shape[1], token0 + p.shape[0]
    return Trace(np.ascontiguousarray(np.concatenate(keys)), np.concatenate(layers), np.concatenate(tokens),
                 layer0, n_experts, expert_bytes, source)


def expert_bytes_from_config(model_config: str) -> int | None:
    """Bytes of one expert from a trace's model_config JSON (None when it cannot say).
    GGUF-quantized experts are smaller than this: pass --expert-bytes for them."""
    try:
        cfg = json.loads(model_config)
        itemsize = _ITEMSIZE[str(cfg["dtype"])]
        if "expert_intermediate" in cfg:  # Mixtral, Qwen2-MoE, OLMoE: gate, up, down
            return 3 * int(cfg["hidden"]) * int(cfg["expert_intermediate"]) * itemsize
        return 2 * int(cfg["hidden"]) * int(cfg["ff"]) * itemsize  # Switch: wi, wo
    except (ValueError, KeyError, TypeError):
        return None


def load_trace(path: str | Path) -> Trace:
    """Read a routing trace .npz; ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a routing trace (.npz): {reason}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a routing trace: a single .npy array, not an .npz archive")
    try:
        with data:
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a routing trace (.npz): {e}") from None
    if "experts" not in arrays:
        raise ValueError(f"{path}: not a routing trace: no 'experts' array")
    n_experts = int(arrays["n_experts"]) if "n_experts" in arrays else None
    expert_bytes = expert_bytes_from_config(str(arrays["model_config"])) if "model_config" in arrays else None
    trace = from_experts(arrays["experts"], n_experts, arrays.get("experts_encoder"), expert_bytes, str(path))
    if trace.n_accesses == 0:
        raise ValueError(f"{path}: the trace has no expert accesses")
    return trace
