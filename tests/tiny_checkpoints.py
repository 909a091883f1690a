"""Tiny seeded MoE checkpoints written by transformers' own classes with save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch

DECODERS = ("mixtral", "qwen2_moe", "olmoe")


def decoder_config(family: str, dtype: str = "float32"):
    import transformers as tf

    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=160, max_position_embeddings=256, num_experts_per_tok=2, rms_norm_eps=1e-5,
                  dtype=dtype, eos_token_id=2, bos_token_id=1)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=96, num_local_experts=6, **common)
    if family == "qwen2_moe":
        # Layer 1 is a dense MLP (mlp_only_layers) to exercise that path too.
        return tf.Qwen2MoeConfig(intermediate_size=80, moe_intermediate_size=48, shared_expert_intermediate_size=72,
                                 num_experts=6, norm_topk_prob=False, mlp_only_layers=[1], **common)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=6, norm_topk_prob=False, clip_qkv=4.0, **common)
    raise ValueError(family)


def model_class(family: str):
    import transformers as tf

    return {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
            "olmoe": tf.OlmoeForCausalLM}[family]


def make_decoder(directory: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 max_shard_size: str | None = None):
    """Write a checkpoint; return the reference model (fp32, eval)."""
    torch.manual_seed(seed)
    cfg = decoder_config(family, str(dtype).removeprefix("torch."))
    model = model_class(family)(cfg).eval()
    with torch.no_grad():  # random init is near zero: widen it so routing and logits vary
        for p in model.parameters():
            p.normal_(0, 0.08)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_TEXT = ("the quick brown fox jumps over the lazy dog. experts route tokens; a cache keeps hot experts in memory "
         "while the rest stay on disk. hello world, how are you today? fine thanks.")


def write_tokenizer(directory: Path, vocab_size: int = 160) -> None:
    """A tiny BPE tokenizer.json (ids 0-2: <unk>, <s>, </s>) and a chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([_TEXT] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))


if __name__ == "__main__":  # python tests/tiny_checkpoints.py DIR [family]: a tiny chat-ready checkpoint
    import sys

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    make_decoder(out, sys.argv[2] if len(sys.argv) > 2 else "mixtral", seed=4)
    write_tokenizer(out)
    print(out)


def load_shards(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, whether one file or shards."""
    import json

    from safetensors.torch import load_file

    index = Path(directory) / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    return {name: t for f in files for name, t in load_file(Path(directory) / f).items()}


def make_tiny_mixtral(directory: Path) -> Path:
    """The tiny Mixtral several tests share (seed 5, 3 layers of 6 experts) with its tokenizer."""
    make_decoder(directory, "mixtral", seed=5)
    write_tokenizer(directory)
    return directory
