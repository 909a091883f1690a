"""moeedge.load(...): a checkpoint, a memory budget, and a model that generates text."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import torch

from moeedge._core import BudgetError, ExpertCache, ExpertStore, set_kernel_threads
from moeedge.formats.checkpoint import Checkpoint, StoredTensor
from moeedge.formats.errors import CheckpointError
from moeedge.formats.hf_checkpoint import open_hf_directory
from moeedge.formats.hf_config import DecoderConfig
from moeedge.formats.switch_checkpoint import SwitchConfig
from moeedge.models.decoder import DecoderMoE
from moeedge.models.switch import SwitchMoE
from moeedge.runtime.embedding import EMBEDDING, DiskEmbedding, embedding_on_disk
from moeedge.runtime.experts import ExpertAccess
from moeedge.runtime.memory import MemoryPlan, plan_memory, resolve_budget, rss_bytes
from moeedge.runtime.prefetcher import build_prefetcher
from moeedge.runtime.sampling import sample, validate_sampling
from moeedge.tokenizer import Tokenizer

POLICIES = ("lru", "lfu", "score", "predicted")
# Tokens per prefill step, largest first. The largest that fits the budget is used: a
# smaller chunk holds fewer activations (mixtral-medium at max_context 256: 84 MiB of
# buffers at 128, 52 at 16, as `moeedge.load(...).plan` reports them), but a prompt's chunks each read the experts they route to that the cache could
# not keep, so a tight budget trades prefill speed for fitting at all.
PREFILL_CHUNKS = (128, 64, 32, 16)


class ContextOverflowError(ValueError):
    """A prompt or conversation longer than max_context."""


def open_checkpoint(source: str | os.PathLike | None) -> Checkpoint:
    """A Hugging Face directory or a .gguf file; CheckpointError says what was found otherwise."""
    if source is None:
        from moeedge.default_model import default_model_path

        source = default_model_path()
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return open_hf_directory(path)
    if path.suffix == ".gguf":
        from moeedge.formats.gguf_checkpoint import open_gguf

        return open_gguf(path)
    raise CheckpointError(f"{path}: not a checkpoint moeedge reads (a Hugging Face directory with .safetensors, "
                          f"or a .gguf file)")


def runner_class(cfg: DecoderConfig | SwitchConfig) -> type[DecoderMoE] | type[SwitchMoE]:
    return SwitchMoE if isinstance(cfg, SwitchConfig) else DecoderMoE


def _buffer_bytes(cfg: DecoderConfig | SwitchConfig, max_context: int, chunk: int) -> int:
    if isinstance(cfg, SwitchConfig):  # the encoder takes its input at once
        return SwitchMoE.buffer_bytes(cfg, max_context)
    return DecoderMoE.buffer_bytes(cfg, max_context, chunk)


class MoeModel:
    """A loaded model. Use as a context manager, or call close()."""

    def __init__(self, checkpoint: Checkpoint, plan: MemoryPlan, cache: ExpertCache, runner: DecoderMoE | SwitchMoE,
                 tokenizer: Tokenizer | None):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.plan = plan
        self.cache = cache
        self.runner = runner
        self.tokenizer = tokenizer
        self.encoder_decoder = isinstance(runner, SwitchMoE)
        self.policy = cache.policy  # what load() was asked for ("predicted" drives the native "score")
        self._cached_ids: list[int] = []  # tokens whose keys and values are in the KV cache
        self._counters = {"prompt_tokens": 0, "generated_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}

    # -- logits ------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids, decoder_input_ids=None) -> torch.Tensor:
        """[T, vocab] logits of every position of input_ids (a fresh sequence); for an
        encoder-decoder model, of every position of decoder_input_ids, input_ids encoded."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
        self._check_context(len(ids))
        self._cached_ids = []
        if self.encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids (start with the config's "
                                 "decoder_start_token_id)")
            dec = torch.as_tensor(decoder_input_ids, dtype=torch.long).flatten()
            self._check_context(len(dec))
            return self.runner.logits(ids, dec).float()  # one decoder call: capacity counts over all of dec
        if decoder_input_ids is not None:
            raise ValueError("decoder_input_ids is for encoder-decoder models; this one is decoder-only")
        chunk = self.plan.prefill_chunk
        with self._prefill_memory():
            out = [self.runner.forward(ids[i:i + chunk], i, all_logits=True) for i in range(0, len(ids), chunk)]
        self._cached_ids = ids.tolist()
        return torch.cat(out).float()

    @contextlib.contextmanager
    def _prefill_memory(self):
        """The expert cache lends the prefill's activations their bytes (plan.prefill_borrow_bytes)."""
        full = self.cache.budget_bytes
        lent = min(full, self.plan.expert_cache_bytes - self.plan.prefill_borrow_bytes)
        if lent < full:
            # Guesses being read hold room: cancel them, and wait for the chunk each is on.
            self.cache.cancel_prefetches()
            deadline = time.monotonic() + 30
            while True:
                try:
                    self.cache.set_budget(lent)
                    break
                except BudgetError:  # says what holds the bytes, if they are never let go
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.001)
        try:
            yield
        finally:
            self.cache.set_budget(full)

    def _check_context(self, n: int) -> None:
        if n > self.runner.max_context:
            raise ContextOverflowError(f"{n} tokens exceed max_context={self.runner.max_context}; load with a larger "
                                       f"max_context (the KV cache grows with it) or shorten the conversation")
        if n == 0:
            raise ValueError("empty input: nothing to run")

    @torch.inference_mode()
    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Logits after ids, reusing the KV cache for a shared prefix (a chat's earlier turns)."""
        common = 0
        for a, b in zip(self._cached_ids, ids[:-1]):
            if a != b:
                break
            common += 1
        start = time.perf_counter()
        logits = None
        chunk = self.plan.prefill_chunk
        with self._prefill_memory():
            for i in range(common, len(ids), chunk):
                logits = self.runner.forward(torch.tensor(ids[i:i + chunk]), i)
        self._cached_ids = list(ids)
        self._counters["prompt_tokens"] += len(ids) - common
        self._counters["prefill_seconds"] += time.perf_counter() - start
        return logits[-1]

    # -- generation --------------------------------------------------------------------
    def stream_ids(self, ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, seed: int | None = None) -> Iterator[int]:
        """Yield generated token ids; stops at an end-of-sequence token or max_new_tokens."""
        validate_sampling(temperature, top_p, top_k)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self._check_context(len(ids) + max_new_tokens)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = set(self.config.eos_token_ids) | set(self.tokenizer.eos_ids if self.tokenizer else [])
        if max_new_tokens == 0:
            return
        logits = self._prefill_seq2seq(ids) if self.encoder_decoder else self._prefill(ids)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, top_k, generator)
            if token in eos:
                return
            yield token
            if step + 1 == max_new_tokens:
                return
            start = time.perf_counter()
            with torch.inference_mode():
                logits = self.runner.forward(torch.tensor([token]), len(self._cached_ids))[-1]
            self._cached_ids.append(token)
            self._counters["generated_tokens"] += 1
            self._counters["decode_seconds"] += time.perf_counter() - start

    def _prefill_seq2seq(self, ids: list[int]) -> torch.Tensor:
        """Encode ids once; the decoder starts from its start token, with the runner's caches."""
        start = time.perf_counter()
        with torch.inference_mode():
            self.runner.encode(torch.tensor(ids))
            logits = self.runner.forward(torch.tensor([self.config.decoder_start_token_id]), 0)[-1]
        self._cached_ids = [self.config.decoder_start_token_id]  # the decoder's tokens, not a prompt prefix
        self._counters["prompt_tokens"] += len(ids)
        self._counters["prefill_seconds"] += time.perf_counter() - start
        return logits

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.checkpoint.source} has no tokenizer files: pass token ids to stream_ids()")
        return self.tokenizer

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
               _ids: list[int] | None = None) -> Iterator[str]:
        """Yield pieces of text as they are generated."""
        tok = self._need_tokenizer()
        ids = _ids if _ids is not None else tok.encode(prompt)
        generated: list[int] = []
        emitted = ""
        for token in self.stream_ids(ids, max_new_tokens, temperature, top_p, top_k, seed):
            generated.append(token)
            text = tok.decode(generated)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            cut = min((text.find(s, max(0, len(emitted) - len(s))) for s in (stop or []) if s in text), default=-1)
            if cut >= 0:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                return
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: list[str] | None = None) -> str:
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop))

    def chat(self, messages: list[dict], stream: bool = False, **kwargs):
        """The assistant's reply to a conversation, with the checkpoint's chat template."""
        ids = self._need_tokenizer().encode_chat(messages)
        pieces = self.stream("", _ids=ids, **kwargs)
        return pieces if stream else "".join(pieces)

    # -- accounting --------------------------------------------------------------------
    def stats(self) -> dict:
        c = self._counters
        cache = self.cache.stats()
        gets = cache["hits"] + cache["misses"]
        return {
            **cache,
            **c,
            "hit_rate": cache["hits"] / gets if gets else 0.0,
            "prefill_tok_s": c["prompt_tokens"] / c["prefill_seconds"] if c["prefill_seconds"] else 0.0,
            "decode_tok_s": c["generated_tokens"] / c["decode_seconds"] if c["decode_seconds"] else 0.0,
            "policy": self.policy,
            "prefetch": self.runner.prefetch if self.encoder_decoder else self._prefetching(),
            **({"prediction": self.runner.prefetcher.stats()} if self._predicting() else {}),
            "resident": {"dense_bytes": self.plan.dense_bytes, "kv_cache_bytes": self.plan.kv_cache_bytes,
                         "expert_cache_bytes": cache["resident_bytes"], "process_bytes": rss_bytes()},
            "plan": self.plan.as_dict(),
        }

    def _predicting(self) -> bool:
        p = getattr(self.runner, "prefetcher", None)
        return p is not None and p.predictor is not None

    def _prefetching(self) -> bool:
        p = getattr(self.runner, "prefetcher", None)
        return p is not None and p.predictor is not None and p.lookahead > 0

    def close(self) -> None:
        self.cache.close()
        for w in self.runner.w.values():
            if isinstance(w, DiskEmbedding):
                w.close()

    def __enter__(self) -> "MoeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weight_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The experts' dtype as stored (fp32 for quantized ones, which dequantize to it)."""
    part = ckpt.expert_parts[0][0]
    return torch.float32 if part.quant is not None else part.dtype


