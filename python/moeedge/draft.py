"""The draft model of speculative decoding: an aggregated variant of the same checkpoint
(`moeedge aggregate`, e.g. --method merge --experts-per-layer 1) that shares the target's
dense weights in memory (the same tensors, not a copy: aggregation leaves them as they
were) and holds its own few experts, all resident, in a cache of its own, and its own KV slot.

The draft only proposes: the full model verifies every token, so a draft that agrees
less only lowers the acceptance rate, never changes the output. That is why the check
here is of shapes (the weights must fit), not of values.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moeedge._core import BudgetError, ExpertCache, ExpertStore
from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.hf_config import DecoderConfig
from moeedge.formats.open import open_checkpoint
from moeedge.formats.variant_map import VARIANT_FILE
from moeedge.kernels import NATIVE_MAX_TOKENS, linear
from moeedge.models.decoder import DecoderMoE
from moeedge.models.runner import Prediction
from moeedge.runtime.experts import ExpertAccess
from moeedge.runtime.plan import shrink_cache

# The checkpoint's own config fields a draft must share (the dense weights' shapes follow).
SHARED_FIELDS = ("family", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab", "moe_layers",
                 "n_experts", "top_k")


def cache_dir() -> Path:
    """moeedge's cache: $MOEEDGE_CACHE, else $XDG_CACHE_HOME/moeedge, else ~/.cache/moeedge."""
    if os.environ.get("MOEEDGE_CACHE"):
        return Path(os.environ["MOEEDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeedge"


def _variant_info(directory: Path) -> dict | None:
    try:
        info = json.loads((directory / VARIANT_FILE).read_text())
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {"variant": info, "config": config} if isinstance(info, dict) and isinstance(config, dict) else None


def find_draft(ckpt: Checkpoint) -> Path | None:
    """An aggregated variant of ckpt that stores one expert per MoE layer: in a directory beside
    the checkpoint, or in cache_dir()/drafts; one whose recorded source is this checkpoint
    first, then by name. Only the shapes in config.json are compared here (open_draft checks)."""
    source = Path(ckpt.source).resolve()
    own = source if source.is_dir() else source.parent
    places = [own.parent, cache_dir() / "drafts"]
    try:
        own_config = json.loads((own / "config.json").read_text()) if source.is_dir() else {}
    except (OSError, ValueError):
        own_config = {}
    shape_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "model_type")
    found = []
    for place in places:
        if not place.is_dir():
            continue
        for d in sorted(place.iterdir()):
            if d.resolve() == own or not d.is_dir():
                continue
            info = _variant_info(d)
            if info is None or set(info["variant"].get("expert_counts") or [0]) != {1}:
                continue
            if any(info["config"].get(k) != own_config.get(k) for k in shape_keys if k in own_config):
                continue
            mine = str(info["variant"].get("source", "")) == str(source)
            found.append((not mine, str(d), d))
    return min(found)[2] if found else None


def open_draft(ckpt: Checkpoint, draft: str | os.PathLike | None) -> tuple[Checkpoint | None, str]:
    """(the draft's checkpoint or None, what was done: its path, or why there is none).
    draft: "auto" (find_draft), a directory, or None."""
    if draft is None:
        return None, "none (not asked for)"
    if not isinstance(ckpt.config, DecoderConfig):
        raise ValueError("speculative decoding takes decoder-only models: Switch's expert capacity counts over "
                         "the tokens of one call, so a pass verifying several tokens is not several decode steps")
    if draft == "auto":
        path = find_draft(ckpt)
        if path is None:
            return None, (f"none (auto: no one-expert-per-layer variant beside {ckpt.source} or in "
                          f"{cache_dir() / 'drafts'}; make one with moeedge aggregate --method merge "
                          f"--experts-per-layer 1)")
    else:
        path = Path(draft)
        if not (path / VARIANT_FILE).is_file():
            raise ValueError(f"draft {path}: not an aggregated variant (no {VARIANT_FILE}; make one with "
                             f"moeedge aggregate --method merge --experts-per-layer 1)")
    d = open_checkpoint(path)
    check_draft(ckpt, d)
    return d, str(path)


def check_draft(target: Checkpoint, draft: Checkpoint) -> None:
    """The draft can run on the target's dense weights: the same architecture and shapes."""
    a, b = target.config, draft.config
    if not isinstance(b, DecoderConfig):
        raise ValueError(f"draft {draft.source}: not a decoder-only model")
    for name in SHARED_FIELDS:
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"draft {draft.source}: {name} is {getattr(b, name)!r}, the model's is "
                             f"{getattr(a, name)!r}: a draft is an aggregated variant of the same model")
    missing = [n for n in draft.dense_names if n not in target.dense_names and ".experts.base." not in n]
    if missing:
        raise ValueError(f"draft {draft.source}: dense tensor {missing[0]!r} is not the model's")


def own_dense_names(target: Checkpoint, draft: Checkpoint) -> list[str]:
    """Dense tensors the draft holds apart (a low-rank variant's resident bases)."""
    return [n for n in draft.dense_names if n not in target.dense_names]


