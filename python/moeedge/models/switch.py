"""Switch Transformers (encoder-decoder, top-1 routing) in plain torch, experts offloaded.

As transformers computes it: T5 blocks (RMS layer norm without mean, relative position
bias from each stack's first block shared by all its blocks, unscaled dot-product
attention), and a top-1 router in fp32 that drops the tokens past an expert's capacity,
counted in sequence order over the tokens of one forward call. A dropped token gets no
expert output; only its residual passes. An aggregated variant (moeedge aggregate) keeps
the router's E outputs and maps them to its stored experts (cfg.expert_map); a low-rank
layer computes each expert from the layer's resident base plus the expert's factors.
Shapes: Ts = encoder tokens, T = tokens in this step, S = positions attended to,
H = heads, D = head dim, E = experts, I = d_ff.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeedge.formats.switch_checkpoint import expert_tensor_names, ff_prefix
from moeedge.formats.switch_config import SwitchConfig
from moeedge.models.runner import (NonFiniteError, Prediction, Sequence, SlotPool, SlotSequences, all_finite,
                                   check_batch, check_finite)
from moeedge.runtime.experts import ExpertAccess

ATTN_CHUNK = 128  # queries per attention step: bounds the [H, T, S] scores


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "gelu_new": gelu_tanh,
       "gelu_pytorch_tanh": gelu_tanh}


def t5_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Scale only, no mean; variance in fp32, back to half precision as transformers does.
    h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return weight * h


def relative_buckets(relative: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of memory - query positions: exact for small distances, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets += (relative > 0).to(torch.long) * n_buckets
        relative = relative.abs()
    else:
        relative = -torch.min(relative, torch.zeros_like(relative))
    max_exact = n_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (n_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, n_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


class PositionBias:
    """A stack's relative position bias (its first block's table, shared by all blocks)
    for queries at first_query.. and keys at 0..S-1, looked up once per distance."""

    def __init__(self, table: torch.Tensor, bidirectional: bool, cfg: SwitchConfig, first_query: int, T: int, S: int):
        self.lowest = -(first_query + T - 1)  # the most negative memory - query distance
        distances = torch.arange(self.lowest, S)
        buckets = relative_buckets(distances, bidirectional, cfg.rel_buckets, cfg.rel_max_distance)
        self.by_distance = F.embedding(buckets, table)  # [distances, H]

    def __call__(self, first_query: int, t: int, S: int) -> torch.Tensor:
        index = torch.arange(S)[None, :] - torch.arange(first_query, first_query + t)[:, None] - self.lowest
        return self.by_distance[index].permute(2, 0, 1)  # [H, t, S]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: PositionBias | None = None,
           first_query: int = 0, causal: bool = False) -> torch.Tensor:
    """q [T, H, D] at positions first_query.., k and v [S, H, D] -> [T, H*D]. Scores are
    not scaled (T5 folds that into its weights); causal: a query sees keys up to its position."""
    T, H, D = q.shape
    S = k.shape[0]
    keys, vals = k.permute(1, 2, 0), v.transpose(0, 1)  # [H, D, S], [H, S, D]
    out = torch.empty(T, H, D, dtype=q.dtype)
    for i in range(0, T, ATTN_CHUNK):
        scores = torch.matmul(q[i:i + ATTN_CHUNK].transpose(0, 1), keys)  # [H, t, S]
        t, q0 = scores.shape[1], first_query + i
        if bias is not None:
            scores = scores + bias(q0, t, S)
        if causal:
            visible = torch.arange(S)[None, :] <= torch.arange(q0, q0 + t)[:, None]  # [t, S]
            scores = scores.masked_fill(~visible, float("-inf"))
        out[i:i + t] = torch.matmul(torch.softmax(scores, dim=-1), vals).transpose(0, 1)
    return out.reshape(T, H * D)


class SwitchMoE(SlotSequences):
    """Encode once per sequence, then decode with a self-attention KV cache and cached
    cross-attention keys and values, each sequence in its own slot (moeedge.models.runner.Runner)."""

    mixed_precision = False  # dense weights and experts are converted to the compute dtype
    encoder_decoder = True  # prompts encoded apart from the decoder's tokens
    policies = ("lru", "lfu", "score")
    default_policy = "lru"  # no predictor of its own yet

    def __init__(self, cfg: SwitchConfig, dense: dict[str, torch.Tensor], experts: ExpertAccess,
                 max_context: int, dtype: torch.dtype, prediction: Prediction | None = None, n_sequences: int = 1):
        self.cfg = cfg
        self.w = dense
        self.experts = experts
        self.dtype = dtype
        self.max_context = max_context
        prediction = prediction or Prediction()
        if prediction.predictor not in ("auto", "stale-gate", None):
            raise ValueError(f"predictor {prediction.predictor!r}: Switch models prefetch with their stale gate or "
                             f"not at all (predictor='stale-gate' or None)")
        self.prefetch = prediction.predictor is not None and prediction.prefetch is not False
        shape = (n_sequences, cfg.n_decoder_layers, max_context, cfg.n_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.cross_k = torch.zeros(shape, dtype=dtype)  # encoder positions, per decoder block
        self.cross_v = torch.zeros(shape, dtype=dtype)
        self.slots = SlotPool(n_sequences)
        self.moe_index = {sb: i for i, sb in enumerate(cfg.moe_blocks())}
        # The router runs in router_dtype (fp32) whatever the compute dtype.
        self.routers = {i: (dense[ff_prefix(*sb) + "mlp.router.classifier.weight"].to(cfg.router_dtype),
                            dense.get(ff_prefix(*sb) + "mlp.router.classifier.bias"))
                        for sb, i in self.moe_index.items()}
        self.embed = dense["shared.weight"] if "shared.weight" in dense else dense["encoder.embed_tokens.weight"]
        self.lm_head = self.embed if cfg.tie_embeddings else dense["lm_head.weight"]
        self.act = ACT[cfg.act]
        # Variants: router output -> stored expert (-1: pruned), and low-rank layers' bases (wi, wo).
        self.tables = None if cfg.expert_map is None else [torch.tensor(row) for row in cfg.expert_map]
        self.base = {}
        for i in range(cfg.moe_layers):
            names = [name for _, name in expert_tensor_names(cfg, i, "base")]
            if names[0] in dense:
                self.base[i] = tuple(dense[n] for n in names)
        # Per MoE layer, the expert each token of the last call went to; -1: dropped past capacity.
        self.last_routing: list[torch.Tensor | None] = [None] * cfg.moe_layers
        self.recorder = None  # recorder(moe_layer, experts [T, 1], gates [T, 1], hidden [T, H]); -1: dropped

    # -- what the memory plan needs ----------------------------------------------------
    @classmethod
    def compute_dtype(cls, ckpt) -> torch.dtype:
        """The weights' dtype as stored (fp32 for quantized ones, which dequantize to it)."""
        part = ckpt.expert_parts[0][0]
        return torch.float32 if part.quant is not None else part.dtype

    @classmethod
    def dense_bytes(cls, ckpt, dtype: torch.dtype) -> int:
        return ckpt.dense_numel * dtype.itemsize  # converted to the compute dtype

    @classmethod
    def kv_bytes(cls, cfg: SwitchConfig, max_context: int, dtype: torch.dtype) -> int:
        # Self-attention K and V over the decoder's positions, cross-attention K and V over the encoder's.
        return 4 * cfg.n_decoder_layers * max_context * cfg.n_heads * cfg.head_dim * dtype.itemsize

    @classmethod
    def activation_bytes(cls, cfg: SwitchConfig, max_context: int, chunk: int) -> int:
        """Peak fp32 activations, whatever the chunk: the encoder routes its whole input at
        once (capacity is counted over the sequence), attention scores are chunked."""
        chunk = min(ATTN_CHUNK, max_context)
        per_token = 8 * cfg.hidden + 3 * cfg.inner + 6 * cfg.n_experts  # the router's int64 one-hot and cumsum
        scores = 4 * cfg.n_heads * chunk * max_context  # scores, bias, mask, softmax of one chunk
        ffn = 2 * min(cfg.expert_capacity, max_context) * cfg.ff + chunk * cfg.ff
        if cfg.expert_map is not None:  # a low-rank layer's base product over every token
            ffn += max_context * cfg.ff
        return (max_context * per_token + scores + ffn + chunk * cfg.vocab) * 4

    # -- sequences ---------------------------------------------------------------------
    def prompt(self, seq: Sequence, ids: list[int], chunk: int) -> tuple[torch.Tensor, int]:
        """Encode ids; the decoder starts again from its start token."""
        self.encode(seq, torch.tensor(ids))
        return self.step([(seq, torch.tensor([self.cfg.decoder_start_token_id]))])[0][-1], len(ids)

    def score(self, seq: Sequence, ids: torch.Tensor, chunk: int, decoder_ids=None) -> torch.Tensor:
        """[Td, V] logits of decoder_ids after ids. The decoder runs in one call: capacity
        counts over all Td tokens, as in transformers' forward."""
        if decoder_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids (start with the config's "
                             "decoder_start_token_id)")
        self.encode(seq, ids)
        return self.step([(seq, torch.as_tensor(decoder_ids, dtype=torch.long).flatten())], all_logits=True)[0]

    def prediction_stats(self) -> dict | None:
        return None  # the stale gate keeps no record

    @property
    def prefetching(self) -> bool:
        return self.prefetch

    def close(self) -> None:
        pass  # every weight is in memory

    # -- sublayers ---------------------------------------------------------------------
    def _project(self, x: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(x, self.w[p + ".weight"]).view(x.shape[0], self.cfg.n_heads, self.cfg.head_dim)

    def _ffn(self, x: torch.Tensor, stack: str, block: int) -> torch.Tensor:
        moe_layer = self.moe_index.get((stack, block))
        if moe_layer is not None:
            return self._moe(x, moe_layer)
        p = ff_prefix(stack, block) + "mlp."
        return F.linear(self.act(F.linear(x, self.w[p + "wi.weight"])), self.w[p + "wo.weight"])

    # -- mixture of experts ------------------------------------------------------------
    def route(self, x: torch.Tensor, moe_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] stored expert of each token (-1: past the expert's capacity) and [T] its
        probability, as SwitchTransformersTop1Router in eval (no jitter; the z-loss only
        trains). In a variant, experts that pruning dropped leave the softmax (as the
        decoder's route does), and capacity counts per router output, as in the source:
        merging changes no token's router pick, so none is dropped that the source kept."""
        weight, bias = self.routers[moe_layer]
        logits = F.linear(x.to(weight.dtype), weight, bias)  # [T, E]
        table = None if self.tables is None else self.tables[moe_layer]
        if table is not None:
            logits = logits.masked_fill(table < 0, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=weight.dtype).to(x.dtype)
        expert = probs.argmax(dim=-1)
        priority = F.one_hot(expert, self.cfg.n_experts).cumsum(dim=0)  # [T, E] tokens so far per expert
        kept = priority.gather(1, expert[:, None])[:, 0] <= self.cfg.expert_capacity
        if table is not None:
            expert = table[expert]
        return torch.where(kept, expert, -1), probs.max(dim=-1).values

    def _moe(self, x: torch.Tensor, moe_layer: int) -> torch.Tensor:
        expert, prob = self.route(x, moe_layer)
        self.last_routing[moe_layer] = expert
        if self.recorder is not None:
            self.recorder(moe_layer, expert[:, None], prob[:, None], x)
        chosen = [e for e in torch.unique(expert).tolist() if e >= 0]
        # Resident experts first while the missing ones are read; outputs are summed
        # in expert order afterwards, so the result does not depend on the cache.
        missing = [e for e in chosen if not self.experts.resident(moe_layer, e)]
        self.experts.prefetch(moe_layer, missing, priority=1)
        if self.prefetch:
            self._prefetch_next(x, moe_layer)
        base = self.base.get(moe_layer)
        if base is not None:  # low-rank: the base's wi product once, for every token
            wi_base = F.linear(x, base[0])  # [T, I]
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e in sorted(chosen, key=lambda e: e in missing):
            tokens = torch.where(expert == e)[0]
            ew = self.experts.get(moe_layer, e)
            if base is None:
                y = F.linear(self.act(F.linear(x[tokens], ew["wi"])), ew["wo"])
            else:  # weights base + b @ a, never formed: base(x) + b (a x) per projection
                h = self.act(wi_base[tokens] + F.linear(F.linear(x[tokens], ew["wi_a"]), ew["wi_b"]))
                y = F.linear(h, base[1]) + F.linear(F.linear(h, ew["wo_a"]), ew["wo_b"])
            del ew  # unpin before the next expert is read
            outputs[e] = (tokens, y * prob[tokens, None])
        out = torch.zeros_like(x)
        for e in chosen:
            tokens, y = outputs[e]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _prefetch_next(self, x: torch.Tensor, moe_layer: int) -> None:
        """Stale-gate guess: the next MoE layer's router (same stack) applied to this layer's input."""
        blocks = self.cfg.moe_blocks()
        nxt = moe_layer + 1
        if nxt >= len(blocks) or blocks[nxt][0] != blocks[moe_layer][0] or x.shape[0] != 1:
            return
        expert, _ = self.route(x, nxt)
        self.experts.prefetch(nxt, [e for e in expert.tolist() if e >= 0], priority=0)

    # -- the two stacks ----------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, seq: Sequence, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [Ts] -> encoder output [Ts, hidden]; caches every decoder block's
        cross-attention K and V in seq's slot, whose decoder tokens start again."""
        cfg, w = self.cfg, self.w
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
        Ts = input_ids.shape[0]
        if Ts == 0 or Ts > self.max_context:
            raise ValueError(f"{Ts} encoder tokens: need 1 to max_context={self.max_context}")
        h = F.embedding(input_ids, self.embed)
        bias = PositionBias(w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], True, cfg,
                            0, Ts, Ts)
        for b in range(cfg.n_encoder_layers):
            p = f"encoder.block.{b}.layer."
            x = t5_norm(h, w[p + "0.layer_norm.weight"], cfg.eps)
            a = p + "0.SelfAttention."
            out = attend(self._project(x, a + "q"), self._project(x, a + "k"), self._project(x, a + "v"), bias)
            h = h + F.linear(out, w[a + "o.weight"])
            h = h + self._ffn(t5_norm(h, w[p + "1.layer_norm.weight"], cfg.eps), "encoder", b)
            check_finite(h, f"encoder block {b}")  # once a prompt: cheap beside the block
        h = t5_norm(h, w["encoder.final_layer_norm.weight"], cfg.eps)
        seq.ids, seq.encoded = [], []  # from here on the slot's cross-attention is overwritten
        for b in range(cfg.n_decoder_layers):
            a = f"decoder.block.{b}.layer.1.EncDecAttention."
            self.cross_k[seq.slot, b, :Ts] = self._project(h, a + "k")
            self.cross_v[seq.slot, b, :Ts] = self._project(h, a + "v")
        seq.encoded = input_ids.tolist()
        return h

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, torch.Tensor]], all_logits: bool = False) -> list[torch.Tensor]:
        """Each sequence's decoder tokens in a call of its own: expert capacity counts over
        the tokens of one call, so sequences stepped together must not share it."""
        check_batch(batch, self.max_context)
        batch = [(seq, torch.as_tensor(tokens, dtype=torch.long).flatten()) for seq, tokens in batch]
        if any(not seq.encoded for seq, _ in batch):
            raise RuntimeError("encode(seq, input_ids) before decoding a sequence")
        out = [self._decode(seq, tokens, all_logits) for seq, tokens in batch]
        for (seq, tokens), logits in zip(batch, out):
            if not all_finite([logits]):
                self._decode(seq, tokens, all_logits, check=True)  # again, block by block: which one
                raise NonFiniteError("the logits hold NaN or Inf values: the checkpoint's weights or config are bad")
        for seq, tokens in batch:  # only now: a step that failed part-way changed no record
            seq.ids.extend(tokens.tolist())
        return out

    def _decode(self, seq: Sequence, tokens: torch.Tensor, all_logits: bool, check: bool = False) -> torch.Tensor:
        """Decoder tokens [T] at seq's next positions -> logits [T, V] (or [1, V], the last);
        check: raise NonFiniteError naming the first decoder block whose output is not finite."""
        cfg, w, T, slot, start = self.cfg, self.w, tokens.shape[0], seq.slot, len(seq)
        S = start + T
        encoded = len(seq.encoded)
        h = F.embedding(tokens, w.get("decoder.embed_tokens.weight", self.embed))
        bias = PositionBias(w["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], False, cfg,
                            start, T, S)
        for b in range(cfg.n_decoder_layers):
            p = f"decoder.block.{b}.layer."
            x = t5_norm(h, w[p + "0.layer_norm.weight"], cfg.eps)
            a = p + "0.SelfAttention."
            self.k_cache[slot, b, start:S] = self._project(x, a + "k")
            self.v_cache[slot, b, start:S] = self._project(x, a + "v")
            out = attend(self._project(x, a + "q"), self.k_cache[slot, b, :S], self.v_cache[slot, b, :S], bias,
                         start, causal=True)
            h = h + F.linear(out, w[a + "o.weight"])
            x = t5_norm(h, w[p + "1.layer_norm.weight"], cfg.eps)
            a = p + "1.EncDecAttention."
            out = attend(self._project(x, a + "q"), self.cross_k[slot, b, :encoded], self.cross_v[slot, b, :encoded])
            h = h + F.linear(out, w[a + "o.weight"])
            h = h + self._ffn(t5_norm(h, w[p + "2.layer_norm.weight"], cfg.eps), "decoder", b)
            if check:
                check_finite(h, f"decoder block {b}")
        if not all_logits:
            h = h[-1:]
        h = t5_norm(h, w["decoder.final_layer_norm.weight"], cfg.eps)
        if cfg.tie_embeddings:  # Mesh TensorFlow's rescaling before the shared embedding
            h = h * cfg.hidden ** -0.5
        return F.linear(h, self.lm_head)
