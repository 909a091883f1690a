"""`moeedge eval`: how well a model predicts a text, and how far it strays from a reference.

Perplexity over windows of the text, each run as a fresh sequence; against a reference
model with the same tokenizer, also the perplexity ratio, the per-token divergence
KL(reference || model) of the next-token distributions (mean and 99th percentile, in
nats) and how often both pick the same most likely token. The default text is the
held-out split of the default model's corpus (the stdlib packages asyncio/ and email/,
moeedge.train.corpus), which training never saw. Shapes: T = tokens of a window, V = vocabulary.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import moeedge
from moeedge.train import corpus as corpus_lib

DEFAULT_TOKENS = 16384
DEFAULT_WINDOW = 256  # the default model's training length


@functools.lru_cache(maxsize=1)
def _corpus() -> corpus_lib.Corpus:
    return corpus_lib.collect()


def corpus_windows(tokenizer, split: str, n_tokens: int, window: int, seed: int = 0) -> list[list[int]]:
    """About n_tokens tokens of the corpus split ("train" or "heldout") in windows of at most
    `window` tokens: one window from each file in a seeded random order (a random one of
    the file's windows), then a second from each, and so on, so that a small sample still
    spans many files. Each file is encoded as <s> ids </s>, as the trainer encodes it."""
    corpus = _corpus()
    files = corpus.split(split)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    pieces: dict[int, list[list[int]]] = {}
    out, total = [], 0
    for round_ in itertools.count():
        took = False
        for i in order:
            if i not in pieces:
                text = (Path(corpus.root) / files[i].path).read_text(encoding="utf-8")
                ids = tokenizer.encode(text) + tokenizer.eos_ids[:1]
                cut = [ids[s:s + window] for s in range(0, len(ids), window)]
                pieces[i] = [cut[j] for j in rng.permutation(len(cut)) if len(cut[j]) >= 2]
            if round_ < len(pieces[i]):
                piece = pieces[i][round_][:n_tokens - total]
                if len(piece) >= 2:
                    out.append(piece)
                    total += len(piece)
                took = True
            if total >= n_tokens - 1:
                return out
        if not took:  # the split is shorter than n_tokens
            return out


def text_windows(tokenizer, text: str, n_tokens: int, window: int) -> list[list[int]]:
    """The first n_tokens tokens of text, in consecutive windows of at most `window`."""
    ids = tokenizer.encode(text)[:n_tokens]
    return [ids[s:s + window] for s in range(0, len(ids), window) if len(ids[s:s + window]) >= 2]


@dataclass
class Quality:
    tokens: int                      # predicted positions: each window's tokens after its first
    windows: int
    ppl: float
    expert_bytes: int
    ppl_reference: float | None = None
    ppl_ratio: float | None = None   # ppl / ppl_reference
    kl_mean: float | None = None     # KL(reference || model) per token, nats
    kl_p99: float | None = None
    top1_agreement: float | None = None
    expert_bytes_reference: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _log_probs(model, window: list[int]) -> torch.Tensor:
    return torch.log_softmax(model.logits(window)[:-1].double(), dim=-1)  # [T-1, V]: next-token log p


def measure(model, windows: list[list[int]], reference=None) -> Quality:
    """Perplexity of `model` over the windows; with a reference, the comparison figures."""
    nll = nll_ref = 0.0
    kls, agree, count = [], 0, 0
    for w in windows:
        target = torch.tensor(w[1:])[:, None]
        lp = _log_probs(model, w)
        nll -= float(lp.gather(1, target).sum())
        count += len(w) - 1
        if reference is not None:
            lr = _log_probs(reference, w)
            nll_ref -= float(lr.gather(1, target).sum())
            kls.append((lr.exp() * (lr - lp)).sum(-1))                    # [T-1]
            agree += int((lr.argmax(-1) == lp.argmax(-1)).sum())
    if count == 0:
        raise ValueError("the text is too short to evaluate (fewer than 2 tokens)")
    q = Quality(tokens=count, windows=len(windows), ppl=math.exp(nll / count),
                expert_bytes=model.checkpoint.expert_nbytes)
    if reference is not None:
        kl = torch.cat(kls)
        q.ppl_reference = math.exp(nll_ref / count)
        q.ppl_ratio = q.ppl / q.ppl_reference
        q.kl_mean = float(kl.mean())
        q.kl_p99 = float(torch.quantile(kl, 0.99))
        q.top1_agreement = agree / count
        q.expert_bytes_reference = reference.checkpoint.expert_nbytes
    return q


def _tokenizer(model):
    if model.tokenizer is None:
        raise ValueError(f"{model.checkpoint.source} has no tokenizer files: evaluation needs one")
    return model.tokenizer


def check_same_vocabulary(model, reference, sample: str) -> None:
    """Per-token comparisons need one vocabulary: equal sizes and equal ids on the sample."""
    a, b = model.config.vocab, reference.config.vocab
    if a != b:
        raise ValueError(f"{model.checkpoint.source} and {reference.checkpoint.source} have different "
                         f"vocabularies ({a} and {b} tokens): they cannot be compared token by token")
    if _tokenizer(model).encode(sample) != _tokenizer(reference).encode(sample):
        raise ValueError(f"{model.checkpoint.source} and {reference.checkpoint.source} tokenize differently: "
                         f"they cannot be compared token by token")


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def evaluate(source, reference=None, text: str | None = None, n_tokens: int = DEFAULT_TOKENS,
             window: int = DEFAULT_WINDOW, memory_budget: int | str = "auto") -> Quality:
    """Load source (and reference) and measure on text (default: the held-out corpus)."""
    if n_tokens < 2 or window < 2:
        raise ValueError(f"tokens ({n_tokens}) and window ({window}) must both be at least 2")
    with moeedge.load(source, memory_budget=memory_budget, max_context=window) as model:
        tok = _tokenizer(model)
        window = min(window, model.runner.max_context)
        windows = (text_windows(tok, text, n_tokens, window) if text is not None
                   else corpus_windows(tok, "heldout", n_tokens, window))
        if reference is None:
            return measure(model, windows)
        with moeedge.load(reference, memory_budget=memory_budget, max_context=window) as ref:
            check_same_vocabulary(model, ref, text[:4096] if text is not None else tok.decode(windows[0]))
            return measure(model, windows, ref)


def describe(q: Quality, source: str, reference: str | None, text: str | None) -> str:
    where = text or f"the held-out corpus ({', '.join(p + '/' for p in corpus_lib.HELD_OUT)})"
    lines = [f"{source}: perplexity {q.ppl:.3f} over {q.tokens} tokens ({q.windows} windows) of {where}"]
    if reference is not None:
        lines.append(f"against {reference}: perplexity {q.ppl_reference:.3f}, ratio {q.ppl_ratio:.4f}, "
                     f"KL mean {q.kl_mean:.4f} p99 {q.kl_p99:.4f} nats/token, "
                     f"top-1 agreement {100 * q.top1_agreement:.2f}%")
        lines.append(f"expert bytes: {moeedge.format_bytes(q.expert_bytes)} of "
                     f"{moeedge.format_bytes(q.expert_bytes_reference)} "
                     f"({100 * q.expert_bytes / q.expert_bytes_reference:.1f}%)")
    else:
        lines.append(f"expert bytes: {moeedge.format_bytes(q.expert_bytes)}")
    return "\n".join(lines)