def compute_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    """Activations: fp32 for the decoder, which multiplies bf16 weights as stored
    (moeedge.kernels); the Switch runner computes in the weights' dtype."""
    if dtype is not None:
        return dtype
    return torch.float32 if runner_class(ckpt.config) is DecoderMoE else weight_dtype(ckpt)


def plan_for(ckpt: Checkpoint, store: ExpertStore, budget: int, fixed: int, max_context: int,
             dtype: torch.dtype, on_disk: StoredTensor | None) -> MemoryPlan:
    """The memory plan of this checkpoint in this budget, with the largest prefill chunk
    that fits; BudgetError below the smallest workable budget (that of the smallest chunk),
    which min_budget_bytes reports. on_disk: the embedding table left in its file
    (embedding_on_disk), if any."""
    cfg = ckpt.config
    slot = max(store.slot_bytes(k) for k in store.keys())
    runner = runner_class(cfg)
    dense_bytes = ckpt.dense_nbytes if runner.mixed_precision else ckpt.dense_numel * dtype.itemsize
    if on_disk is not None:
        dense_bytes -= on_disk.info.nbytes
    kv_bytes = runner.kv_cache_bytes(cfg, max_context, dtype)
    chunks = sorted({min(c, max_context) for c in PREFILL_CHUNKS}, reverse=True)

    decode = _buffer_bytes(cfg, max_context, 1)

    def plan(chunk: int, budget: int) -> MemoryPlan:
        p = plan_memory(budget, fixed, dense_bytes, kv_bytes, _buffer_bytes(cfg, max_context, chunk),
                        cfg.top_k * slot, chunk)
        borrow = p.buffer_bytes - decode
        return replace(p, buffer_bytes=decode, expert_cache_bytes=p.expert_cache_bytes + borrow,
                       prefill_borrow_bytes=borrow)

    smallest = plan(chunks[-1], 1 << 62).min_budget_bytes
    for chunk in chunks[:-1]:
        try:
            return replace(plan(chunk, budget), min_budget_bytes=smallest)
        except BudgetError:
            continue
    return plan(chunks[-1], budget)


