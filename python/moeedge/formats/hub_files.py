"""Which of a Hugging Face repository's files make a checkpoint moeedge runs: a repo id
as users write it (org/name, @revision, :QUANT as llama.cpp's `-hf user/repo:Q4_K_M`),
and the choice among a repo's file names. No I/O here: moeedge.formats.hub applies it
to the local cache and to the hub's listing alike."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from moeedge.formats.errors import CheckpointError, shown, shown_list

# huggingface_hub's validate_repo_id: letters, digits, "-", "_", "." (not first or last,
# no "--" or ".."), at most 96 characters per part. moeedge runs models, so the
# namespace is required.
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REF = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w./-]{{1,200}}))?(?::(?P<quant>[\w.-]{{1,40}}))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
DEFAULT_REVISION = "main"
# llama.cpp's -hf picks Q4_K_M when no tag is given.
DEFAULT_QUANT = "Q4_K_M"
# Files a safetensors checkpoint needs beside its shards (what HFDirectory reads).
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Never fetched: pickles (moeedge never unpickles) and Mistral's consolidated.* copies
# of the same weights in another layout.
NEVER = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "consolidated.*", "*/consolidated.*")
FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth")
SPLIT = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str = DEFAULT_REVISION
    quant: str | None = None

    def __str__(self) -> str:
        rev = "" if self.revision == DEFAULT_REVISION else f"@{self.revision}"
        return f"{self.repo_id}{rev}{':' + self.quant if self.quant else ''}"


def parse_ref(text: str) -> RepoRef | None:
    """text as a repo id, or None where it is not one."""
    m = _REF.fullmatch(text)
    if m is None or any(bad in m.group("repo") for bad in ("--", "..")):
        return None
    if m.group("repo").lower().endswith(FILE_SUFFIXES):
        return None  # models/x.gguf is a path that does not exist, not a repo
    revision = m.group("revision") or DEFAULT_REVISION
    # A revision names a file under refs/ in the cache: no way out of it.
    if ".." in revision.split("/") or revision.startswith("/") or revision.endswith("/") or "//" in revision:
        return None
    return RepoRef(m.group("repo"), revision, m.group("quant"))


@dataclass(frozen=True)
class Selection:
    """The files to fetch (repo-relative names) and the one to open: a directory ("" for
    the snapshot's root) for safetensors, a .gguf file's name for GGUF."""
    kind: str
    files: tuple[str, ...]
    entry: str


def _never(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in NEVER)


def select(ref: RepoRef, names: list[str], where: str) -> Selection:
    """The checkpoint among a repo's file names; CheckpointError says what the repo has
    otherwise. where: the repo's files as the message names them (a cache folder, the hub)."""
    ggufs = [n for n in names if n.lower().endswith(".gguf") and "mmproj" not in n.lower()]
    root = [n for n in names if "/" not in n]
    shards = [n for n in root if n.endswith(".safetensors") and not _never(n)
              and n != "moeedge_predictor.safetensors"]
    if ref.quant is None and shards and "config.json" in root:
        extra = [n for n in root if n in CONFIG_FILES or n == "moeedge_predictor.safetensors"]
        return Selection("safetensors", tuple(sorted(set(shards + extra))), "")
    if ggufs:
        return _select_gguf(ref, ggufs, where)
    if ref.quant is not None:
        raise CheckpointError(f"{ref}: {where} has no .gguf files for the quant tag :{ref.quant} "
                              f"({_has(names)}); drop the tag for a safetensors checkpoint")
    if shards:
        raise CheckpointError(f"{ref}: {where} has .safetensors files but no config.json at its root "
                              f"({_has(names)})")
    raise CheckpointError(f"{ref}: {where} has no .safetensors or .gguf files ({_has(names)}); moeedge runs "
                          f"Hugging Face safetensors checkpoints and GGUF files (and never unpickles .bin/.pt)")


def _has(names: list[str]) -> str:
    return f"it has {shown_list(sorted(names), 6)}" if names else "it has no files"


def quant_tag(name: str) -> str | None:
    """The quant tag a GGUF file's name carries (model-Q4_K_M.gguf, model.q8_0-00001-of-00002.gguf)."""
    stem = PurePosixPath(name).name
    m = SPLIT.fullmatch(stem)
    stem = m.group("stem") if m else stem[:-len(".gguf")]
    tag = re.search(r"[-._]((?:I?Q\d[\w]*|F16|F32|BF16))$", stem, re.IGNORECASE)
    return tag.group(1).upper() if tag else None


def _select_gguf(ref: RepoRef, ggufs: list[str], where: str) -> Selection:
    tags = sorted({t for n in ggufs if (t := quant_tag(n))})
    wanted = (ref.quant or DEFAULT_QUANT).upper()
    matching = [n for n in ggufs if quant_tag(n) == wanted]
    if not matching and ref.quant is None and len({_model_name(n) for n in ggufs}) == 1:
        matching = ggufs  # one model in one file (or one split set): take it, as llama.cpp does
    if not matching:
        asked = f"quant tag :{ref.quant}" if ref.quant else f"no quant tag (the default is :{DEFAULT_QUANT})"
        raise CheckpointError(f"{ref}: {where} has no GGUF file for {asked}; its tags: "
                              f"{', '.join(tags) or 'none'} (name one as {ref.repo_id}:TAG)")
    models = sorted({_model_name(n) for n in matching})
    if len(models) > 1:
        raise CheckpointError(f"{ref}: {where} has several GGUF models for that tag ({shown_list(models)}); "
                              f"download the one you want and pass its path")
    parts = sorted(matching)
    split = SPLIT.fullmatch(PurePosixPath(parts[0]).name)
    if split:  # every part is needed (moeedge.formats.gguf_split reads them as one model)
        count = int(split.group("count"))
        present = {int(m.group("no")) for n in parts if (m := SPLIT.fullmatch(PurePosixPath(n).name))}
        if present != set(range(1, count + 1)) or len(parts) != count:
            raise CheckpointError(f"{ref}: {where} holds parts {sorted(present)} of the {count}-part split GGUF "
                                  f"{shown(parts[0])}; all {count} are needed")
    return Selection("gguf", tuple(parts), parts[0])


def _model_name(name: str) -> str:
    """A GGUF file's name without its split suffix: the parts of one model share it."""
    m = SPLIT.fullmatch(PurePosixPath(name).name)
    return str(PurePosixPath(name).parent / m.group("stem")) if m else name


def allow_patterns(files: tuple[str, ...]) -> list[str]:
    """snapshot_download's allow_patterns matching exactly these names (fnmatch, so any
    [, * or ? in a name is escaped as a one-character class)."""
    return [re.sub(r"([\[\]*?])", r"[\1]", n) for n in files]