def draft_bytes(target: Checkpoint, draft: Checkpoint, max_context: int, dtype: torch.dtype) -> int:
    """What speculative decoding adds to the memory plan: the draft's experts (all resident),
    its own dense tensors and one sequence's KV cache, and the activations of steps of up to
    NATIVE_MAX_TOKENS tokens (verify passes, the draft's catch-up) beyond a decode step's."""
    store = ExpertStore(draft.files, draft.expert_ranges, direct_io=False)
    experts = sum(store.slot_bytes(k) for k in store.keys())
    own = sum(draft.read_dense(n).nbytes for n in own_dense_names(target, draft))
    cfg = target.config
    steps = (DecoderMoE.activation_bytes(cfg, max_context, NATIVE_MAX_TOKENS)
             - DecoderMoE.activation_bytes(cfg, max_context, 1))
    return experts + own + DecoderMoE.kv_bytes(draft.config, max_context, dtype) + steps


@dataclass
class Draft:
    """A loaded draft: its runner (on the target's dense tensors), its expert cache, its sequence."""

    path: str
    runner: DecoderMoE
    cache: ExpertCache
    expert_bytes: int
    reserve_bytes: int = 0  # the plan's other bytes for the draft that lending frees: its KV, its steps' buffers

    def lend(self, cache: ExpertCache, all_bytes: int) -> int:
        """While drafting is off, the full model's cache (holding less than its all_bytes of
        experts) gets the bytes of the draft's experts and its KV cache and steps' buffers, which
        are let go (the caller cuts the draft's sequences back to nothing first): the bytes lent,
        0 where it would not help or the draft's experts are busy."""
        if cache.budget_bytes >= all_bytes:
            return 0
        try:
            self.cache.set_budget(1)
        except BudgetError:  # still being read
            return 0
        self.kv_shape = tuple(self.runner.k_cache.shape)
        self.runner.k_cache = self.runner.v_cache = torch.empty(0, dtype=self.runner.k_cache.dtype)
        lent = self.expert_bytes + self.reserve_bytes
        cache.set_budget(cache.budget_bytes + lent)
        return lent

    def take_back(self, cache: ExpertCache, lent: int) -> None:
        """The bytes lent come back first, then the KV cache, and the draft's experts are read again."""
        shrink_cache(cache, cache.budget_bytes - lent)
        if self.runner.k_cache.numel() == 0:
            self.runner.k_cache = torch.zeros(self.kv_shape, dtype=self.runner.k_cache.dtype)
            self.runner.v_cache = torch.zeros(self.kv_shape, dtype=self.runner.v_cache.dtype)
        self.cache.set_budget(self.expert_bytes)
        self.cache.prefetch(list(self.cache.store.keys()), -1)

    def close(self) -> None:
        self.cache.close()


def load_draft(target: Checkpoint, draft: Checkpoint, target_dense: dict, max_context: int, dtype: torch.dtype,
               planned: int, io_threads: int = 1) -> Draft:
    """The draft, loaded (planned: the plan's bytes for it, draft_bytes())."""
    store = ExpertStore(draft.files, draft.expert_ranges, direct_io=False)
    keys = store.keys()
    total = sum(store.slot_bytes(k) for k in keys)
    cache = ExpertCache(store, total, "lru", io_threads)
    try:
        dense = {n: target_dense[n] for n in draft.dense_names if n in target_dense}
        if "lm_head.weight" in target_dense:
            dense["lm_head.weight"] = target_dense["lm_head.weight"]
        dense.update((n, draft.read_dense(n)) for n in own_dense_names(target, draft))
        experts = ExpertAccess(cache, draft.expert_parts, None, draft.expert_layouts)
        runner = DecoderMoE(draft.config, dense, experts, max_context, dtype, Prediction(None, policy="lru"), 1)
        cache.prefetch(list(keys), -1)  # every expert resident, read behind the first demand
    except BaseException:
        cache.close()
        raise
    own = sum(dense[n].nbytes for n in own_dense_names(target, draft))
    return Draft(str(draft.source), runner, cache, total, planned - total - own)


class DraftPicks:
    """The draft's router picks, as guesses of the full model's for the same tokens: a recorder
    for the draft's runner that keeps, per MoE layer, the top-k router outputs of the last
    token it ran (the router's own E outputs: a merged draft stores one expert for all)."""

    def __init__(self, runner: DecoderMoE):
        self.runner = runner
        self.last: dict[int, set[int]] = {}

    def __call__(self, moe_layer: int, experts: torch.Tensor, gates: torch.Tensor, hidden: torch.Tensor) -> None:
        logits = linear(hidden[-1:], self.runner.router_weight(moe_layer))  # [1, E]
        self.last[moe_layer] = set(torch.topk(logits[0], self.runner.cfg.top_k).indices.tolist())

    def take(self) -> dict[int, set[int]]:
        """The picks of the token run last, per MoE layer."""
        last, self.last = self.last, {}
        return last
