"""Tensor names and shapes of a Hugging Face decoder MoE (Mixtral, Qwen2-MoE, OLMoE):
what moeedge.models.decoder reads, so that a checkpoint lacking one is refused when it
is opened, not when the runner first looks for it."""
from __future__ import annotations

from moeedge.formats.errors import CheckpointError, shown
from moeedge.formats.hf_config import DecoderConfig

# family -> (MoE block prefix, router, expert tensor pattern, (gate, up, down) names)
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", "experts.{e}.{w}.weight", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", "gate", "experts.{e}.{w}.weight", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", "gate", "experts.{e}.{w}.weight", ("gate_proj", "up_proj", "down_proj")),
}
# Low-rank variants (moeedge aggregate --method lowrank): a MoE layer whose base expert is
# stored among the dense weights (as expert "base") stores each expert's weights W as
# factors of W - base = b @ a, named as PEFT names LoRA factors: a [r, in], b [out, r].
LOWRANK_FACTORS = (("a", "lora_A"), ("b", "lora_B"))
LAYER_TENSOR = r"model\.layers\.(\d+)\."  # group 1: the decoder layer a tensor belongs to


def expert_tensor_names(cfg: DecoderConfig, moe_layer: int, e: int | str, lowrank: bool = False
                        ) -> list[tuple[str, str]]:
    """[(role, tensor name)] of stored expert e of a MoE layer, in packing order: gate, up,
    down, or with lowrank their factors gate_a, gate_b, up_a, ... (e="base": the base)."""
    block, _, pattern, names = EXPERT_NAMES[cfg.family]
    prefix = f"model.layers.{cfg.moe_layers[moe_layer]}.{block}."
    roles = list(zip(("gate", "up", "down"), names))
    if not lowrank:
        return [(role, prefix + pattern.format(e=e, w=w)) for role, w in roles]
    return [(f"{role}_{f}", prefix + pattern.format(e=e, w=f"{w}.{peft}"))
            for role, w in roles for f, peft in LOWRANK_FACTORS]


def expert_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """role -> [out, in] of each expert matrix."""
    return {"gate": (cfg.expert_intermediate, cfg.hidden), "up": (cfg.expert_intermediate, cfg.hidden),
            "down": (cfg.hidden, cfg.expert_intermediate)}


def _mlp(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}gate_proj.weight": (width, hidden), f"{prefix}up_proj.weight": (width, hidden),
            f"{prefix}down_proj.weight": (hidden, width)}


def expected_dense(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every dense tensor the runner reads, with its shape."""
    H, V = cfg.hidden, cfg.vocab
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    block = EXPERT_NAMES[cfg.family][0]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, H)
    sparse = set(cfg.moe_layers)
    for layer in range(cfg.n_layers):
        p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       a + "q_proj.weight": (q, H), a + "k_proj.weight": (kv, H), a + "v_proj.weight": (kv, H),
                       a + "o_proj.weight": (H, q)})
        if cfg.family == "olmoe":  # q/k norms over the whole projections
            shapes.update({a + "q_norm.weight": (q,), a + "k_norm.weight": (kv,)})
        if layer not in sparse:
            shapes.update(_mlp(p + "mlp.", H, cfg.dense_intermediate))
            continue
        shapes[f"{p}{block}.gate.weight"] = (cfg.n_experts, H)  # the router: one output per expert
        if cfg.shared_expert_intermediate:  # Qwen2-MoE
            shapes.update(_mlp(p + "mlp.shared_expert.", H, cfg.shared_expert_intermediate))
            shapes[p + "mlp.shared_expert_gate.weight"] = (1, H)
    return shapes


def optional_dense(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Dense tensors the runner reads where present (Qwen2-MoE's q/k/v biases, a tied lm_head)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"lm_head.weight": (cfg.vocab, cfg.hidden)}
    for layer in range(cfg.n_layers):
        a = f"model.layers.{layer}.self_attn."
        shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
    return shapes


def check_attention_biases(cfg: DecoderConfig, tensors: dict, config) -> None:
    """The q/k/v biases are in the file exactly where the config says the model has them:
    otherwise transformers would initialize missing ones at random or ignore stored ones,
    and moeedge (which adds those it finds) would compute another model."""
    names = [f"model.layers.{layer}.self_attn.{m}_proj.bias" for layer in range(cfg.n_layers) for m in "qkv"]
    present = [n for n in names if n in tensors]
    if cfg.qkv_bias and len(present) < len(names):
        missing = next(n for n in names if n not in tensors)
        raise CheckpointError(f"{config}: qkv_bias = True, but tensor {shown(missing)} is missing "
                              f"(transformers would initialize it at random)")
    if not cfg.qkv_bias and present:
        flag = "qkv_bias = False" if cfg.family == "qwen2_moe" else f"{cfg.family} has no q/k/v biases"
        raise CheckpointError(f"{config}: {flag}, but {tensors[present[0]].path} holds {shown(present[0])} "
                              f"(transformers would ignore it)")
