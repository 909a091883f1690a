"""Decoder-only MoE (Mixtral, Qwen2-MoE, OLMoE) in plain torch, experts offloaded.

Dense weights live in memory as stored; each MoE layer routes with the checkpoint's
router, then computes its selected experts from the native cache's buffers
(moeedge.models.decoder_ffn). Activations are in `dtype` (fp32 by default), weights stay
in the checkpoint's dtype and are multiplied as they are (moeedge.kernels.linear). A
sequence's one-token step runs each layer's attention block as one native call
(moeedge._core.AttentionStep) and each expert as another (ExpertFfn); the torch ops below
remain for several tokens and for weights the kernels do not take as stored.

A step takes several sequences (moeedge.models.runner): attention runs per sequence on
its own KV slot (one token of each: one native call a layer for all of them, each weight
read once), the feed-forward blocks on all their rows at once.
Shapes: T = tokens in this step, H = hidden, S = cached positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeedge import _core
from moeedge.formats.decoder_tensors import expert_tensor_names
from moeedge.formats.hf_config import DecoderConfig
from moeedge.kernels import CONVERT_BLOCK_BYTES, NATIVE_MAX_TOKENS, linear, stored
from moeedge.models.decoder_ffn import DecoderFFN, ffn_rows, widest_ffn
from moeedge.policies import RUNTIME_POLICIES
from moeedge.models.runner import (NonFiniteError, Prediction, Sequence, SlotPool, SlotSequences, all_finite,
                                   check_batch, check_finite, common_prefix)
from moeedge.runtime.experts import ExpertAccess
from moeedge.models.span_ffn import add_rows
from moeedge.runtime.prefetcher import build_prefetcher


# A prompt longer than a chunk runs a span of several chunks layer by layer: attention chunk
# by chunk (the chunk bounds its scores), then each MoE layer over the whole span at once,
# so that an expert the span routes to is read once per span, not once per chunk (under a
# tight budget few experts stay cached from one chunk to the next). The rows are the same
# bits either way (the kernels are batch-invariant). A span's rows hold (5 + top_k) x hidden
# floats a token (h, x, their per-chunk parts, each expert's output rows, their sum): at
# most PREFILL_SPAN_BYTES of them, and at most PREFILL_SPAN_CHUNKS chunks.
PREFILL_SPAN_BYTES = 64 << 20
PREFILL_SPAN_CHUNKS = 8


def span_row_bytes(cfg: DecoderConfig) -> int:
    return (5 + cfg.top_k) * cfg.hidden * 4


def prefill_span(cfg: DecoderConfig, max_context: int, chunk: int) -> int:
    """Prompt tokens per layer-by-layer pass, a whole number of chunks. Its rows never take
    more than an eighth of the experts' bytes (at 4 bits a weight, the least a format
    stores): a span saves expert reads, and where every expert is small enough to stay
    cached there is nothing to save."""
    experts = len(cfg.moe_layers) * cfg.n_experts * 3 * cfg.hidden * cfg.expert_intermediate // 2
    allowed = min(PREFILL_SPAN_BYTES, experts // 8)
    chunks = max(1, min(PREFILL_SPAN_CHUNKS, allowed // (span_row_bytes(cfg) * chunk)))
    return max(1, min(max_context, chunk * chunks))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers does it: normalise in fp32, scale in the input dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderMoE(DecoderFFN, SlotSequences):
    """Forward of several sequences, each in a preallocated KV slot (moeedge.models.runner.Runner)."""

    mixed_precision = True  # weights stay as stored; activations in self.dtype
    encoder_decoder = False  # prompts encoded apart from the decoder's tokens
    policies = RUNTIME_POLICIES
    default_policy = "predicted"  # the best measured (README, Expert prediction)
    # Several one-token segments' attention as one native call a layer (False: one call per
    # segment, bench/serve_step_split.py's comparison)
    attention_rows = True

    def __init__(self, cfg: DecoderConfig, dense: dict[str, torch.Tensor], experts: ExpertAccess,
                 max_context: int, dtype: torch.dtype, prediction: Prediction | None = None, n_sequences: int = 1):
        self.cfg = cfg
        self.w = dense
        self.experts = experts
        self.dtype = dtype
        self.max_context = max_context
        self.recorder = None
        self.held = None  # an exact step's routing, until commit_routes (moeedge.models.decoder_ffn)
        self.pass_guesses = None  # the next exact step's expert guesses per MoE layer (speculative drafts)
        shape = (n_sequences, cfg.n_layers, max_context, cfg.n_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.slots = SlotPool(n_sequences)
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float()
                                                  / cfg.head_dim))
        self.moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.rows = ffn_rows(cfg)
        self.lm_head = dense.get("lm_head.weight", dense["model.embed_tokens.weight"])
        # A low-rank variant (moeedge aggregate --method lowrank) keeps a MoE layer's base
        # expert among the dense weights; its experts are factors of their difference from it.
        self.base = {}
        for i, layer in enumerate(cfg.moe_layers):
            names = [name for _, name in expert_tensor_names(cfg, i, "base")]
            if names[0] in dense:
                self.base[layer] = tuple(dense[n] for n in names)
        # Per KV slot, a one-token step's attention block per layer as one native call, where
        # its weights are in formats the kernels multiply as stored (None: the torch path).
        self.steps = [[self._attention_step(layer, slot) for layer in range(cfg.n_layers)]
                      for slot in range(n_sequences)]
        # Reads ahead what a predictor guesses, and feeds policy="predicted"'s eviction.
        prediction = prediction or Prediction()
        self.prefetcher = build_prefetcher(cfg, prediction.source, dense, experts, prediction.predictor,
                                           prediction.lookahead if prediction.prefetch else 0,
                                           prediction.predictor_file, prediction.policy)

    # -- what the memory plan needs ----------------------------------------------------
    @classmethod
    def compute_dtype(cls, ckpt) -> torch.dtype:
        return torch.float32  # bf16 and quantized weights are multiplied as stored (moeedge.kernels)

    @classmethod
    def dense_bytes(cls, ckpt, dtype: torch.dtype) -> int:
        return ckpt.dense_nbytes  # kept as stored

    @classmethod
    def kv_bytes(cls, cfg: DecoderConfig, max_context: int, dtype: torch.dtype) -> int:
        return 2 * cfg.n_layers * max_context * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize

    @classmethod
    def activation_bytes(cls, cfg: DecoderConfig, max_context: int, chunk: int) -> int:
        """Activations of one forward of `chunk` tokens (fp32): hidden-sized tensors, the
        attention scores, a chunk's logits, one feed-forward block, and above
        NATIVE_MAX_TOKENS one block of weights converted to fp32 (moeedge.kernels)."""
        per_token = 6 * cfg.hidden + cfg.vocab + cfg.n_heads * max_context
        widest = widest_ffn(cfg)
        ffn = min(chunk, ffn_rows(cfg)) * 4 * widest * 4
        largest = max(widest, cfg.vocab, cfg.n_heads * cfg.head_dim) * cfg.hidden * 4
        converted = min(CONVERT_BLOCK_BYTES, largest) if chunk > NATIVE_MAX_TOKENS else 0
        # the chunk's own rows are in per_token; the span's further tokens add theirs
        span = (prefill_span(cfg, max_context, chunk) - chunk) * span_row_bytes(cfg) if chunk > 1 else 0
        return chunk * per_token * 4 + ffn + converted + span

    # -- sequences ---------------------------------------------------------------------
    def prompt(self, seq: Sequence, ids: list[int], chunk: int) -> tuple[torch.Tensor, int]:
        common = common_prefix(seq.ids, ids)
        self.truncate(seq, common)
        logits, span = None, prefill_span(self.cfg, self.max_context, chunk)
        with self.reading_prompt():
            for i in range(common, len(ids), span):
                logits = self.step([(seq, torch.tensor(ids[i:i + span]))], chunk=chunk)[0]
        return logits[-1], len(ids) - common

    def score(self, seq: Sequence, ids: torch.Tensor, chunk: int, decoder_ids=None) -> torch.Tensor:
        if decoder_ids is not None:
            raise ValueError("decoder_input_ids is for encoder-decoder models; this one is decoder-only")
        self.truncate(seq, 0)
        with self.reading_prompt():  # every position is a prompt's: the prompt kernels are faster
            return torch.cat([self.step([(seq, ids[i:i + chunk])], all_logits=True)[0]
                              for i in range(0, len(ids), chunk)])

    # -- prediction --------------------------------------------------------------------
    def prediction_stats(self) -> dict | None:
        p = self.prefetcher
        return p.stats() if p is not None and p.predictor is not None else None

    @property
    def prefetching(self) -> bool:
        p = self.prefetcher
        return p is not None and p.predictor is not None and p.lookahead > 0

    def close(self) -> None:
        for w in self.w.values():
            if hasattr(w, "close"):  # an embedding table left in its file
                w.close()

    def _attention_step(self, layer: int, slot: int) -> _core.AttentionStep | None:
        """The native one-token attention block of this layer, on a KV slot (moeedge._core.AttentionStep)."""
        cfg, w = self.cfg, self.w
        if self.dtype != torch.float32:
            return None
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        names = {"q": a + "q_proj.weight", "k": a + "k_proj.weight", "v": a + "v_proj.weight",
                 "o": a + "o_proj.weight"}
        if layer in self.moe_index:
            names["router"] = self._router_name(layer)
        weights = {}
        for key, name in names.items():
            weights[key] = stored(w[name])
            if weights[key] is None:
                return None
        vectors = {"in_norm": p + "input_layernorm.weight", "post_norm": p + "post_attention_layernorm.weight",
                   "q_bias": a + "q_proj.bias", "k_bias": a + "k_proj.bias", "v_bias": a + "v_proj.bias",
                   "q_norm": a + "q_norm.weight", "k_norm": a + "k_norm.weight"}
        for key, name in vectors.items():
            if name not in w:
                continue
            if not isinstance(w[name], torch.Tensor):
                return None
            weights[key] = w[name].float().contiguous().numpy()
        return _core.AttentionStep(cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_eps,
                                   cfg.clip_qkv or 0.0, weights, self.k_cache[slot, layer].numpy(),
                                   self.v_cache[slot, layer].numpy())

    def _attention(self, x: torch.Tensor, layer: int, slot: int, start: int,
                   rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg, w, T = self.cfg, self.w, x.shape[0]
        p, pr = f"model.layers.{layer}.self_attn.", self.in_prompt
        q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias"), prompt=pr)
        k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias"), prompt=pr)
        v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias"), prompt=pr)
        if p + "q_norm.weight" in w:  # OLMoE normalises the whole projections
            q = rms_norm(q, w[p + "q_norm.weight"], cfg.rms_eps)
            k = rms_norm(k, w[p + "k_norm.weight"], cfg.rms_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(T, cfg.n_heads, cfg.head_dim)
        k = k.view(T, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(T, cfg.n_kv_heads, cfg.head_dim)
        cos, sin = rope
        qk = torch.cat((q, k), dim=1)  # one rotation for both: 6 fewer small ops a layer
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :cfg.n_heads], qk[:, cfg.n_heads:]
        self.k_cache[slot, layer, start:start + T] = k
        self.v_cache[slot, layer, start:start + T] = v
        S = start + T
        keys = self.k_cache[slot, layer, :S].transpose(0, 1)  # [KVH, S, D]
        vals = self.v_cache[slot, layer, :S].transpose(0, 1)
        if T == 1:
            out = self._decode_attention(q, keys, vals)
        else:  # causal over the new tokens; everything cached before is visible
            mask = torch.arange(S)[None, :] <= torch.arange(start, S)[:, None]  # [T, S]
            # enable_gqa: each group of query heads reads its KV head in place, no repeated copy per step
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask,
                                                 enable_gqa=cfg.n_heads != cfg.n_kv_heads)  # [H, T, D]
            out = out.transpose(0, 1)
        return linear(out.reshape(T, cfg.n_heads * cfg.head_dim), w[p + "o_proj.weight"], prompt=pr)

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """One token's attention, q [1, H, D] over keys and values [KVH, S, D]: each KV head's
        group of query heads as one [G, D] x [D, S] product. (SDPA takes its unfused path for
        grouped heads on CPU: about 15 ops, 0.4 ms a layer, where this is 4.)"""
        cfg = self.cfg
        q = q.view(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)  # [KVH, G, D]
        scores = torch.bmm(q, keys.transpose(1, 2)).mul_(cfg.head_dim ** -0.5)  # [KVH, G, S]
        return torch.bmm(torch.softmax(scores, dim=-1), vals)  # [KVH, G, D]: heads in order

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    # -- the whole model ---------------------------------------------------------------
    def step(self, batch: list[tuple[Sequence, torch.Tensor]], all_logits: bool = False,
             exact: bool = False, chunk: int = 0) -> list[torch.Tensor]:
        """chunk: each sequence's attention runs this many of its tokens at a time (0: all),
        the feed-forward blocks still on every row of the step at once (prompt spans).
        exact: one sequence's several tokens (a speculative verify pass) get the bits that
        one-token steps would give each: attention runs token by token through the decode
        path, the feed-forward blocks on all rows through the batch-invariant kernels. Its
        routing is held back (not recorded, not shown to the predictor) until
        commit_routes(n) says how many of its tokens were kept."""
        check_batch(batch, self.max_context)
        if exact and len(batch) != 1:
            raise ValueError("an exact multi-token step takes one sequence")
        batch = [(seq, torch.as_tensor(tokens, dtype=torch.long).flatten()) for seq, tokens in batch]
        if self.prefetcher is not None and any(len(seq) == 0 for seq, _ in batch):
            self.prefetcher.reset()
        self.held = [] if exact else None
        out = self._forward_threads(batch, all_logits, exact=exact, chunk=chunk)
        if not all_finite(out):
            self.held = [] if exact else None
            self._forward_threads(batch, all_logits, check=True, exact=exact, chunk=chunk)  # again, layer by layer: which one
            raise NonFiniteError("the logits hold NaN or Inf values: the checkpoint's weights or config are bad")
        for seq, tokens in batch:  # only now: a step that failed part-way changed no record
            seq.ids.extend(tokens.tolist())
        return out

    def _forward_threads(self, batch, all_logits: bool, check: bool = False, exact: bool = False,
                         chunk: int = 0) -> list[torch.Tensor]:
        if sum(len(tokens) for _, tokens in batch) > NATIVE_MAX_TOKENS:
            return self._forward(batch, all_logits, check, exact, chunk)
        # A decode step's heavy products run on moeedge's own kernel threads; torch's
        # OpenMP threads would only spin against them on the small remaining ops.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._forward(batch, all_logits, check, exact, chunk)
        finally:
            torch.set_num_threads(threads)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        embed = self.w["model.embed_tokens.weight"]
        if not isinstance(embed, torch.Tensor):  # QuantTensor, or DiskEmbedding: the rows needed
            return embed.rows(tokens, self.dtype)
        return F.embedding(tokens, embed).to(self.dtype)

    def _forward(self, batch: list[tuple[Sequence, torch.Tensor]], all_logits: bool,
                 check: bool = False, exact: bool = False, chunk: int = 0) -> list[torch.Tensor]:
        """check: raise NonFiniteError naming the first layer whose output is not finite.
        exact: every token is a segment of its own, as if each were another sequence's;
        chunk: a sequence's tokens are segments of at most this many, in order."""
        cfg, w = self.cfg, self.w
        sizes = [len(tokens) for _, tokens in batch]
        tokens = torch.cat([t for _, t in batch]) if len(batch) > 1 else batch[0][1]
        h = self._embed(tokens)
        if check:
            check_finite(h, "the token embedding")
        # segments: (sequence, first position, tokens), attended to apart
        step = 1 if exact else chunk
        segments = [(seq, len(seq) + i, min(step, n - i) if step else n)
                    for (seq, _), n in zip(batch, sizes) for i in range(0, n, step or n)]
        ropes = [self._rope(torch.arange(start, start + n)) for _, start, n in segments]
        # a one-token segment's native step takes cos and sin [D] as numpy: made once, not per layer
        ropes = [(rope, tuple(t.reshape(-1).contiguous().numpy() for t in rope) if n == 1 else None)
                 for rope, (_, _, n) in zip(ropes, segments)]
        apart = len(segments) > 1 and all(n == 1 for _, _, n in segments)  # each row as if alone
        # one token of each of several sequences: a layer's native steps as one call (_attention_rows)
        rows_rope = tuple(torch.cat([rope[i] for rope, _ in ropes]).reshape(len(segments), -1).numpy()
                          for i in (0, 1)) if apart else None
        self.segment_rows = [n for _, _, n in segments]
        ends = torch.tensor(self.segment_rows).cumsum(0).tolist()
        bounds = list(zip([0, *ends[:-1]], ends))
        # the last feed-forward output, added to h a segment at a time: a SpanFFN still waiting
        # on a peer hands a segment its rows as they come back (pipelined prefill)
        ffn = None
        self.read_ahead(-1, len(tokens))  # a prompt's first MoE layers' experts
        for layer in range(cfg.n_layers):
            if len(segments) == 1:
                h, x, logits = self._attention_block(add_rows(h, ffn, 0, len(h)), layer, segments[0][:2], ropes[0])
            elif apart and self.attention_rows and all(self.steps[seq.slot][layer] is not None for seq, *_ in segments):
                h, x, logits = self._attention_rows(add_rows(h, ffn, 0, len(h)), layer, segments, rows_rope)
            else:
                parts = [self._attention_block(add_rows(h, ffn, a, b), layer, segment[:2], rope)
                         for (a, b), segment, rope in zip(bounds, segments, ropes)]
                h, x = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                logits = None if any(p[2] is None for p in parts) else torch.cat([p[2] for p in parts])
            if check:
                check_finite(x, f"layer {layer}'s attention block")
            ffn = self._ffn(x, layer, logits, apart)
            if check:
                h, ffn = add_rows(h, ffn, 0, len(h)), None
                check_finite(h, f"layer {layer}'s feed-forward block")
        h = add_rows(h, ffn, 0, len(h))
        if not all_logits:
            h = h[-1:] if len(batch) == 1 else h[torch.tensor(sizes).cumsum(0) - 1]
            sizes = [1] * len(batch)
        out = linear(rms_norm(h, w["model.norm.weight"], cfg.rms_eps), self.lm_head)
        if check:
            check_finite(out, "the final norm and output projection")
        return [out] if len(batch) == 1 else list(out.split(sizes))

    def _attention_rows(self, h: torch.Tensor, layer: int, segments, rope: tuple):
        """One token of each of several sequences (segments) through a layer's attention block
        as one native call: each attention weight read once for all the rows, each row the bits
        its own step would give it. rope: cos and sin as numpy [rows, D]."""
        steps = [self.steps[seq.slot][layer] for seq, _, _ in segments]
        h = h.contiguous()
        x = torch.empty_like(h)
        logits = torch.empty(len(h), steps[0].router_rows) if steps[0].router_rows else None
        _core.AttentionStep.rows(steps, h.numpy(), [start for _, start, _ in segments], *rope, x.numpy(),
                                 None if logits is None else logits.numpy())
        return h, x, logits

    def _attention_block(self, h: torch.Tensor, layer: int, segment: tuple[Sequence, int], ropes):
        """One sequence's rows, from position `start`, through a layer's attention block: (h after
        it, the feed-forward's normed input, the router's logits where the native step computed
        them). ropes: the rotary (cos, sin) as tensors, and as numpy [D] for a one-token step."""
        cfg, w = self.cfg, self.w
        seq, start = segment
        rope, native_rope = ropes
        step = self.steps[seq.slot][layer] if h.shape[0] == 1 else None
        if step is not None:  # one native call, h updated in place
            h = h.contiguous()
            x = torch.empty_like(h)
            logits = torch.empty(1, step.router_rows) if step.router_rows else None
            cos, sin = native_rope
            step(h.numpy(), start, cos, sin, x.numpy(), None if logits is None else logits.numpy())
            return h, x, logits
        p = f"model.layers.{layer}."
        h = h + self._attention(rms_norm(h, w[p + "input_layernorm.weight"], cfg.rms_eps), layer, seq.slot, start,
                                rope)
        return h, rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.rms_eps), None
