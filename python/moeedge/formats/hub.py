"""Models by name: a Hugging Face repo id resolved to files on this machine, the local
cache first (laid out as huggingface_hub lays it out: models--ORG--NAME/{blobs,refs,
snapshots}; HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE honoured, read when called), then,
when online, a download through huggingface_hub of only the files moeedge reads
(moeedge.formats.hub_files chooses them), with its progress bar, resumable as it is.

Every file returned lies, symlinks followed, inside the repo's cache folder: a cached
snapshot's files are symlinks into its blobs/, and the snapshot is untrusted like any
checkpoint (moeedge.formats.trust)."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from moeedge.formats.errors import CheckpointError, brief, shown, shown_list
from moeedge.formats.hub_files import (
    COMMIT,
    RepoRef,
    Selection,
    allow_patterns,
    parse_ref,
    select,
)
from moeedge.formats.trust import resolve_inside, trust_root
from moeedge.units import format_bytes

TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's ENV_VARS_TRUE_VALUES
MAX_JSON_BYTES = 64 << 20  # an index or a tree listing: a few MiB at most


def cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it, read from the environment now (its
    constants are read once, when it is imported)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def offline() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in TRUE


def repo_folder(ref: RepoRef, cache: Path) -> Path:
    return cache / ("models--" + ref.repo_id.replace("/", "--"))


def resolve(source: str, precheck: Callable[[Path], None] | None = None) -> Path:
    """The local checkpoint (a snapshot directory or a .gguf file) a repo id names;
    CheckpointError (one line) where it is not a repo id, not cached offline, gated, ...
    precheck(snapshot) is called on a snapshot holding only config.json before a
    safetensors repo's weights are downloaded: a model moeedge cannot run is refused
    before gigabytes are fetched."""
    ref = parse_ref(source)
    if ref is None:
        raise CheckpointError(f"{shown(source)}: no such file or directory, and not a Hugging Face repo id "
                              f"(org/name, org/name@revision or org/name:QUANT)")
    cache = cache_dir()
    found, lacking = cached(ref, cache)
    if found is not None:
        return found
    if offline() and lacking:
        raise CheckpointError(f"{ref}: {lacking}; HF_HUB_OFFLINE is set, so it cannot be fetched (unset it and "
                              f"run once online)")
    if offline():
        raise CheckpointError(f"{ref} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                              f"download it online once, or unset HF_HUB_OFFLINE")
    return download(ref, cache, precheck)


def cached(ref: RepoRef, cache: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint, None) from the cache where the revision's snapshot holds all of it;
    else (None, what the cached snapshot lacks), or (None, None) where there is none."""
    folder = repo_folder(ref, cache)
    snapshot = _snapshot(ref, folder)
    if snapshot is None:
        return None, None
    # The repo's listing at that commit, which huggingface_hub keeps (trees/<commit>.json)
    # before it downloads: a download cut short leaves a snapshot lacking some shards.
    listing = _tree_listing(folder, snapshot.name)
    try:
        chosen = select(ref, listing if listing is not None else _files(snapshot),
                        f"the cached snapshot {snapshot}")
    except CheckpointError as e:  # perhaps a partial download: online, the hub's listing decides
        return None, str(e).removeprefix(f"{ref}: ")
    missing = _missing(snapshot, chosen)
    if missing:
        return None, (f"the cached snapshot {snapshot} lacks {shown_list(missing)} (a download cut short, or "
                      f"deleted blobs)")
    return _checked(snapshot, chosen), None


def _snapshot(ref: RepoRef, folder: Path) -> Path | None:
    commit = ref.revision
    if not COMMIT.fullmatch(commit):
        try:
            with open(folder / "refs" / ref.revision, "rb") as f:
                commit = f.read(64).decode("ascii", "replace").strip()
        except OSError:
            return None
        if not COMMIT.fullmatch(commit):
            raise CheckpointError(f"{folder / 'refs' / ref.revision}: holds {shown(commit)}, not a commit hash "
                                  f"(a damaged cache: delete {folder})")
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _tree_listing(folder: Path, commit: str) -> list[str] | None:
    """The file names of trees/<commit>.json (huggingface_hub >= 1.x), None where absent or unreadable."""
    raw = _small_json(folder / "trees" / f"{commit}.json")
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not all(isinstance(n, str) for n in files):
        return None
    return sorted(files)


def _small_json(path: Path):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError):
        return None


def _files(snapshot: Path) -> list[str]:
    """The snapshot's file names (relative, POSIX), symlinks listed as the files they name."""
    names = []
    for top, dirs, files in os.walk(snapshot):
        rel = Path(top).relative_to(snapshot)
        names += [(rel / f).as_posix() for f in files]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(names)