def _check_settings(device: str, max_context: int, lookahead: int, io_threads: int | None,
                    threads: int | None) -> None:
    if device != "cpu":
        raise ValueError(f"device {device!r} is not supported yet; use 'cpu'")
    if max_context < 1:
        raise ValueError(f"max_context must be positive, got {max_context}")
    if not 1 <= lookahead <= 3:
        raise ValueError(f"lookahead must be 1, 2 or 3 MoE layers, got {lookahead}")
    if io_threads is not None and not 1 <= io_threads <= 64:
        raise ValueError(f"io_threads must be between 1 and 64, got {io_threads}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")


def _resolve_policy(policy: str, runner_cls: type) -> str:
    if policy not in POLICIES + ("auto",):
        raise ValueError(f"unknown policy {policy!r}; choose one of auto, {', '.join(POLICIES)}")
    if policy == "auto":  # the best measured (README, Expert prediction); Switch has no predictor yet
        policy = "lru" if runner_cls is SwitchMoE else "predicted"
    if policy == "predicted" and runner_cls is SwitchMoE:
        raise ValueError("policy 'predicted' covers decoder-only models; use lru, lfu or score for Switch")
    return policy


def _set_up_prediction(runner: DecoderMoE | SwitchMoE, ckpt: Checkpoint, experts: ExpertAccess,
                       predictor: str | None, prefetch: bool | None, lookahead: int, predictor_file, policy: str) -> None:
    if isinstance(runner, SwitchMoE):
        if predictor not in ("auto", "stale-gate", None):
            raise ValueError(f"predictor {predictor!r}: Switch models prefetch with their stale gate or not at "
                             f"all (predictor='stale-gate' or None)")
        runner.prefetch = predictor is not None and prefetch is not False
        return
    # Guesses feed eviction (policy="predicted"); reading them early is off unless asked
    # (prefetch=True): read only where it pays (runtime/prefetcher.py), it was 1.02-1.14x
    # this default on default-64m under limits but 0.73-1.31x on random routing (README, Results).
    runner.prefetcher = build_prefetcher(ckpt, runner.w, experts, predictor, lookahead if prefetch else 0,
                                         predictor_file, policy)


