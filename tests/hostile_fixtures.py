"""Damaged and hostile checkpoints for tests/test_hostile_formats.py: copies of a tiny
checkpoint with one thing changed, and tiny GGUF files whose metadata is written here."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np

# A Mixtral small enough to write by hand (F32): the GGUF counterpart of tiny_checkpoints'.
GGUF_SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "experts": 4, "top_k": 2, "ffn": 64, "vocab": 64}


def clone(src: Path, dst: Path) -> Path:
    """dst with src's files: hard links (fast, no copies, and not symlinks, which a
    checkpoint may only use inside itself), config.json copied to be edited."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "config.json":
            shutil.copyfile(f, dst / f.name)
        else:
            os.link(f, dst / f.name)
    return dst


def edit_json(path: Path, edit) -> None:
    """edit(dict) applied to a JSON file, replaced (not rewritten in place: it may be a hard link)."""
    data = json.loads(path.read_text())
    edit(data)
    replace_bytes(path, json.dumps(data).encode())


def replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rewrite_header(path: Path, edit) -> None:
    """edit(header dict) applied to a .safetensors file's JSON header, the data kept."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    replace_bytes(path, struct.pack("<Q", len(new)) + new + raw[8 + n:])


def drop_tensor(path: Path, name: str) -> None:
    """Remove a tensor from a .safetensors file (its bytes stay, unnamed)."""
    rewrite_header(path, lambda h: h.pop(name))


@contextlib.contextmanager
def deadline(seconds: float = 20.0):
    """Fail, rather than hang, if the block runs longer (SIGALRM interrupts a blocking open)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds:.0f}s: it would hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def gguf_metadata() -> dict[str, tuple[str, object]]:
    """key -> (kind, value) of the tiny GGUF Mixtral."""
    c = GGUF_SHAPE
    return {"llama.block_count": ("u32", c["layers"]), "llama.context_length": ("u32", 256),
            "llama.embedding_length": ("u32", c["hidden"]), "llama.feed_forward_length": ("u32", c["ffn"]),
            "llama.attention.head_count": ("u32", c["heads"]), "llama.attention.head_count_kv": ("u32", c["kv_heads"]),
            "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-5), "llama.rope.freq_base": ("f32", 10000.0),
            "llama.expert_count": ("u32", c["experts"]), "llama.expert_used_count": ("u32", c["top_k"]),
            "llama.vocab_size": ("u32", c["vocab"])}


def gguf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    c = GGUF_SHAPE
    H, I, E, V = c["hidden"], c["ffn"], c["experts"], c["vocab"]
    q, kv = H, c["kv_heads"] * H // c["heads"]
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H)}
    for layer in range(c["layers"]):
        shapes.update({f"blk.{layer}.{name}": shape for name, shape in {
            "attn_norm.weight": (H,), "ffn_norm.weight": (H,), "attn_q.weight": (q, H), "attn_k.weight": (kv, H),
            "attn_v.weight": (kv, H), "attn_output.weight": (H, q), "ffn_gate_inp.weight": (E, H),
            "ffn_gate_exps.weight": (E, I, H), "ffn_up_exps.weight": (E, I, H), "ffn_down_exps.weight": (E, H, I),
        }.items()})
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.08, shape).astype(np.float32) for name, shape in shapes.items()}


def write_gguf(path: Path, metadata: dict | None = None, drop: tuple[str, ...] = (),
               tensors: dict[str, np.ndarray] | None = None) -> Path:
    """The tiny GGUF Mixtral; metadata: key -> (kind, value) overrides ("u32", "u64", "i32",
    "f32", "str", "bool", "array"), a value of None removing the key; drop: tensors left out."""
    import gguf

    meta = {**gguf_metadata(), **(metadata or {})}
    w = gguf.GGUFWriter(str(path), "llama")
    add = {"u32": w.add_uint32, "u64": w.add_uint64, "i32": w.add_int32, "f32": w.add_float32,
           "str": w.add_string, "bool": w.add_bool, "array": w.add_array}
    for key, entry in meta.items():
        if entry is not None:
            add[entry[0]](key, entry[1])
    for name, array in (tensors or gguf_tensors()).items():
        if name not in drop:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hub_snapshot(src: Path, cache: Path, repo: str = "models--org--tiny", rev: str = "0123abcd") -> Path:
    """src laid out as huggingface_hub caches it: blobs/<name> holds each file, and
    snapshots/<rev>/<file> is a relative symlink ../../blobs/<name>."""
    blobs, snapshot = cache / repo / "blobs", cache / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = f"{i:04d}{'f' * 36}"  # hub blobs are named by content hash
        shutil.copyfile(f, blobs / blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot
