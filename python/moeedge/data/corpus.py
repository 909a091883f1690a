"""The training corpus: CPython's standard library sources, split by top-level package,
hashed, and the sentencepiece BPE tokenizer trained on its training split.

Files are the `.py` files under sysconfig's `stdlib` path, minus site-packages/ and
every test directory (test/, tests/, idle_test/: Lib/test, lib2to3's Python 2 fixtures,
...). Whole top-level packages are held out for evaluation, so the held-out figures
measure code the model has not seen, not lines near ones it has.
"""
from __future__ import annotations

import hashlib
import io
import platform
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

HELD_OUT = ("asyncio", "email")
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
SPLITS = ("train", "heldout")

# ids 0-2 as llama's tokenizer.model has them; bytes 3-258 (byte_fallback), then merges
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# Code in, code out: the user's words become a comment and the model writes what follows.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "{% if m['role'] == 'assistant' %}{{ m['content'] }}\n"
                 "{% else %}# {{ m['content'] | replace('\n', '\n# ') }}\n{% endif %}"
                 "{% endfor %}")


@dataclass(frozen=True)
class SourceFile:
    path: str    # relative to the stdlib root, '/'-separated
    split: str   # "train" or "heldout"
    nbytes: int
    sha256: str


@dataclass
class Corpus:
    root: str
    python_version: str
    held_out: tuple[str, ...]
    files: list[SourceFile]
    skipped: list[str] = field(default_factory=list)  # not UTF-8

    def split(self, name: str) -> list[SourceFile]:
        return [f for f in self.files if f.split == name]

    def texts(self, name: str) -> list[str]:
        return [(Path(self.root) / f.path).read_text(encoding="utf-8") for f in self.split(name)]

    def sha256(self, split: str | None = None) -> str:
        """One hash of the file list and contents: equal hashes, equal corpora."""
        h = hashlib.sha256()
        for f in self.files:
            if split is None or f.split == split:
                h.update(f"{f.split}\0{f.path}\0{f.sha256}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        out = {"root": self.root, "python_version": self.python_version, "python_build": sys.version,
               "held_out_packages": list(self.held_out),
               "sha256": self.sha256(), "skipped_not_utf8": self.skipped}
        for name in SPLITS:
            files = self.split(name)
            out[name] = {"files": len(files), "bytes": sum(f.nbytes for f in files), "sha256": self.sha256(name)}
        return out

    def manifest(self) -> dict:
        return {**self.summary(), "files": [asdict(f) for f in self.files]}


def python_version() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect(root: str | Path | None = None, held_out: tuple[str, ...] = HELD_OUT,
            limit: int | None = None) -> Corpus:
    """Every eligible .py file, sorted by path; `limit` keeps the first N of each split (tests)."""
    root = Path(root) if root is not None else stdlib_root()
    chosen: dict[str, list[Path]] = {name: [] for name in SPLITS}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        chosen["heldout" if len(rel.parts) > 1 and rel.parts[0] in held_out else "train"].append(path)
    files, skipped = [], []
    for split, paths in chosen.items():
        for path in paths[:limit]:
            data, rel = path.read_bytes(), path.relative_to(root).as_posix()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            files.append(SourceFile(rel, split, len(data), hashlib.sha256(data).hexdigest()))
    files.sort(key=lambda f: f.path)
    corpus = Corpus(str(root), python_version(), tuple(held_out), files, skipped)
    missing = [s for s in SPLITS if not corpus.split(s)]
    if missing:
        raise ValueError(f"{root}: the corpus has no {' or '.join(missing)} files (held out: {', '.join(held_out)})")
    return corpus


# -- tokenizer ---------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> None:
    """A BPE tokenizer.model that keeps code as it is: no normalisation, runs of spaces as
    pieces (indentation), digits split, anything unseen as bytes (newlines are <0x0A>)."""
    import sentencepiece as spm

    # sentencepiece trains on lines; a newline is never inside a piece.
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=0.9999, max_sentence_length=1 << 14, input_sentence_size=0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        num_threads=1, minloglevel=2)  # one thread: the same pieces on every run
    path.write_bytes(model.getvalue())


def tokenizer_config(max_length: int) -> dict:
    return {"tokenizer_class": "LlamaTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
            "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False, "legacy": False,
            "model_max_length": max_length, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}


def encode_files(tokenizer_model: Path, texts: list[str]) -> np.ndarray:
    """[N] int32: each file as <s> ids </s>, back to back, in corpus order."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    pieces = []
    for ids in sp.encode(texts):
        pieces += [[sp.bos_id()], ids, [sp.eos_id()]]
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in pieces])


class Batches:
    """Batch `step` as a pure function of (seed, step): each epoch cuts the token stream
    into seq_len windows at a random offset and visits them in a random order."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch: int, seed: int):
        self.stream, self.seq_len, self.batch, self.seed = stream, seq_len, batch, seed
        self.n_windows = len(stream) // seq_len - 1
        if self.n_windows < 1:
            raise ValueError(f"the training split has {len(stream)} tokens, fewer than two windows of {seq_len}")
        self._epoch_cache: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        if e not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, e])
            self._epoch_cache = {e: (int(rng.integers(self.seq_len)), rng.permutation(self.n_windows))}
        return self._epoch_cache[e]

    def get(self, step: int):
        """[B, T] int64 tensor."""
        rows = []
        for i in range(step * self.batch, (step + 1) * self.batch):
            e, k = divmod(i, self.n_windows)
            offset, order = self._epoch(e)
            start = offset + int(order[k]) * self.seq_len
            rows.append(self.stream[start:start + self.seq_len])
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def epochs(self, steps: int) -> float:
        return steps * self.batch / self.n_windows