def load(source: str | os.PathLike | None = None, *, memory_budget: int | str = "auto", device: str = "cpu",
         prefetch: bool | None = None, predictor: str | None = "auto", lookahead: int = 1,
         predictor_file: str | os.PathLike | None = None, policy: str = "auto", io_threads: int | None = None,
         max_context: int = 2048, direct_io: bool = True, dtype: torch.dtype | None = None,
         threads: int | None = None) -> MoeModel:
    """Open a checkpoint and plan it into memory_budget (the whole process's memory).

    predictor: what guesses the experts of the next layers (moeedge.predict): "stale-gate",
    "learned", "history", "frequency", "previous", "auto" (the best available), or None;
    its guesses feed policy="predicted"'s eviction, and with prefetch=True are also read
    early, lookahead (1-3) MoE layers ahead. Switch models prefetch unless prefetch=False.
    predictor_file: the trained predictors (default: moeedge_predictor.safetensors in the
    checkpoint directory). dtype is the activations' dtype (default: fp32 for decoder
    models on CPU). memory_budget: bytes ("4GiB"), "auto" (the cgroup's limit, else most of
    what is free), or "min" (the smallest workable: one layer's experts cached). threads:
    the compute threads, moeedge's kernels and torch's (process-wide, as
    torch.set_num_threads; default: every CPU this process may run on)."""
    fixed = rss_bytes()  # measured before anything of the model is read
    _check_settings(device, max_context, lookahead, io_threads, threads)
    if threads is not None:
        set_kernel_threads(threads)
        torch.set_num_threads(threads)
    smallest = isinstance(memory_budget, str) and memory_budget.strip().lower() == "min"
    budget = 0 if smallest else resolve_budget(memory_budget)
    ckpt = open_checkpoint(source)
    cfg = ckpt.config
    runner_cls = runner_class(cfg)
    dtype = compute_dtype(ckpt, dtype)
    max_context = min(max_context, cfg.max_position)
    store = ExpertStore(ckpt.files, ckpt.expert_ranges, direct_io=direct_io)
    on_disk = embedding_on_disk(ckpt)  # Switch's tables are named otherwise and tied: None
    if smallest:  # the smallest workable budget, planned from this process's own fixed cost
        budget = plan_for(ckpt, store, 1 << 62, fixed, max_context, dtype, on_disk).min_budget_bytes
    plan = plan_for(ckpt, store, budget, fixed, max_context, dtype, on_disk)
    expert_budget = min(plan.expert_cache_bytes, sum(store.slot_bytes(k) for k in store.keys()))
    policy = _resolve_policy(policy, runner_cls)
    # "predicted" is the native "score" policy, its scores set before each layer
    cache = ExpertCache(store, expert_budget, "score" if policy == "predicted" else policy, io_threads or 2)
    try:
        dense = {n: ckpt.read_dense(n) for n in ckpt.dense_names if on_disk is None or n != EMBEDDING}
        if on_disk is not None:
            dense[EMBEDDING] = DiskEmbedding(on_disk)
        if not runner_cls.mixed_precision:
            dense = {n: t.to(dtype) for n, t in dense.items()}
        experts = ExpertAccess(cache, ckpt.expert_parts, None if runner_cls.mixed_precision else dtype,
                               ckpt.expert_layouts)
        runner = runner_cls(cfg, dense, experts, max_context, dtype)
        _set_up_prediction(runner, ckpt, experts, predictor, prefetch, lookahead, predictor_file, policy)
        if ckpt.tokenizer_factory is not None:
            tokenizer = ckpt.tokenizer_factory()
        else:
            tokenizer = Tokenizer(ckpt.tokenizer_files) if ckpt.tokenizer_files else None
    except BaseException:
        cache.close()
        raise
    model = MoeModel(ckpt, plan, cache, runner, tokenizer)
    model.policy = policy
    return model
