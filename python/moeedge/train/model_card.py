"""The default model's figures and its model card (README.md beside the weights).

Held-out perplexity against a unigram baseline, against the dense model it was upcycled
from, and against itself with each layer's experts replaced by their average (if the
experts had not specialised, averaging them would cost nothing); expert usage per layer;
and how often the next layer's router, applied to this layer's hidden state, picks the
same top-k (what moeedge's prefetch guesses with). Shapes: W windows of T tokens,
N = W*T tokens, L layers, E experts, K = top-k.
"""
from __future__ import annotations

import platform
import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeedge.train.mixtral_experts import load_exported


SPLIT_LABELS = (("train", "train"), ("heldout", "held out"))
PROMPT = 'import os\n\n\ndef read_lines(path):\n    """'


def windows(stream: np.ndarray, seq_len: int, n_tokens: int) -> torch.Tensor:
    """[W, T] windows spread evenly over the stream, about n_tokens in all."""
    available = len(stream) // seq_len
    count = max(1, min(available, n_tokens // seq_len))
    starts = np.linspace(0, (available - 1) * seq_len, count).astype(np.int64) // seq_len * seq_len
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def unigram_perplexity(train: np.ndarray, evaluated: torch.Tensor, vocab: int) -> float:
    """Token frequencies of the training split (add-one), scored on the same targets as the models."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[evaluated[:, 1:].numpy()].mean()))


@torch.no_grad()
def measure(model, data: torch.Tensor, routing: bool = True, batch: int = 8) -> dict:
    """Perplexity over data [W, T] (every position after the first); with routing, expert
    usage [L, E] and, for each layer after the first, how often its router applied to the
    previous layer's MoE input picks the same top-k set."""
    layers = model.model.layers
    cfg = model.config
    routing = routing and cfg.num_local_experts > 1
    n_layers, n_experts, k = len(layers), cfg.num_local_experts, cfg.num_experts_per_tok
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(layers)] if routing else []
    nll, count = 0.0, 0
    usage = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    same = torch.zeros(max(0, n_layers - 1), dtype=torch.float64)
    overlap = torch.zeros_like(same)
    try:
        for b in data.split(batch):
            logits = model(input_ids=b).logits                               # [B, T, V]
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
            count += b[:, 1:].numel()
            for i in range(n_layers) if routing else ():
                router = layers[i].mlp.gate.weight                            # [E, H]
                top = (inputs[i].flatten(0, 1) @ router.T).topk(k).indices   # [N, K]
                usage[i] += torch.bincount(top.flatten(), minlength=n_experts)
                if i:
                    guess = (inputs[i - 1].flatten(0, 1) @ router.T).topk(k).indices
                    hits = (guess[:, :, None] == top[:, None, :]).any(-1).sum(-1)   # [N] of K guessed
                    same[i - 1] += float((hits == k).sum())
                    overlap[i - 1] += float(hits.sum()) / k
    finally:
        for h in hooks:
            h.remove()
    out = {"perplexity": math.exp(nll / count), "tokens": count}
    if routing:
        tokens = usage[0].sum() / k
        share = usage / usage.sum(-1, keepdim=True)                          # [L, E]
        entropy = -(share * torch.log2(share.clamp_min(1e-12))).sum(-1)
        out["experts"] = [{"layer": i, "entropy_bits": float(entropy[i]), "busiest_share": float(share[i].max()),
                           "busiest_expert": int(share[i].argmax()), "shares": [round(float(s), 4) for s in share[i]]}
                          for i in range(n_layers)]
        out["routing_predictability"] = [{"layer": i + 1, "same_top_k": float(same[i] / tokens),
                                          "mean_overlap": float(overlap[i] / tokens)} for i in range(n_layers - 1)]
    return out


def average_experts(model):
    """A copy whose experts in each layer are all the layer's mean expert."""
    avg = copy.deepcopy(model)
    with torch.no_grad():
        for layer in avg.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.copy_(p.mean(0, keepdim=True).expand_as(p))
    return avg


def moeedge_check(directory: Path, window: torch.Tensor, reference: torch.Tensor) -> dict:
    """The shipped directory through moeedge.load: its logits against transformers', and a sample."""
    import moeedge

    with moeedge.load(directory, max_context=max(len(window), 256)) as m:
        logits = m.logits(window.tolist())
        sample = m.generate(PROMPT, max_new_tokens=64, temperature=0)
        tok = m.tokenizer
        roundtrip = tok.decode(tok.encode(PROMPT, add_bos=False)) == PROMPT
    return {"max_abs_logit_diff": float((logits - reference).abs().max()), "prompt": PROMPT, "sample": sample,
            "tokenizer_roundtrip": roundtrip}


def evaluate(directory: Path, dense, state_dir: Path, cfg, eval_tokens: int) -> dict:
    """Every figure of the card; `dense` is the model as it was when upcycled, cfg the
    trainer's TrainConfig (not imported here: the trainer imports this module)."""
    heldout = np.load(state_dir / "heldout_tokens.npy")
    train = np.load(state_dir / "train_tokens.npy")
    held = windows(heldout, cfg.seq_len, eval_tokens)
    moe = load_exported(directory)                       # the shipped bf16 weights, computed in fp32
    result = measure(moe, held)
    averaged = measure(average_experts(moe), held, routing=False)
    on_train = measure(moe, windows(train, cfg.seq_len, eval_tokens // 4), routing=False)
    dense = dense.to(torch.bfloat16).float().eval()       # rounded as the MoE's weights were
    before = measure(dense, held, routing=False)
    with torch.no_grad():
        reference = moe(input_ids=held[:1]).logits[0]
    return {
        "eval": {"heldout_tokens_total": int(len(heldout)), "train_tokens_total": int(len(train)),
                 "windows": int(held.shape[0]), "seq_len": cfg.seq_len, "targets": result["tokens"]},
        "perplexity": {"unigram": unigram_perplexity(train, held, cfg.vocab), "dense": before["perplexity"],
                       "averaged_experts": averaged["perplexity"], "moe": result["perplexity"],
                       "moe_train_sample": on_train["perplexity"]},
        "experts": result["experts"], "routing_predictability": result["routing_predictability"],
        "chance_same_top_k": 1 / math.comb(cfg.n_experts, cfg.top_k), "chance_overlap": cfg.top_k / cfg.n_experts,
        "moeedge": moeedge_check(directory, held[0], reference),
    }


def versions() -> dict:

    import sentencepiece
    import transformers

    import moeedge

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sentencepiece": sentencepiece.__version__, "numpy": np.__version__,
            "moeedge": getattr(moeedge, "__version__", "?")}


def write(directory: Path, record: dict, render_card=None) -> None:
    """training.json and the card; render_card(record) -> markdown (default: this model's)."""
    (directory / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (directory / "README.md").write_text((render_card or render)(record))


def _params(record: dict) -> tuple[float, float]:
    r = record["recipe"]
    h, f, e, layers = r["hidden"], r["intermediate"], r["n_experts"], r["n_layers"]
    head = h // r["n_heads"]
    attention = h * head * (2 * r["n_heads"] + 2 * r["n_kv_heads"]) + 2 * h
    expert = 3 * h * f
    total = 2 * r["vocab"] * h + h + layers * (attention + e * expert + e * h)
    active = total - layers * (e - r["top_k"]) * expert
    return total / 1e6, active / 1e6


def render(record: dict) -> str:
    return "\n".join(part(record) for part in (_header, _architecture, _data, _recipe, _results, _through_moeedge))


def _header(record: dict) -> str:
    c = record["corpus"]
    total, active = _params(record)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, python, code, sparse-upcycling]
---

# moeedge default model

The model `moeedge.load()` and `moeedge chat` use when no checkpoint is named: a
Mixtral-architecture mixture of experts with {total:.1f}M parameters ({active:.1f}M active
per token), trained from scratch on CPU on the {c['python_version']} standard
library. It writes Python that looks like the standard library; it does not write
correct programs, follow instructions or know facts. Its use is to exercise moeedge's
(and llama.cpp's) Mixtral path end to end with real routing, in {record['figures']['eval']['seq_len']}-token
contexts, on any machine.
"""


def _architecture(record: dict) -> str:
    r = record["recipe"]
    layers = (f"{r['n_layers']}, {r['hidden']}, {r['n_heads']} ({r['n_kv_heads']}), "
              f"head dim {r['hidden'] // r['n_heads']}")
    context = (f"trained on {r['seq_len']}-token windows; RoPE θ {r['rope_theta']:g}; "
               f"`max_position_embeddings` {r['max_position']}")
    return f"""## Architecture

| | |
|---|---|
| architecture | `MixtralForCausalLM` (bf16 weights, per-expert `w1`/`w2`/`w3` tensors) |
| layers, hidden, heads (KV heads) | {layers} |
| experts | {r['n_experts']} per layer, top-{r['top_k']}, intermediate {r['intermediate']} |
| vocabulary | {r['vocab']}, sentencepiece BPE with byte fallback (`tokenizer.model`) |
| context | {context} |
"""


def _data(record: dict) -> str:
    c, ev = record["corpus"], record["figures"]["eval"]
    splits = "\n".join(f"| {label} | {c[name]['files']} | {c[name]['bytes']:,} | {ev[name + '_tokens_total']:,} | "
                       f"`{c[name]['sha256'][:16]}…` |" for name, label in SPLIT_LABELS)
    return f"""## Data

`.py` files under `sysconfig.get_paths()['stdlib']` of {c['python_version']}, without
`site-packages/` and test directories (`test/`, `tests/`, `idle_test/`). Whole top-level
packages are held out for evaluation: {', '.join(f'`{p}/`' for p in c['held_out_packages'])}.

| split | files | bytes | tokens | sha256 |
|---|---|---|---|---|
{splits}

Corpus hash `{c['sha256']}`; `training.json` lists every file with its sha256.
Each file is tokenized as `<s>` … `</s>`; files are concatenated and cut into windows.
"""


def _recipe(record: dict) -> str:
    r, plan = record["recipe"], record["plan"]
    tokens_per_step = r["batch"] * r["seq_len"]
    dense_steps, moe_steps = record["dense_steps"], record["moe_steps"]
    dense_tokens, moe_tokens = dense_steps * tokens_per_step, moe_steps * tokens_per_step
    speed = [e["tokens_per_s"] for e in record["log"]]
    balance = next(e["aux"] for e in reversed(record["log"]) if e["phase"] == "moe")
    source = ("given" if plan["source"] == "given" else
              f"fixed by the clock to fit {plan['source'].split(', ')[1]} (each phase decays when it must to end "
              f"in its time budget)")
    return f"""## Recipe: dense, then sparse upcycling

1. Tokenizer: sentencepiece BPE, {r['vocab']} pieces, trained on the training split's lines
   with no normalisation (indentation runs are pieces, newlines are the byte `<0x0A>`).
2. Dense: the same network with one expert, top-1 (a plain SwiGLU FFN): {dense_steps} steps of
   {r['batch']}×{r['seq_len']} tokens ({dense_tokens:,} tokens), learning rate warming up over
   {r['warmup_steps']} steps to {r['lr']:g}, holding, and decaying to {r['min_lr']:g} over the last
   {r['decay_percent']}%.
3. Upcycling: the dense FFN copied into all {r['n_experts']} experts of each layer, plus Gaussian
   noise of {r['upcycle_noise']:g}× each weight's std; routers freshly initialised; everything
   else as trained. A fresh AdamW.
4. MoE: {moe_steps} steps ({moe_tokens:,} tokens; {record['epochs']:.2f} epochs of the training split in
   all) with the Switch Transformer's load-balancing loss, per layer (coefficient
   {r['router_aux_loss_coef']:g}; it ended at {balance:.3f}, 1.0 being perfectly balanced); learning rate warming
   up over {r['rewarm_steps']} steps to {r['moe_lr']:g}, holding, decaying to {r['min_lr']:g} over the last
   {r['decay_percent']}%.

AdamW (β 0.9, 0.95; weight decay {r['weight_decay']:g} on matrices), gradient clipping {r['grad_clip']:g}.
Seed {r['seed']}; {record['threads']} CPU threads; {record['train_s'] / 60:.1f} minutes of training at
{min(speed):,}–{max(speed):,} tokens/s. Step counts: {source}. Reproduce the weights (same
Python, so the same corpus; same thread count):

```sh
{record['reproduce']}
```
"""


def _results(record: dict) -> str:
    r, fig = record["recipe"], record["figures"]
    ppl, ev = fig["perplexity"], fig["eval"]
    usage = "\n".join(
        f"| {e['layer']} | {e['entropy_bits']:.2f} | {100 * e['busiest_share']:.1f}% (expert {e['busiest_expert']}) | "
        + " ".join(f"{100 * s:.0f}" for s in e["shares"]) + " |" for e in fig["experts"])
    routing = "\n".join(f"| {p['layer'] - 1} → {p['layer']} | {100 * p['same_top_k']:.1f}% | "
                        f"{100 * p['mean_overlap']:.1f}% |" for p in fig["routing_predictability"])
    return f"""## Results

Perplexity per token on {ev['targets']:,} held-out targets ({ev['windows']} windows of {ev['seq_len']}
tokens spread over the held-out packages; lower is better):

| model | held-out perplexity |
|---|---|
| unigram (training-split token frequencies) | {ppl['unigram']:.1f} |
| the dense model, at upcycling | {ppl['dense']:.2f} |
| this model, each layer's experts replaced by their average | {ppl['averaged_experts']:.2f} |
| **this model** | **{ppl['moe']:.2f}** |

On a sample of the training split the same model scores {ppl['moe_train_sample']:.2f}.

### Expert usage

Share of the top-{r['top_k']} assignments each expert takes on the held-out windows
(uniform: {100 / r['n_experts']:.1f}% each, entropy {math.log2(r['n_experts']):.2f} bits):

| layer | entropy (bits) | busiest expert | shares by expert (%) |
|---|---|---|---|
{usage}

### Routing predictability

How often layer *l*+1's router, applied to layer *l*'s MoE input (what moeedge's
prefetch does), picks the same top-{r['top_k']} set as it does on its own input
(chance: {100 * fig['chance_same_top_k']:.1f}% same set, {100 * fig['chance_overlap']:.1f}% overlap):

| layers | same top-{r['top_k']} set | experts guessed right |
|---|---|---|
{routing}
"""


def _through_moeedge(record: dict) -> str:
    me = record["figures"]["moeedge"]
    sample = me["sample"].rstrip().replace("```", "ʼʼʼ")
    return f"""## Through moeedge

`moeedge.load()` on this directory gives logits within {me['max_abs_logit_diff']:.1e} of transformers'
(bf16 weights, fp32 activations) on a held-out window. Greedy, 64 tokens:

```python
{me['prompt']}{sample}
```
"""
