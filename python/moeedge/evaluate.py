"""`moeedge eval`: how well a model predicts a text, and how far it strays from a reference.

Perplexity over windows of the text, each run as a fresh sequence; against a reference
model with the same tokenizer, also the perplexity ratio, the per-token divergence
KL(reference || model) of the next-token distributions (mean and 99th percentile, in
nats) and how often both pick the same most likely token. The default text is the
held-out split of the default model's corpus (the stdlib packages asyncio/ and email/,
moeedge.data.corpus), which training never saw.

A Switch Transformers (encoder-decoder) model is scored as its trainer scores it
(moeedge.train.switch_card): windows of the split's token stream, spread evenly over it,
span-corrupted as in training (a fixed seed), and the decoder teacher-forced over the
targets (sentinels, masked spans, </s>): span-corruption loss and accuracy per target
token, `ppl` = exp(loss), and the KL and agreement of the decoder's next-token
distributions. Shapes: T = tokens of a window (Switch: its targets), V = vocabulary.
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
from moeedge.data import corpus as corpus_lib
from moeedge.data.span_corruption import SpanCorruption, encode_stream, shift_right
from moeedge.progress import progress_bar

DEFAULT_TOKENS = 16384
DEFAULT_WINDOW = 256  # the default model's training length, and the Switch model's
# The Switch trainer's corruption (moeedge.train.switch_model.SwitchTrainConfig) and the
# held-out seed of its model card (moeedge.train.switch_card.EVAL_SEED).
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0
SPAN_EVAL_SEED = 20210111
SAMPLE = 'def read_lines(path):\n    """Lines of a file."""\n    with open(path) as f:\n        return list(f)\n'


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


@functools.lru_cache(maxsize=2)
def split_stream(tokenizer_model: str, split: str) -> np.ndarray:
    """[N] int32: the split's files encoded back to back, as the Switch trainer streams them."""
    return encode_stream(Path(tokenizer_model), _corpus().texts(split))


def span_examples(stream: np.ndarray, vocab: int, n_examples: int, window: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, Ti], targets [B, Tt]): n_examples windows of `window` tokens spread evenly
    over the stream (as moeedge.train.model_card.windows draws them; not imported, it loads
    transformers), each span-corrupted as the Switch trainer corrupts them."""
    available = len(stream) // window
    if available == 0:
        raise ValueError(f"the text is too short: span corruption takes windows of {window} tokens, "
                         f"it has {len(stream)}")
    count = max(1, min(available, n_examples))
    starts = np.linspace(0, (available - 1) * window, count).astype(np.int64) // window * window
    windows = np.stack([stream[s:s + window] for s in starts]).astype(np.int64)
    return SpanCorruption(window, NOISE_DENSITY, MEAN_SPAN, vocab).batch(windows, np.random.default_rng(seed))


def switch_examples(model, split: str, text: str | None, n_tokens: int, window: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """About n_tokens tokens of the corpus split (or of text), span-corrupted in windows."""
    if text is not None:
        stream = np.asarray(_tokenizer(model).encode(text, add_bos=False), dtype=np.int64)
    else:
        spm = model.checkpoint.tokenizer_files.get("tokenizer.model")
        if spm is None:
            raise ValueError(f"{model.checkpoint.source} has no tokenizer.model: the Switch model's corpus "
                             f"is encoded with its sentencepiece model")
        stream = split_stream(spm, split)
    return span_examples(stream, model.config.vocab, max(1, n_tokens // window), window, seed)


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
    # Switch: span-corruption loss (nats per target token; ppl is its exp) and accuracy
    span_loss: float | None = None
    span_accuracy: float | None = None
    span_loss_reference: float | None = None
    span_accuracy_reference: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or not k.startswith("span_")}


def _log_probs(model, window: list[int]) -> torch.Tensor:
    return torch.log_softmax(model.logits(window)[:-1].double(), dim=-1)  # [T-1, V]: next-token log p


def _span_log_probs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Tt, V] the decoder's log p of each target, teacher-forced."""
    logits = model.logits(inputs.tolist(), shift_right(targets[None])[0].tolist())
    return torch.log_softmax(logits.double(), dim=-1)


def _measure(model, reference, cases: list, span: bool = False, progress: bool = False) -> Quality:
    """cases: (log_probs(m) -> [T, V] next-token log p under model m, targets [T])."""
    nll = nll_ref = 0.0
    kls, agree, right, right_ref, count = [], 0, 0, 0, 0
    for log_probs, target in progress_bar(cases, desc="evaluate", unit="window", show=progress):
        lp = log_probs(model)
        nll -= float(lp.gather(1, target[:, None]).sum())
        right += int((lp.argmax(-1) == target).sum())
        count += len(target)
        if reference is not None:
            lr = log_probs(reference)
            nll_ref -= float(lr.gather(1, target[:, None]).sum())
            right_ref += int((lr.argmax(-1) == target).sum())
            kls.append((lr.exp() * (lr - lp)).sum(-1))                    # [T]
            agree += int((lr.argmax(-1) == lp.argmax(-1)).sum())
    if count == 0:
        raise ValueError("the text is too short to evaluate (fewer than 2 tokens)")
    q = Quality(tokens=count, windows=len(cases), ppl=math.exp(nll / count),
                expert_bytes=model.checkpoint.expert_nbytes)
    if span:
        q.span_loss, q.span_accuracy = nll / count, right / count
    if reference is not None:
        kl = torch.cat(kls)
        q.ppl_reference = math.exp(nll_ref / count)
        q.ppl_ratio = q.ppl / q.ppl_reference
        q.kl_mean = float(kl.mean())
        q.kl_p99 = float(torch.quantile(kl, 0.99))
        q.top1_agreement = agree / count
        q.expert_bytes_reference = reference.checkpoint.expert_nbytes
        if span:
            q.span_loss_reference, q.span_accuracy_reference = nll_ref / count, right_ref / count
    return q


