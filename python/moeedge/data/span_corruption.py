"""T5's span corruption on the stdlib corpus: a sentencepiece tokenizer whose last ids are
the sentinels <extra_id_N>, the corruption of token windows into (inputs, targets), and
batches that are a pure function of (seed, step).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeedge.data import corpus as corpus_lib

TOKENIZER_FILE = "tokenizer.model"   # read by moeedge and by transformers' SentencePieceBackend
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"   # T5's ids 0, 1, 2; no BOS
PAD_ID, EOS_ID = 0, 1


# -- tokenizer ---------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab: int, n_sentinels: int, path: Path) -> None:
    """corpus.train_tokenizer's BPE recipe with T5's special ids (<pad> 0, </s> 1, <unk> 2,
    no BOS) for vocab - n_sentinels pieces, then the sentinels appended as user-defined pieces: <extra_id_0> is the last
    id, so moeedge's sentencepiece tokenizer encodes and decodes them as T5's do."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab - n_sentinels,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=0.9999, max_sentence_length=1 << 14, input_sentence_size=0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece=PAD, eos_piece=EOS, unk_piece=UNK,
        num_threads=1, minloglevel=2)  # one thread: the same pieces on every run
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    for i in reversed(range(n_sentinels)):
        proto.pieces.add(piece=sentinel(i), score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    path.write_bytes(proto.SerializeToString())


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def tokenizer_config(max_length: int) -> dict:
    """transformers' plain sentencepiece tokenizer: its T5Tokenizer would convert the model
    with T5's normalisation (a dummy prefix; newlines and indentation lost)."""
    return {"tokenizer_class": "SentencePieceBackend", "legacy": True, "eos_token": EOS, "unk_token": UNK,
            "pad_token": PAD, "model_max_length": max_length, "clean_up_tokenization_spaces": False}


def encode_stream(tokenizer_model: Path, texts: list[str]) -> np.ndarray:
    """[N] int32: the files' ids back to back, in corpus order. No separators: T5 packs its
    examples the same way, and a </s> inside a span would end moeedge's generation."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    return np.concatenate([np.asarray(ids, dtype=np.int32) for ids in sp.encode(texts)])


# -- span corruption ---------------------------------------------------------------------

@dataclass(frozen=True)
class SpanCorruption:
    """T5's span corruption of windows of `length` tokens (t5.data.preprocessors
    random_spans_noise_mask, as transformers' run_t5_mlm_flax has it): the noise is cut
    into spans of random lengths, alternating with kept spans, first kept, last noise.
    Inputs: the kept tokens with each noise span replaced by its sentinel. Targets: each
    noise span after its sentinel, then </s>. The inputs get no </s>: moeedge's tokenizer
    adds none to a prompt. Every window gives the same lengths, so batches need no padding."""

    length: int
    noise_density: float
    mean_span: float
    vocab: int                     # sentinel i is vocab - 1 - i

    @property
    def n_noise(self) -> int:
        return min(max(round(self.length * self.noise_density), 1), self.length - 1)

    @property
    def n_spans(self) -> int:
        return max(round(self.n_noise / self.mean_span), 1)

    @property
    def input_length(self) -> int:
        return self.length - self.n_noise + self.n_spans

    @property
    def target_length(self) -> int:
        return self.n_noise + self.n_spans + 1

    def noise_mask(self, rng: np.random.Generator) -> np.ndarray:
        """[length] bool, True where a token is noise."""
        def segment(n_items: int) -> np.ndarray:   # n_items split into n_spans random non-empty parts
            first = np.arange(n_items - 1) < self.n_spans - 1
            rng.shuffle(first)
            return np.bincount(np.cumsum(np.pad(first, (1, 0))), minlength=self.n_spans)
        spans = np.stack([segment(self.length - self.n_noise), segment(self.n_noise)], axis=1).reshape(-1)
        return np.repeat(np.arange(2 * self.n_spans) % 2 == 1, spans)

    def apply(self, window: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """window [length] -> (inputs [input_length], targets [target_length]), as T5 does it:
        the inputs replace noise spans by sentinels, the targets replace kept spans."""
        return self._to_sentinels(window, noise), np.append(self._to_sentinels(window, ~noise), EOS_ID)

    def _to_sentinels(self, window: np.ndarray, mask: np.ndarray) -> np.ndarray:
        starts = mask & ~np.pad(mask[:-1], (1, 0))                  # the first token of each masked span
        sentinels = self.vocab - np.cumsum(starts)                  # span 1 -> vocab - 1 = <extra_id_0>
        return np.where(starts, sentinels, window)[~mask | starts]

    def batch(self, windows: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """windows [B, length] -> (inputs [B, input_length], targets [B, target_length]) int64."""
        pairs = [self.apply(w, self.noise_mask(rng)) for w in windows]
        return (torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.int64)),
                torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)))


class SpanBatches:
    """Batch `step` as a pure function of (seed, step): corpus windows as the default
    model's trainer draws them (corpus.Batches), each corrupted by its own random spans."""

    STREAM = 7  # keeps the corruption's random numbers apart from the window order's

    def __init__(self, stream: np.ndarray, corruption: SpanCorruption, batch: int, seed: int):
        self.windows = corpus_lib.Batches(stream, corruption.length, batch, seed)
        self.corruption, self.seed = corruption, seed

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, self.STREAM])
        return self.corruption.batch(self.windows.get(step).numpy(), rng)


def shift_right(targets: torch.Tensor) -> torch.Tensor:
    """The decoder's inputs: <pad> (T5's decoder start), then the targets but the last."""
    return torch.cat([torch.full_like(targets[:, :1], PAD_ID), targets[:, :-1]], dim=1)