def _missing(snapshot: Path, chosen: Selection) -> list[str]:
    """The files the checkpoint needs that are not there (a broken symlink: a blob still
    downloading or deleted, is not): of the chosen files, and the shards an index names."""
    needed = list(chosen.files)
    if chosen.kind == "safetensors":
        raw = _small_json(snapshot / "model.safetensors.index.json")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if isinstance(weight_map, dict):  # HFDirectory reports a malformed index when it reads it
            needed += [n for n in set(weight_map.values()) if isinstance(n, str)]
    return sorted({n for n in needed if not _is_file(snapshot / n)})


def _is_file(path: Path) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):  # a name with a NUL, or too long
        return False


def _checked(snapshot: Path, chosen: Selection) -> Path:
    """The entry to open, once the snapshot and every chosen file are known to lie inside
    the repo's cache folder (snapshots/<commit>/..: the folder the files' trust root must be)."""
    folder, root = Path(os.path.realpath(snapshot.parent.parent)), trust_root(snapshot)
    if root != folder:
        raise CheckpointError(f"{snapshot}: a cached snapshot whose real path ({shown(os.path.realpath(snapshot))}) "
                              f"lies outside its repo's cache folder {folder}; refused")
    for name in chosen.files:
        resolve_inside(root, snapshot, name, snapshot)
    return snapshot / chosen.entry if chosen.entry else snapshot


def download(ref: RepoRef, cache: Path, precheck: Callable[[Path], None] | None = None) -> Path:
    """Fetch the checkpoint's files into the cache (only those select() picks) and return
    it from there."""
    from huggingface_hub import HfApi, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    with _hub_errors(ref, cache) as errors:
        info = HfApi(endpoint=endpoint).model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        siblings = {s.rfilename: s.size for s in info.siblings or []}
        chosen = select(ref, sorted(siblings), f"the hub's {ref.repo_id}@{ref.revision}")
        total = sum(siblings[n] or 0 for n in chosen.files)
        errors.downloading = True
        print(f"moeedge: downloading {ref} ({len(chosen.files)} files, {format_bytes(total)}) into {cache}",
              file=sys.stderr)
        if precheck is not None and chosen.kind == "safetensors":
            precheck(Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache, endpoint=endpoint,
                                            allow_patterns=["config.json"])))
        snapshot = snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache, endpoint=endpoint,
                                     allow_patterns=allow_patterns(chosen.files))
    return _checked(Path(snapshot), chosen)


class _hub_errors:
    """huggingface_hub's and the network's errors as one CheckpointError line each."""

    def __init__(self, ref: RepoRef, cache: Path):
        self.ref, self.cache = ref, cache
        self.downloading = False  # the hub answered: a network error now interrupts a download

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, CheckpointError) or not isinstance(error, Exception):
            return False
        raise CheckpointError(self.message(error)) from None

    def message(self, error: Exception) -> str:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        ref, token = self.ref, "HF_TOKEN is set, but that token" if os.environ.get("HF_TOKEN") else "set HF_TOKEN"
        url = f"https://huggingface.co/{ref.repo_id}"
        if isinstance(error, GatedRepoError):
            if os.environ.get("HF_TOKEN"):
                return (f"{ref} is a gated model and HF_TOKEN's token has no access to it: accept its terms at "
                        f"{url} with that account")
            return (f"{ref} is a gated model: accept its terms at {url}, then set HF_TOKEN to a read token "
                    f"(https://huggingface.co/settings/tokens)")
        if isinstance(error, RevisionNotFoundError):
            return f"{ref}: the repo has no revision {shown(ref.revision)}"
        if isinstance(error, RepositoryNotFoundError):
            hint = "has no access to it" if os.environ.get("HF_TOKEN") else "to a read token if it is private"
            return (f"{ref}: no such local path, and no such model on the hub, or it is private "
                    f"({token} {hint})")
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, HfHubHTTPError) and status in (401, 403):
            return f"{ref}: the hub refused access (HTTP {status}; {token} to a token with read access)"
        if isinstance(error, OfflineModeIsEnabled):
            return (f"{ref} is not in the Hugging Face cache ({self.cache}) and HF_HUB_OFFLINE is set: download it "
                    f"online once, or unset HF_HUB_OFFLINE")
        if isinstance(error, HfHubHTTPError):
            return f"{ref}: the hub answered HTTP {status} ({brief(error, 200)})"
        if _network_error(error) and self.downloading:
            return (f"{ref}: the download was interrupted ({type(error).__name__}: {brief(error, 160)}); run again "
                    f"to fetch the rest (finished files are kept in {self.cache})")
        if _network_error(error):
            return (f"{ref} is not in the Hugging Face cache ({self.cache}) and the hub cannot be reached "
                    f"({type(error).__name__}: {brief(error, 160)})")
        return f"{ref}: downloading failed ({type(error).__name__}: {brief(error, 200)})"


def _network_error(error: Exception) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError

    # huggingface_hub's HTTP client's errors (httpx2 in 2.x) all derive from TransportError.
    transport = tuple(c for c in type(error).__mro__ if c.__name__ == "TransportError")
    return bool(transport) or isinstance(error, (ConnectionError, TimeoutError, LocalEntryNotFoundError))