def measure(model, windows: list[list[int]], reference=None, progress: bool = False) -> Quality:
    """Perplexity of `model` over the windows; with a reference, the comparison figures."""
    cases = [(functools.partial(_log_probs, window=w), torch.tensor(w[1:])) for w in windows]
    return _measure(model, reference, cases, progress=progress)


def measure_switch(model, inputs: torch.Tensor, targets: torch.Tensor, reference=None,
                   progress: bool = False) -> Quality:
    """Span-corruption loss and accuracy of a Switch model over the examples; with a
    reference, the comparison figures of the decoder's next-token distributions."""
    cases = [(functools.partial(_span_log_probs, inputs=i, targets=t), t) for i, t in zip(inputs, targets)]
    return _measure(model, reference, cases, span=True, progress=progress)


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


def check_same_kind(model, reference) -> None:
    """A Switch model compares with a Switch model of the same configuration (its variants
    keep the source's config.json), a decoder-only model with a decoder-only one."""
    a, b = model.checkpoint.source, reference.checkpoint.source
    if model.encoder_decoder != reference.encoder_decoder:
        kinds = ["an encoder-decoder (Switch)" if m.encoder_decoder else "a decoder-only" for m in (model, reference)]
        raise ValueError(f"{a} is {kinds[0]} model and --reference {b} is {kinds[1]} one: they cannot be "
                         f"compared token by token")
    if model.encoder_decoder:
        ours, theirs = vars(model.config), vars(reference.config)
        differ = [f"{k} {ours[k]} vs {theirs[k]}" for k in ours if k not in ("expert_map", "dtype")
                  and ours[k] != theirs[k]]
        if differ:
            raise ValueError(f"{a} and --reference {b} have different configurations ({', '.join(differ)}): "
                             f"a variant keeps its source's")


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def evaluate(source, reference=None, text: str | None = None, n_tokens: int = DEFAULT_TOKENS,
             window: int = DEFAULT_WINDOW, memory_budget: int | str = "auto", progress: bool = False) -> Quality:
    """Load source (and reference) and measure on text (default: the held-out corpus)."""
    if n_tokens < 2 or window < 2:
        raise ValueError(f"tokens ({n_tokens}) and window ({window}) must both be at least 2")
    with moeedge.load(source, memory_budget=memory_budget, max_context=window) as model:
        tok = _tokenizer(model)
        window = min(window, model.runner.max_context)
        if model.encoder_decoder:
            inputs, targets = switch_examples(model, "heldout", text, n_tokens, window, SPAN_EVAL_SEED)
            sample = text[:4096] if text is not None else SAMPLE
            run = functools.partial(measure_switch, model, inputs, targets, progress=progress)
        else:
            windows = (text_windows(tok, text, n_tokens, window) if text is not None
                       else corpus_windows(tok, "heldout", n_tokens, window))
            sample = text[:4096] if text is not None else tok.decode(windows[0])
            run = functools.partial(measure, model, windows, progress=progress)
        if reference is None:
            return run()
        with moeedge.load(reference, memory_budget=memory_budget, max_context=window) as ref:
            check_same_kind(model, ref)
            check_same_vocabulary(model, ref, sample)
            return run(ref)


def describe(q: Quality, source: str, reference: str | None, text: str | None) -> str:
    where = text or f"the held-out corpus ({', '.join(p + '/' for p in corpus_lib.HELD_OUT)})"
    if q.span_loss is None:
        lines = [f"{source}: perplexity {q.ppl:.3f} over {q.tokens} tokens ({q.windows} windows) of {where}"]
    else:
        lines = [f"{source}: span-corruption loss {q.span_loss:.4f} nats/token, accuracy "
                 f"{100 * q.span_accuracy:.2f}% over {q.tokens} target tokens ({q.windows} corrupted windows) of {where}"]
    if reference is not None:
        if q.span_loss is not None:
            lines.append(f"against {reference}: span-corruption loss {q.span_loss_reference:.4f}, accuracy "
                         f"{100 * q.span_accuracy_reference:.2f}%")
        lines.append(f"against {reference}: perplexity {q.ppl_reference:.3f}, ratio {q.ppl_ratio:.4f}, "
                     f"KL mean {q.kl_mean:.4f} p99 {q.kl_p99:.4f} nats/token, "
                     f"top-1 agreement {100 * q.top1_agreement:.2f}%")
        lines.append(f"expert bytes: {moeedge.format_bytes(q.expert_bytes)} of "
                     f"{moeedge.format_bytes(q.expert_bytes_reference)} "
                     f"({100 * q.expert_bytes / q.expert_bytes_reference:.1f}%)")
    else:
        lines.append(f"expert bytes: {moeedge.format_bytes(q.expert_bytes)}")
    return "\n".join(lines)
