"""A tiny seeded Switch Transformers checkpoint written by transformers' own class with save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch

# 4 + 4 blocks, sparse every other one (blocks 1 and 3 of each stack); a capacity of 3
# tokens per expert drops tokens in a 24-token sequence routed over 8 experts.
SWITCH = dict(vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=4, num_decoder_layers=4,
              num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=3,
              relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)


def make_switch(directory: Path, seed: int = 4, dtype: torch.dtype = torch.float32, std: float = 0.3, **overrides):
    """Write a checkpoint; return the reference model (eval). The default seed and std give
    a greedy continuation that does not fall into a one-token loop at once."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.SwitchTransformersConfig(**{**SWITCH, **overrides}, dtype=str(dtype).removeprefix("torch."))
    model = tf.SwitchTransformersForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # widen the init so routing and logits vary
        for p in model.parameters():
            p.normal_(0, std)
    model = model.to(dtype)
    model.save_pretrained(directory)
    return model
