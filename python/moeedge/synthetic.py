"""Full-size Mixtral-shaped checkpoints with random weights, for memory and IO work.

Written shard by shard (one layer or block per shard, never more than one in memory),
bf16, in the Hugging Face layout that `moeedge.load` and transformers read:

    python -m moeedge.synthetic mixtral-medium -o /var/tmp/moeedge-models/mixtral-medium
    python -m moeedge.synthetic mixtral-8x7b --layers 2 -o /var/tmp/moeedge-models/mixtral-8x7b-2l
    python -m moeedge.synthetic switch-base-128 -o /var/tmp/moeedge-models/switch-base-128
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

SHAPES = {
    "mixtral-medium": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    # The same structure, small: for tests of this writer.
    "mixtral-test": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128),
}
SWITCH_SHAPES = {
    "switch-base-128": dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                            num_experts=128, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
                            expert_capacity=64, vocab_size=32128),
    # The same structure, small: for tests of this writer.
    "switch-test": dict(d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=4,
                        num_experts=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                        expert_capacity=8, vocab_size=128),
}
STD = 0.02  # transformers' initializer_range: activations stay finite across layers


def _layer(cfg: dict, layer: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def rand(*shape):
        return (torch.randn(shape, generator=gen) * STD).to(torch.bfloat16)

    p = f"model.layers.{layer}."
    out = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
           p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
           p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
           p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
           p + "block_sparse_moe.gate.weight": rand(cfg["num_local_experts"], h)}
    for e in range(cfg["num_local_experts"]):
        q = f"{p}block_sparse_moe.experts.{e}."
        out[q + "w1.weight"], out[q + "w3.weight"], out[q + "w2.weight"] = rand(i, h), rand(i, h), rand(h, i)
    return out


def bytes_needed(cfg: dict) -> int:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * kv * h + cfg["num_local_experts"] * (3 * h * i + h)
    return 2 * (cfg["num_hidden_layers"] * per_layer + 2 * v * h)


def write(name: str, out: Path, layers: int | None = None, seed: int = 0) -> Path:
    cfg = dict(SHAPES[name], model_type="mixtral", architectures=["MixtralForCausalLM"], rms_norm_eps=1e-5,
               rope_theta=1e6, max_position_embeddings=32768, torch_dtype="bfloat16", bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False, hidden_act="silu")
    if layers:
        cfg["num_hidden_layers"] = layers
    need = bytes_needed(cfg)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > free // 2:
        raise SystemExit(f"moeedge: error: {name} needs {need / 1e9:.1f} GB, more than half of the "
                         f"{free / 1e9:.1f} GB free in {out}")
    gen = torch.Generator().manual_seed(seed)
    n = cfg["num_hidden_layers"]
    weight_map = {}
    shards = [f"model-{k + 1:05d}-of-{n + 1:05d}.safetensors" for k in range(n + 1)]
    for layer in tqdm(range(n), desc=f"{name}: {need / 1e9:.1f} GB", unit="layer"):
        tensors = _layer(cfg, layer, gen)
        save_file(tensors, out / shards[layer], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shards[layer]))
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    last = {"model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * STD).to(torch.bfloat16),
            "lm_head.weight": (torch.randn(v, h, generator=gen) * STD).to(torch.bfloat16),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    save_file(last, out / shards[n], metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(last, shards[n]))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": need},
                                                                  "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_switch(name: str, out: Path, seed: int = 0) -> Path:
    """Names and shapes come from transformers' own class built on the meta device (no memory)."""
    # lazy: transformers (seconds to import) only for the Switch shapes
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(**SWITCH_SHAPES[name], tie_word_embeddings=True, dtype="bfloat16")
    with torch.device("meta"):
        model = SwitchTransformersForConditionalGeneration(config)
    # Tied embeddings are stored once, as shared.weight, the way save_pretrained writes them.
    skip = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if n not in skip}
    need = 2 * sum(math.prod(s) for s in shapes.values())
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > free // 2:
        raise SystemExit(f"moeedge: error: {name} needs {need / 1e9:.1f} GB, more than half of the "
                         f"{free / 1e9:.1f} GB free in {out}")
    groups: dict[str, list[str]] = {}
    for n in shapes:  # one shard per block, the rest together
        parts = n.split(".")
        groups.setdefault(".".join(parts[:3]) if parts[1] == "block" else "rest", []).append(n)
    gen = torch.Generator().manual_seed(seed)
    names = sorted(groups, key=lambda g: (g == "rest", g.split(".")[0], int(g.split(".")[2]) if g != "rest" else 0))
    shards = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    weight_map = {}
    for group, shard in tqdm(list(zip(names, shards)), desc=f"{name}: {need / 1e9:.1f} GB", unit="shard"):
        tensors = {}
        for n in groups[group]:
            if "layer_norm" in n:
                tensors[n] = torch.ones(shapes[n], dtype=torch.bfloat16)
            else:
                tensors[n] = (torch.randn(shapes[n], generator=gen) * STD).to(torch.bfloat16)
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": need},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SHAPES) + sorted(SWITCH_SHAPES))
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=None, help="write a slice of this many layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.name in SWITCH_SHAPES:
        write_switch(args.name, args.out, args.seed)
    else:
        write(args.name, args.out, args.layers, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
