"""Decoder-only MoE (Mixtral, Qwen2-MoE, OLMoE) in plain torch, experts offloaded.

Dense weights live in memory as stored; each MoE layer routes with the checkpoint's
router, then computes its selected experts from the native cache's buffers (in a
low-rank variant's layer, each expert's factors on top of the layer's resident base).
Activations are in `dtype` (fp32 by default), weights stay in the checkpoint's dtype
and are multiplied as they are (moeedge.kernels.linear). A decode step (one token) runs
each layer's attention block as one native call (moeedge._core.AttentionStep) and each
expert as another (ExpertFfn); the torch ops below remain for prefill and for weights the
kernels do not take as stored. Shapes:
T = tokens in this step, H = hidden, E = experts, K = top-k, S = cached positions.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from moeedge.formats.hf_checkpoint import expert_tensor_names
from moeedge.formats.hf_config import DecoderConfig
from moeedge import _core
from moeedge.kernels import CONVERT_BLOCK_BYTES, NATIVE_MAX_TOKENS, linear, stored
from moeedge.runtime.experts import ExpertAccess
from moeedge.runtime.memory import SLACK_BYTES

# A feed-forward's activations (gate, up, their product: about four [rows, intermediate]
# tensors) are computed this many bytes of them at a time, so that a prefill chunk of
# wide experts (64 MiB ones have 58,254 neurons) needs a few MiB rather than one
# chunk-sized copy per projection; the memory plan counts this, not chunk x intermediate.
FFN_ACTIVATION_BYTES = 8 << 20


def by_rows(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    """fn applied to x `rows` rows at a time (each row's result depends on that row only)."""
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(rows)])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers does it: normalise in fp32, scale in the input dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderMoE:
    """Forward of one sequence (batch 1) with a preallocated KV cache."""

    mixed_precision = True  # weights stay as stored; activations in self.dtype

    def __init__(self, cfg: DecoderConfig, dense: dict[str, torch.Tensor], experts: ExpertAccess,
                 max_context: int, dtype: torch.dtype):
        self.cfg = cfg
        self.w = dense
        self.experts = experts
        self.dtype = dtype
        self.max_context = max_context
        self.prefetcher = None  # moeedge.runtime.prefetcher.Prefetcher: reads ahead what a predictor guesses
        # Called as recorder(moe_layer, experts [T, K], gates [T, K], hidden [T, H]) by each
        # MoE layer: routing traces (moeedge.trace).
        self.recorder = None
        shape = (cfg.n_layers, max_context, cfg.n_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float()
                                                  / cfg.head_dim))
        self.moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.rows = self.ffn_rows(cfg)
        self.lm_head = dense.get("lm_head.weight", dense["model.embed_tokens.weight"])
        # A low-rank variant (moeedge aggregate --method lowrank) keeps a MoE layer's base
        # expert among the dense weights; its experts are factors of their difference from it.
        self.base = {}
        for i, layer in enumerate(cfg.moe_layers):
            names = [name for _, name in expert_tensor_names(cfg, i, "base")]
            if names[0] in dense:
                self.base[layer] = tuple(dense[n] for n in names)
        # A decode step's attention block per layer as one native call, where its weights
        # are in formats the kernels multiply as stored (None: the torch path).
        self.steps = [self._attention_step(layer) for layer in range(cfg.n_layers)]

    @staticmethod
    def kv_cache_bytes(cfg: DecoderConfig, max_context: int, dtype: torch.dtype) -> int:
        return 2 * cfg.n_layers * max_context * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize

    @staticmethod
    def widest_ffn(cfg: DecoderConfig) -> int:
        return max(cfg.expert_intermediate, cfg.dense_intermediate, cfg.shared_expert_intermediate)

    @staticmethod
    def ffn_rows(cfg: DecoderConfig) -> int:
        """Token rows per feed-forward block (FFN_ACTIVATION_BYTES), fp32 activations."""
        return max(1, FFN_ACTIVATION_BYTES // (4 * DecoderMoE.widest_ffn(cfg) * 4))

    @staticmethod
    def buffer_bytes(cfg: DecoderConfig, max_context: int, chunk: int) -> int:
        """Activations of one forward of `chunk` tokens (fp32): hidden-sized tensors, the
        attention scores, a chunk's logits, one feed-forward block, and above
        NATIVE_MAX_TOKENS one block of weights converted to fp32 (moeedge.kernels), plus
        the allocator's slack."""
        per_token = 6 * cfg.hidden + cfg.vocab + cfg.n_heads * max_context
        widest = DecoderMoE.widest_ffn(cfg)
        ffn = min(chunk, DecoderMoE.ffn_rows(cfg)) * 4 * widest * 4
        largest = max(widest, cfg.vocab, cfg.n_heads * cfg.head_dim) * cfg.hidden * 4
        converted = min(CONVERT_BLOCK_BYTES, largest) if chunk > NATIVE_MAX_TOKENS else 0
        return chunk * per_token * 4 + ffn + converted + SLACK_BYTES

    def _router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{'block_sparse_moe' if self.cfg.family == 'mixtral' else 'mlp'}.gate.weight"

    def _attention_step(self, layer: int) -> _core.AttentionStep | None:
        """The native one-token attention block of this layer (moeedge._core.AttentionStep)."""
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
                                   cfg.clip_qkv or 0.0, weights, self.k_cache[layer].numpy(),
                                   self.v_cache[layer].numpy())

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    def _attention(self, x: torch.Tensor, layer: int, start: int,
                   rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg, w, T = self.cfg, self.w, x.shape[0]
        p = f"model.layers.{layer}.self_attn."
        q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias"))
        k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias"))
        v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias"))
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
        self.k_cache[layer, start:start + T] = k
        self.v_cache[layer, start:start + T] = v
        S = start + T
        keys = self.k_cache[layer, :S].transpose(0, 1)  # [KVH, S, D]
        vals = self.v_cache[layer, :S].transpose(0, 1)
        if T == 1:
            out = self._decode_attention(q, keys, vals)
        else:  # causal over the new tokens; everything cached before is visible
            mask = torch.arange(S)[None, :] <= torch.arange(start, S)[:, None]  # [T, S]
            # enable_gqa: each group of query heads reads its KV head in place, no repeated copy per step
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask,
                                                 enable_gqa=cfg.n_heads != cfg.n_kv_heads)  # [H, T, D]
            out = out.transpose(0, 1)
        return linear(out.reshape(T, cfg.n_heads * cfg.head_dim), w[p + "o_proj.weight"])

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """One token's attention, q [1, H, D] over keys and values [KVH, S, D]: each KV head's
        group of query heads as one [G, D] x [D, S] product. (SDPA takes its unfused path for
        grouped heads on CPU: about 15 ops, 0.4 ms a layer, where this is 4.)"""
        cfg = self.cfg
        q = q.view(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)  # [KVH, G, D]
        scores = torch.bmm(q, keys.transpose(1, 2)).mul_(cfg.head_dim ** -0.5)  # [KVH, G, S]
        return torch.bmm(torch.softmax(scores, dim=-1), vals)  # [KVH, G, D]: heads in order

    # -- feed-forward ------------------------------------------------------------------
    def _mlp(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return by_rows(lambda rows: linear(F.silu(linear(rows, gate)) * linear(rows, up), down), x, self.rows)

    @staticmethod
    def _lowrank_mlp(x: torch.Tensor, gate_base: torch.Tensor, up_base: torch.Tensor, down_base: torch.Tensor,
                     ew) -> torch.Tensor:
        """An expert whose weights are base + b @ a: base(x) + b (a x) for each projection,
        the base's gate and up products given (shared by the layer's experts). The expert's
        own weights are never formed: a and b are all that was read."""
        gate = gate_base + linear(linear(x, ew["gate_a"]), ew["gate_b"])
        up = up_base + linear(linear(x, ew["up_a"]), ew["up_b"])
        h = F.silu(gate) * up
        return linear(h, down_base) + linear(linear(h, ew["down_a"]), ew["down_b"])

    def _lowrank_mlp_block(self, x: torch.Tensor, base: tuple[torch.Tensor, ...], ew) -> torch.Tensor:
        """_lowrank_mlp for rows whose base products were not computed for the whole step."""
        return self._lowrank_mlp(x, linear(x, base[0]), linear(x, base[1]), base[2], ew)

    def route(self, x: torch.Tensor, layer: int,
              logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, K] gate weights and stored-expert indices, as the checkpoint's router picks them
        (from its logits [T, E] where they were computed already).
        An aggregated variant keeps the router's E outputs and maps them to its stored experts
        (cfg.expert_map): two picks may then name one expert, which _moe runs once."""
        if logits is None:
            logits = linear(x, self.w[self._router_name(layer)])  # [T, E]
        table = None if self.cfg.expert_map is None else torch.tensor(self.cfg.expert_map[self.moe_index[layer]])
        if table is not None:  # experts a pruned variant dropped leave the router, as in NAEE
            logits = logits.masked_fill(table < 0, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if self.cfg.family != "mixtral":  # transformers' Mixtral keeps the gate weights in fp32
            top_w = top_w.to(logits.dtype)
        if table is not None:
            top_i = table[top_i]
            # Fewer kept experts than k: the extra picks have gate 0; they repeat the first pick
            # so that nothing more runs.
            dropped = top_i < 0
            top_i = torch.where(dropped, top_i[:, :1], top_i)
            top_w = top_w.masked_fill(dropped, 0.0)
        return top_w, top_i

    def _moe(self, x: torch.Tensor, layer: int, logits: torch.Tensor | None = None) -> torch.Tensor:
        moe_layer = self.moe_index[layer]
        top_w, top_i = self.route(x, layer, logits)
        if self.recorder is not None:
            self.recorder(moe_layer, top_i, top_w, x)
        # (torch.unique sorts: about 70 µs a call here, for two numbers)
        chosen = sorted(set(top_i[0].tolist())) if x.shape[0] == 1 else torch.unique(top_i).tolist()
        # Resident experts first while the missing ones are read; each expert's
        # output is summed in expert order afterwards, so the result does not
        # depend on what happened to be cached.
        missing = [e for e in chosen if not self.experts.resident(moe_layer, e)]
        if self.prefetcher is not None:  # first: it scores what the reads below may evict
            self.prefetcher.on_route(moe_layer, x, top_i, decoding=x.shape[0] == 1)
        self.experts.prefetch(moe_layer, missing, priority=1)
        if x.shape[0] == 1 and layer not in self.base:
            out = self._moe_token(x, moe_layer, chosen, missing, top_w, top_i)
        else:
            out = self._moe_tokens(x, layer, moe_layer, chosen, missing, top_w, top_i)
        p = f"model.layers.{layer}.mlp."
        if p + "shared_expert.gate_proj.weight" in self.w:  # Qwen2-MoE
            shared = self._mlp(x, self.w[p + "shared_expert.gate_proj.weight"],
                               self.w[p + "shared_expert.up_proj.weight"], self.w[p + "shared_expert.down_proj.weight"])
            out = out + torch.sigmoid(linear(x, self.w[p + "shared_expert_gate.weight"])) * shared
        return out

    def _moe_token(self, x: torch.Tensor, moe_layer: int, chosen: list[int], missing: list[int],
                   top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """_moe_tokens for one token (a decode step), in a third of the torch calls: the same
        products and the same fp32 sum in expert order."""
        gates = dict.fromkeys(chosen, 0.0)
        for e, g in zip(top_i[0].tolist(), top_w[0].tolist()):  # fp32 values; a pair's sum rounds as in fp32
            gates[e] += g
        outputs = {}
        for e in sorted(chosen, key=lambda e: e in missing):
            ffn = self.experts.ffn(moe_layer, e) if x.dtype == torch.float32 == top_w.dtype else None
            if ffn is not None:  # one native call (moeedge._core.ExpertFfn)
                outputs[e] = torch.empty_like(x)
                ffn(x.numpy(), self.experts.buffer(moe_layer, e), outputs[e].numpy(), gates[e])
                continue
            ew = self.experts.get(moe_layer, e)
            y = linear(F.silu(linear(x, ew["gate"])) * linear(x, ew["up"]), ew["down"])
            outputs[e] = y.mul_(gates[e]) if y.dtype == top_w.dtype else (y * top_w.new_tensor(gates[e])).to(x.dtype)
            del ew  # unpin before the next expert is read
        out = outputs[chosen[0]]
        for e in chosen[1:]:
            out = out + outputs[e]
        return out

    def _moe_tokens(self, x: torch.Tensor, layer: int, moe_layer: int, chosen: list[int], missing: list[int],
                    top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        base = self.base.get(layer)
        # low-rank: the base's products once for every token, where they fit in one block
        shared_base = base is not None and x.shape[0] <= self.rows
        if shared_base:
            gate_base, up_base = linear(x, base[0]), linear(x, base[1])
        outputs: dict[int, torch.Tensor] = {}
        for e in sorted(chosen, key=lambda e: e in missing):
            picked = top_i == e  # [T, K]; a merged variant's token may pick e twice: gates summed
            tokens = torch.where(picked.any(dim=-1))[0]
            ew = self.experts.get(moe_layer, e)
            if base is None:
                y = self._mlp(x[tokens], ew["gate"], ew["up"], ew["down"])
            elif shared_base:
                y = self._lowrank_mlp(x[tokens], gate_base[tokens], up_base[tokens], base[2], ew)
            else:
                y = by_rows(partial(self._lowrank_mlp_block, base=base, ew=ew), x[tokens], self.rows)
            del ew  # unpin before the next expert is read
            outputs[e] = (tokens, y * (top_w * picked)[tokens].sum(dim=-1, keepdim=True))
        out = torch.zeros_like(x)
        for e in chosen:
            tokens, y = outputs[e]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _ffn(self, x: torch.Tensor, layer: int, logits: torch.Tensor | None = None) -> torch.Tensor:
        if layer in self.moe_index:
            return self._moe(x, layer, logits)
        p = f"model.layers.{layer}.mlp."
        return self._mlp(x, self.w[p + "gate_proj.weight"], self.w[p + "up_proj.weight"], self.w[p + "down_proj.weight"])

    # -- the whole model ---------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """tokens [T] at positions start..start+T-1 -> logits [T, V] (or [1, V], the last)."""
        if start + tokens.shape[0] > self.max_context:
            raise ValueError(f"{start + tokens.shape[0]} tokens exceed max_context={self.max_context}")
        if start == 0 and self.prefetcher is not None:
            self.prefetcher.reset()
        if tokens.shape[0] > NATIVE_MAX_TOKENS:
            return self._forward(tokens, start, all_logits)
        # A decode step's heavy products run on moeedge's own kernel threads; torch's
        # OpenMP threads would only spin against them on the small remaining ops.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._forward(tokens, start, all_logits)
        finally:
            torch.set_num_threads(threads)

    def _forward(self, tokens: torch.Tensor, start: int, all_logits: bool) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        embed = w["model.embed_tokens.weight"]
        if not isinstance(embed, torch.Tensor):  # QuantTensor, or DiskEmbedding: the rows needed
            h = embed.rows(tokens, self.dtype)
        else:
            h = F.embedding(tokens, embed).to(self.dtype)
        rope = self._rope(torch.arange(start, start + tokens.shape[0]))
        one = tokens.shape[0] == 1
        if one:
            cos, sin = (t.reshape(-1).contiguous().numpy() for t in rope)  # [D] each
        for layer in range(cfg.n_layers):
            step = self.steps[layer] if one else None
            if step is not None:  # one native call, h updated in place
                h = h.contiguous()
                x = torch.empty_like(h)
                logits = torch.empty(1, step.router_rows) if step.router_rows else None
                step(h.numpy(), start, cos, sin, x.numpy(), None if logits is None else logits.numpy())
                h = h + self._ffn(x, layer, logits)
                continue
            p = f"model.layers.{layer}."
            h = h + self._attention(rms_norm(h, w[p + "input_layernorm.weight"], cfg.rms_eps), layer, start, rope)
            h = h + self._ffn(rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.rms_eps), layer)
        if not all_logits:
            h = h[-1:]
        return linear(rms_norm(h, w["model.norm.weight"], cfg.rms_eps), self.lm_head)
