"""The Switch model's figures and its model card (README.md beside the weights).

Held-out span-corruption loss and token accuracy (teacher-forced over the targets: the
sentinels, the masked spans, </s>) against a unigram model of the targets and against
the same model with each layer's experts replaced by their average; expert usage per
MoE layer (entropy, the busiest expert's share, the share of tokens the capacity
dropped); and how often the next MoE layer's router, applied to this one's input, picks
the same expert (moeedge's stale-gate prefetch). The held-out examples are corrupted by
a fixed seed, the same for every training seed. Shapes: B examples, Ti input tokens,
Tt target tokens, N tokens of one MoE layer, E experts.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SwitchTransformersForConditionalGeneration

from moeedge.formats.switch_config import sparse_blocks
from moeedge.train import model_card
from moeedge.data.span_corruption import EOS_ID, TOKENIZER_FILE, sentinel, shift_right


EVAL_SEED = 20210111   # the held-out corruption, whatever the training seed (Switch's arXiv date)
PROMPT = ('def read_lines(path):\n    """Return the lines of a text file."""\n    with open(path) as f:\n'
          f'        return {sentinel(0)}\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n'
          f'        {sentinel(1)}\n')


def load_exported(directory: Path) -> SwitchTransformersForConditionalGeneration:
    return SwitchTransformersForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()

def examples(stream: np.ndarray, cfg, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, Ti], targets [B, Tt]): n windows spread evenly over the stream, corrupted.
    cfg, here and below, is the trainer's SwitchTrainConfig (not imported: the trainer imports this module)."""
    windows = model_card.windows(stream, cfg.seq_len, n * cfg.seq_len).numpy()
    return cfg.corruption.batch(windows, np.random.default_rng(seed))


def sparse_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """("encoder block 1", SparseMLP), ...: encoder first, as moeedge numbers MoE layers."""
    return [(f"{name.split('.')[0]} block {name.split('.')[2]}", module) for name, module in model.named_modules()
            if name.endswith(".mlp") and hasattr(module, "router")]


def tally(nll: torch.Tensor, correct: torch.Tensor, targets: torch.Tensor, first_sentinel: int) -> dict:
    """Summed negative log-likelihood and correct guesses [B, Tt] over every target and over
    the span tokens alone (not sentinels, not </s>)."""
    span = (targets < first_sentinel) & (targets != EOS_ID)
    return {"nll": float(nll.sum()), "correct": int(correct.sum()), "n": targets.numel(),
            "span_nll": float(nll[span].sum()), "span_correct": int(correct[span].sum()), "span_n": int(span.sum())}


def score(logits: torch.Tensor, targets: torch.Tensor, first_sentinel: int) -> dict:
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return tally(nll, logits.argmax(-1) == targets, targets, first_sentinel)


def summarise(totals: dict) -> dict:
    n, span_n = totals["n"], totals["span_n"]
    return {"loss": totals["nll"] / n, "accuracy": totals["correct"] / n, "span_loss": totals["span_nll"] / span_n,
            "span_accuracy": totals["span_correct"] / span_n, "targets": n, "span_targets": span_n}


