"""Which runner a checkpoint takes, and what it needs before it runs: its memory plan
(moeedge.runtime.plan, with the runner's needs) and its dense weights."""
from __future__ import annotations

import torch

from moeedge._core import ExpertStore
from moeedge.formats.checkpoint import Checkpoint, StoredTensor
from moeedge.formats.hf_config import DecoderConfig
from moeedge.formats.switch_config import SwitchConfig
from moeedge.models.decoder import DecoderMoE
from moeedge.models.runner import Runner
from moeedge.models.switch import SwitchMoE
from moeedge.runtime.embedding import EMBEDDING, DiskEmbedding
from moeedge.runtime.experts import current_keys
from moeedge.runtime.measure import is_smallest, resolve_budget
from moeedge.runtime.plan import MemoryPlan, plan_checkpoint
from moeedge.tokenizer import Tokenizer

RUNNERS: dict[type, type] = {DecoderConfig: DecoderMoE, SwitchConfig: SwitchMoE}


def runner_class(cfg) -> type[Runner]:
    return RUNNERS[type(cfg)]


def plan_for(ckpt: Checkpoint, store: ExpertStore, budget: int | str, fixed: int, max_context: int,
             dtype: torch.dtype, on_disk: StoredTensor | None, n_sequences: int = 1,
             draft_bytes: int = 0) -> MemoryPlan:
    """This checkpoint's memory plan in budget (bytes, "4GiB", "auto", or "min": the smallest
    workable); on_disk: the embedding table left in its file (embedding_on_disk), if any."""
    runner = runner_class(ckpt.config)
    slot = max(store.slot_bytes(k) for k in current_keys(store.keys(), ckpt.layer_variants))
    left = on_disk.info.nbytes if on_disk is not None else 0

    def plan(b: int) -> MemoryPlan:
        return plan_checkpoint(ckpt, runner, slot, b, fixed, max_context, dtype, left, n_sequences, draft_bytes)

    if is_smallest(budget):  # planned from this process's own fixed cost
        return plan(plan(1 << 62).min_budget_bytes)
    return plan(resolve_budget(budget))


def dense_weights(ckpt: Checkpoint, runner: type[Runner], dtype: torch.dtype, on_disk: StoredTensor | None) -> dict:
    """The dense weights as the runner holds them: as stored, or converted to dtype; the
    embedding table left in its file where on_disk says so."""
    dense = {n: ckpt.read_dense(n) for n in ckpt.dense_names if on_disk is None or n != EMBEDDING}
    if not runner.mixed_precision:
        dense = {n: t.to(dtype) for n, t in dense.items()}
    if on_disk is not None:
        dense[EMBEDDING] = DiskEmbedding(on_disk)
    return dense


def resolve_policy(policy: str, runner: type[Runner]) -> str:
    """The cache policy a load asked for, "auto" resolved to the runner's best measured."""
    if policy == "auto":
        return runner.default_policy
    if policy not in runner.policies:
        raise ValueError(f"unknown policy {policy!r} for this model; choose one of auto, {', '.join(runner.policies)}")
    return policy


def open_tokenizer(ckpt: Checkpoint) -> Tokenizer | None:
    """The checkpoint's tokenizer, None where it has no tokenizer files."""
    if ckpt.tokenizer_factory is not None:  # a GGUF's own vocabulary
        return ckpt.tokenizer_factory()
    return Tokenizer(ckpt.tokenizer_files) if ckpt.tokenizer_files else None