@torch.no_grad()
def measure(model, inputs: torch.Tensor, targets: torch.Tensor, cfg, routing: bool = True,
            batch: int = 16) -> dict:
    """Loss and accuracy; with routing, each MoE layer's usage (top-1 before capacity),
    dropped share, and how often the next layer of the same stack, routing this layer's
    input, picks the expert it picks on its own input."""
    layers = sparse_layers(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def hook(i):
        def record(_router, args, out):                            # out: dispatch [B, T, E], probs, logits
            seen[i] = (args[0].flatten(0, 1), out[0].flatten(0, 1).any(-1), out[2].flatten(0, 1).argmax(-1))
        return record

    hooks = [mlp.router.register_forward_hook(hook(i)) for i, (_, mlp) in enumerate(layers)] if routing else []
    totals: dict[str, float] = {}
    usage = torch.zeros(len(layers), cfg.n_experts, dtype=torch.float64)
    kept, same, pairs = torch.zeros(len(layers)), torch.zeros(len(layers)), torch.zeros(len(layers))
    try:
        for inp, tgt in zip(inputs.split(batch), targets.split(batch)):
            logits = model(input_ids=inp, decoder_input_ids=shift_right(tgt)).logits       # [B, Tt, V]
            for k, v in score(logits, tgt, cfg.vocab - cfg.n_sentinels).items():
                totals[k] = totals.get(k, 0) + v
            for i in range(len(layers)) if routing else ():
                hidden, dispatched, top = seen[i]                                           # [N, H], [N], [N]
                usage[i] += torch.bincount(top, minlength=cfg.n_experts)
                kept[i] += float(dispatched.sum())
                nxt = i + 1
                if nxt < len(layers) and layers[nxt][0].split()[0] == layers[i][0].split()[0]:
                    guess = layers[nxt][1].router.classifier(hidden).argmax(-1)
                    same[i] += float((guess == seen[nxt][2]).sum())
                    pairs[i] += len(guess)
    finally:
        for h in hooks:
            h.remove()
    out = summarise(totals)
    if routing:
        tokens = usage.sum(-1)                                                              # [L]
        share = usage / tokens[:, None]
        entropy = -(share * torch.log2(share.clamp_min(1e-12))).sum(-1)
        out["experts"] = [{"layer": name, "entropy_bits": float(entropy[i]), "busiest_share": float(share[i].max()),
                           "busiest_expert": int(share[i].argmax()), "dropped_share": 1 - float(kept[i] / tokens[i]),
                           "tokens": int(tokens[i]), "shares": [round(float(s), 4) for s in share[i]]}
                          for i, (name, _) in enumerate(layers)]
        out["routing_predictability"] = [{"from": layers[i][0], "to": layers[i + 1][0],
                                          "same_top_1": float(same[i] / pairs[i])}
                                         for i in range(len(layers)) if pairs[i]]
    return out


def average_experts(model):
    """A copy whose experts in each MoE layer are all the layer's mean expert (same routing)."""
    avg = copy.deepcopy(model)
    with torch.no_grad():
        for _, mlp in sparse_layers(avg):
            for role in ("wi", "wo"):
                weights = [getattr(expert, role).weight for expert in mlp.experts.values()]
                mean = torch.stack(weights).mean(0)
                for w in weights:
                    w.copy_(mean)
    return avg


def unigram(train_targets: torch.Tensor, targets: torch.Tensor, cfg) -> dict:
    """Target-token frequencies of corrupted training examples (add-one), scored like the models:
    over all targets, and the span tokens' own frequencies over the span tokens."""
    first_sentinel = cfg.vocab - cfg.n_sentinels

    def logp(tokens: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(tokens.flatten(), minlength=cfg.vocab).double() + 1.0
        return (counts / counts.sum()).log()

    def figures(lp: torch.Tensor) -> dict:
        return summarise(tally(-lp[targets], targets == lp.argmax(), targets, first_sentinel))

    is_span = (train_targets < first_sentinel) & (train_targets != EOS_ID)
    every, spans = figures(logp(train_targets)), figures(logp(train_targets[is_span]))
    return {**every, "span_loss": spans["span_loss"], "span_accuracy": spans["span_accuracy"]}


def moeedge_check(directory: Path, inputs: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor) -> dict:
    """The written directory through moeedge.load: its logits against transformers', and a sample."""
    import moeedge

    with moeedge.load(directory, max_context=max(len(inputs), 256)) as m:
        logits = m.logits(inputs.tolist(), shift_right(targets[None])[0].tolist())
        sample = m.generate(PROMPT, max_new_tokens=48, temperature=0)
        tok = m.tokenizer
        roundtrip = tok.decode(tok.encode(PROMPT, add_bos=False)) == PROMPT
        sentinels_whole = tok.encode(sentinel(0), add_bos=False) == [m.config.vocab - 1]
    return {"max_abs_logit_diff": float((logits - reference).abs().max()), "prompt": PROMPT, "sample": sample,
            "tokenizer_roundtrip": roundtrip, "sentinel_is_last_id": sentinels_whole}


def evaluate(directory: Path, state_dir: Path, cfg, n_examples: int) -> dict:
    """Every figure of the card, from the written directory."""
    heldout = np.load(state_dir / "heldout_tokens.npy")
    train = np.load(state_dir / "train_tokens.npy")
    inputs, targets = examples(heldout, cfg, n_examples, EVAL_SEED)
    train_inputs, train_targets = examples(train, cfg, max(1, n_examples // 4), EVAL_SEED + 1)
    model = load_exported(directory)
    result = measure(model, inputs, targets, cfg)
    averaged = measure(average_experts(model), inputs, targets, cfg, routing=False)
    on_train = measure(model, train_inputs, train_targets, cfg, routing=False)
    frequencies = examples(train, cfg, 4 * n_examples, EVAL_SEED + 2)[1]
    with torch.no_grad():
        reference = model(input_ids=inputs[:1], decoder_input_ids=shift_right(targets[:1])).logits[0]
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {
        "eval": {"heldout_tokens_total": int(len(heldout)), "train_tokens_total": int(len(train)),
                 "examples": int(inputs.shape[0]), "seq_len": cfg.seq_len, "input_length": int(inputs.shape[1]),
                 "target_length": int(targets.shape[1]), "targets": result["targets"],
                 "span_targets": result["span_targets"], "seed": EVAL_SEED},
        "params": {"total": n_params, "active": n_params - expert_params * (cfg.n_experts - 1) // cfg.n_experts,
                   "experts": expert_params},
        "loss": {"unigram": unigram(frequencies, targets, cfg), "averaged_experts": averaged,
                 "model": {k: v for k, v in result.items() if k not in ("experts", "routing_predictability")},
                 "model_train_sample": on_train},
        "experts": result["experts"], "routing_predictability": result["routing_predictability"],
        "chance_same_top_1": 1 / cfg.n_experts,
        "moeedge": moeedge_check(directory, inputs[0], targets[0], reference),
    }


def render(record: dict) -> str:
    return "\n".join(part(record) for part in (_header, _architecture, _data, _recipe, _results, _through_moeedge))


def _header(record: dict) -> str:
    c, params = record["corpus"], record["figures"]["params"]
    return f"""---
library_name: transformers
pipeline_tag: text2text-generation
tags: [switch_transformers, moe, python, code, span-corruption]
---

# moeedge Switch model

A Switch Transformers encoder-decoder ({params['total'] / 1e6:.1f}M parameters, {params['active'] / 1e6:.1f}M
active per token; {params['experts'] / 1e6:.1f}M in experts) trained from scratch on CPU with T5's span
corruption on the {c['python_version']} standard library. Given Python with spans cut out and
marked `<extra_id_0>`, `<extra_id_1>`, …, it writes what it guesses for each span. It is
for exercising moeedge's encoder-decoder path (top-1 routing, expert capacity, dropped
tokens) with real routing; it does not write correct programs.
"""


def _architecture(record: dict) -> str:
    r = record["recipe"]
    sparse = " and ".join(map(str, sparse_blocks(r["n_layers"], r["n_layers"] // 2)))
    architecture = "\n".join(f"| {k} | {v} |" for k, v in (
        ("architecture", "`SwitchTransformersForConditionalGeneration` (fp32 weights)"),
        ("blocks", f"{r['n_layers']} encoder + {r['n_layers']} decoder, d_model {r['d_model']}, {r['n_heads']} heads "
                   f"of {r['d_kv']}, ReLU FFN {r['d_ff']}"),
        ("experts", f"{r['n_experts']} in every other block (blocks {sparse} of each stack), top-1, "
                    f"d_ff {r['d_ff']} each"),
        ("expert capacity", f"{record['expert_capacity']} tokens per expert per sequence ({r['capacity_factor']:g} × "
                            f"{record['input_length']} / {r['n_experts']}), in sequence order; the rest pass by the "
                            f"residual only"),
        ("vocabulary", f"{r['vocab']}: sentencepiece BPE with byte fallback, `<pad>` 0, `</s>` 1, `<unk>` 2, no BOS; "
                       f"the last {r['n_sentinels']} ids are `<extra_id_{r['n_sentinels'] - 1}>` … `<extra_id_0>` "
                       f"(`{TOKENIZER_FILE}`; moeedge and transformers' `AutoTokenizer` encode the same ids)"),
        ("position", "T5 relative position buckets, shared by each stack's blocks")))
    return f"""## Architecture

| | |
|---|---|
{architecture}

fp32 because moeedge's Switch runner computes in the weights' dtype: these weights give
the same logits in moeedge as in transformers (and as this card reports).
"""


def _data(record: dict) -> str:
    r, c, ev = record["recipe"], record["corpus"], record["figures"]["eval"]
    splits = "\n".join(f"| {label} | {c[name]['files']} | {c[name]['bytes']:,} | {ev[name + '_tokens_total']:,} | "
                       f"`{c[name]['sha256'][:16]}…` |" for name, label in model_card.SPLIT_LABELS)
    return f"""## Data

`.py` files under `sysconfig.get_paths()['stdlib']` of {c['python_version']}, without
`site-packages/` and test directories. Whole top-level packages are held out:
{', '.join(f'`{p}/`' for p in c['held_out_packages'])}.

| split | files | bytes | tokens | sha256 |
|---|---|---|---|---|
{splits}

Corpus hash `{c['sha256']}`; `training.json` lists every file with its sha256. Files are
tokenized and concatenated; each example is a window of {r['seq_len']} tokens with
{100 * r['noise_density']:g}% of them corrupted in spans of mean length {r['mean_span']:g} (T5's
`random_spans_noise_mask`): {record['input_length']} input tokens (kept tokens, a sentinel per span; no
`</s>`, as moeedge prompts have none) and {record['target_length']} target tokens (each span after its
sentinel, then `</s>`).
"""


def _recipe(record: dict) -> str:
    r, plan = record["recipe"], record["plan"]
    speed = [e["tokens_per_s"] for e in record["log"]]
    last = record["log"][-1]
    source = ("given" if plan["source"] == "given" else
              f"fixed by the clock to fit {plan['source'].split(', ')[1]} (the decay starts when it must for the "
              f"run to end in time)")
    tokens_per_step = r["batch"] * r["seq_len"]
    return f"""## Recipe

From scratch, as Switch was: T5's initialisation with every matrix's variance cut to
{r['init_scale']:g}× (Switch's reduced scale; embeddings and norms at T5's; routers drawn like any
other matrix); {record['steps']} steps of {r['batch']} examples
({tokens_per_step:,} corpus tokens a step, {record['tokens_seen']:,} in all, {record['epochs']:.2f} epochs of the
training split);
AdamW (β 0.9, 0.95; weight decay {r['weight_decay']:g} on matrices), learning rate warming up over
{r['warmup_steps']} steps to {r['lr']:g}, holding, and decaying to {r['min_lr']:g} over the last {r['decay_percent']}%;
gradient clipping {r['grad_clip']:g}; the routers at {r['router_lr_scale']:g}× the learning rate (Adam steps
every weight by about the learning rate, so small routers would swing to a few experts;
Switch's Adafactor scales steps by each weight's size). Losses: cross-entropy over the
targets plus, for each MoE layer, the load-balancing loss (coefficient {r['router_aux_loss_coef']:g}; the layers'
mean was {last['aux']:.3f} at the end, 1.0 being balanced) and the router z-loss (coefficient
{r['router_z_loss_coef']:g}; mean {last['z']:.2f} at the end). No dropout, no router jitter. Seed
{r['seed']}; CPU threads: {record['threads']}; {record['train_s'] / 60:.1f} minutes of training at
{min(speed):,}–{max(speed):,} corpus tokens/s. Step count: {source}. Reproduce the weights (same
Python, so the same corpus; same thread count):

```sh
{record['reproduce']}
```
"""


def _results(record: dict) -> str:
    r, fig = record["recipe"], record["figures"]
    loss, ev = fig["loss"], fig["eval"]
    rows = "\n".join(f"| {label} | {loss[k]['loss']:.3f} | {100 * loss[k]['accuracy']:.1f}% | "
                     f"{loss[k]['span_loss']:.3f} | {100 * loss[k]['span_accuracy']:.1f}% |"
                     for k, label in (("unigram", "unigram (target-token frequencies of training examples)"),
                                      ("averaged_experts", "this model, each layer's experts replaced by their "
                                                           "average"),
                                      ("model", "**this model**")))
    usage = "\n".join(f"| {e['layer']} | {e['entropy_bits']:.2f} | {100 * e['busiest_share']:.1f}% "
                      f"(expert {e['busiest_expert']}) | {100 * e['dropped_share']:.1f}% |" for e in fig["experts"])
    routing = "\n".join(f"| {p['from']} → {p['to']} | {100 * p['same_top_1']:.1f}% |"
                        for p in fig["routing_predictability"])
    return f"""## Results

Teacher-forced on {ev['examples']} held-out examples ({ev['targets']:,} targets, {ev['span_targets']:,} of them
span tokens) spread over the held-out packages and corrupted with seed {ev['seed']}; loss in
nats per token (lower is better), accuracy of the argmax:

| model | loss, all targets | accuracy | loss, span tokens | accuracy |
|---|---|---|---|---|
{rows}

On a sample of the training split the model scores {loss['model_train_sample']['loss']:.3f}
({100 * loss['model_train_sample']['accuracy']:.1f}%).

### Expert usage

Share of each MoE layer's tokens whose top-1 is the busiest expert (uniform:
{100 / r['n_experts']:.1f}%, entropy {math.log2(r['n_experts']):.2f} bits), and the share the expert capacity dropped,
on the held-out examples (decoder layers see the teacher-forced targets):

| MoE layer | entropy (bits) | busiest expert | dropped by capacity |
|---|---|---|---|
{usage}

### Routing predictability

How often the next MoE layer's router, applied to this MoE layer's input (moeedge's
stale-gate prefetch), picks the expert it picks on its own input (chance:
{100 * fig['chance_same_top_1']:.1f}%):

| layers | same top-1 |
|---|---|
{routing}
"""


def _through_moeedge(record: dict) -> str:
    me = record["figures"]["moeedge"]
    sample = me["sample"].rstrip().replace("```", "ʼʼʼ")
    return f"""## Through moeedge

`moeedge.load()` on this directory gives logits within {me['max_abs_logit_diff']:.1e} of transformers' on a
held-out example. Greedy, up to 48 tokens, for this input:

```python
{me['prompt']}```

it writes:

```
{sample}
```
"""
