"""GGUF files made the way users make them: a tiny seeded Mixtral written by transformers,
a sentencepiece tokenizer trained here, and llama.cpp's own convert_hf_to_gguf.py.

The converter comes from the llama-cpp-python source package on PyPI (llama.cpp itself
is not on PyPI); it is fetched once into a cache directory with pip and reused, and
only the converter, its `conversion/` package and its vendored `gguf-py/` are unpacked.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"  # whose vendored llama.cpp converter the tests run
CACHE = Path(os.environ.get("MOEEDGE_TEST_CACHE", "/var/tmp/moeedge-test-cache"))
VOCAB = 320  # 3 specials + 256 byte tokens + merges: byte fallback, as Mixtral's tokenizer has
CHAT_TOKENS = ("<|user|>", "<|assistant|>")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ("the quick brown fox jumps over the lazy dog. experts route tokens; a cache keeps hot experts in memory "
        "while the rest stay on disk. hello world, how are you today? fine thanks. Mixture of Experts models "
        "pick two of eight experts for every token, so most weights sit idle at any moment.")


class ConverterUnavailable(RuntimeError):
    """pip could not fetch the llama-cpp-python source package."""


# --------------------------------------------------------------------------- converter

def converter_dir(cache: Path = CACHE) -> Path:
    """vendor/llama.cpp of llama-cpp-python's sdist, unpacked once (convert_hf_to_gguf.py, conversion/, gguf-py/)."""
    root = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    sdist = _download_sdist(cache)
    tmp = cache / f".unpack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if (m.isfile() or m.isdir())
                   and m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for m in members:
            m.name = m.name[len(prefix):]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        tar.extractall(tmp, members=members, **safe)
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise ConverterUnavailable(f"{sdist} has no {prefix}convert_hf_to_gguf.py")
    try:
        tmp.rename(root)  # atomic: a concurrent run sees all of it or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _download_sdist(cache: Path) -> Path:
    dest = cache / "sdist"
    found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if found:
        return found[0]
    # --no-binary on this package only: its build requirements come as wheels, or pip
    # would compile cmake from source just to read the sdist's metadata.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
           "-d", str(dest), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    try:
        import scikit_build_core  # noqa: F401  (present: metadata without an isolated build env)

        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if proc.returncode != 0 or not found:
        raise ConverterUnavailable(f"pip could not fetch llama-cpp-python=={LLAMA_CPP_PYTHON}: "
                                   f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return found[0]


def convert(converter: Path, hf_dir: Path, outtype: str, out: Path) -> Path:
    """Run llama.cpp's converter on hf_dir; out is the .gguf written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)]),
           "NO_LOCAL_GGUF": "1"}
    proc = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(hf_dir),
                           "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=converter)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return out


def convert_all(converter: Path, hf_dir: Path, outtypes: tuple[str, ...], cache: Path = CACHE) -> dict[str, Path]:
    """Each outtype converted once (in parallel: each run is mostly the converter importing
    torch and transformers) and kept in the cache under a hash of the checkpoint's bytes,
    so a later session with the same seeded checkpoint reuses the files."""
    digest = hashlib.sha256(LLAMA_CPP_PYTHON.encode())
    for f in sorted(p for p in hf_dir.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    out_dir = cache / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {o: out_dir / f"mixtral-{digest.hexdigest()[:16]}-{o}.gguf" for o in outtypes}

    def make(outtype: str) -> None:
        final = paths[outtype]
        if not final.is_file():
            tmp = final.with_suffix(f".{os.getpid()}.partial.gguf")
            convert(converter, hf_dir, outtype, tmp)
            tmp.replace(final)  # atomic: readers see a whole file or none

    with ThreadPoolExecutor(len(outtypes)) as pool:
        list(pool.map(make, outtypes))
    return paths


# --------------------------------------------------------------------------- the model

def write_sentencepiece(directory: Path, vocab_size: int = VOCAB) -> Path:
    """A BPE tokenizer.model set up as Llama's and Mixtral's are: identity normalisation,
    spaces kept as they are, a dummy prefix, byte fallback; <unk> <s> </s> are ids 0-2,
    the chat markers CHAT_TOKENS ids 3 and 4."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()  # no file paths, so the same bytes every time (the cache key hashes them)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([TEXT] * 4), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, character_coverage=1.0, minloglevel=2, num_threads=1,
        user_defined_symbols=list(CHAT_TOKENS))
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory / "tokenizer.model"


def make_mixtral(directory: Path, seed: int = 0):
    """A tiny Mixtral checkpoint with a sentencepiece tokenizer and a chat template; returns the fp32 reference."""
    import torch

    from tiny_checkpoints import decoder_config, model_class

    torch.manual_seed(seed)
    cfg = decoder_config("mixtral")
    cfg.vocab_size = VOCAB
    model = model_class("mixtral")(cfg).eval()
    with torch.no_grad():  # random init is near zero: widen it so routing and logits vary
        for name, p in model.named_parameters():
            # RMSNorm scales near one, as trained models have them: logits of about unit size
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.08)
    model.save_pretrained(directory)
    write_sentencepiece(directory)
    # As a chat model's tokenizer_config.json marks its chat markers: special (GGUF: control) tokens.
    added = {str(3 + i): {"content": t, "special": True} for i, t in enumerate(CHAT_TOKENS)}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added}))
    return model


# --------------------------------------------------------------------------- damage

def tensor_info_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (file offset of its ggml type field, file offset of its data offset field)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {}
    for t in reader.tensors:
        f = t.field
        type_at = f.offset + sum(int(p.nbytes) for p in f.parts[:4])  # name length, name, n_dims, dims
        out[t.name] = (type_at, type_at + 4)
    del reader
    return out


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_tensor_type(path: Path, name: str, ggml_type: int) -> None:
    patch(path, tensor_info_offsets(path)[name][0], np.uint32(ggml_type).tobytes())


def set_tensor_offset(path: Path, name: str, offset: int) -> None:
    patch(path, tensor_info_offsets(path)[name][1], np.uint64(offset).tobytes())


def _field(path: Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(path).fields[key]
    return field.offset, [int(p.nbytes) for p in field.parts]


def set_metadata_string(path: Path, key: str, value: str) -> None:
    """Overwrite a string value in place with one of the same length."""
    offset, sizes = _field(path, key)
    assert sizes[-1] == len(value.encode()), "same length only: the file is patched in place"
    patch(path, offset + sum(sizes[:-1]), value.encode())


def rename_metadata_key(path: Path, key: str, new_key: str) -> None:
    offset, sizes = _field(path, key)
    assert len(key) == len(new_key)
    patch(path, offset + sizes[0], new_key.encode())


# --------------------------------------------------------------------------- block-quantized tensors

QUANT_TYPES = {"q8_0": 8, "q4_0": 2, "q4_k": 12, "q5_k": 13, "q6_k": 14}  # quant name -> ggml type id


def random_blocks(quant: str, rows: int, cols: int, rng: np.random.Generator, std: float = 0.08) -> np.ndarray:
    """[rows, bytes per row] blocks of a [rows, cols] matrix whose weights have about `std`.
    Q8_0 and Q4_0 come from gguf's own quantizer applied to normal weights; gguf cannot
    quantize the K-quants, so those are random bytes (every nibble, scale and min value
    occurs) with finite fp16 scales of random sign, sized to give that std."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if quant in ("q8_0", "q4_0"):
        weights = rng.normal(0, std, (rows, cols)).astype(np.float32)
        return quantize(weights, GGMLQuantizationType(QUANT_TYPES[quant]))
    block_bytes = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[quant]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    spread = rng.uniform(0.5, 1.5, len(blocks)) * rng.choice([-1.0, 1.0], len(blocks))

    def f16(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float16).reshape(-1, 1).view(np.uint8)

    if quant == "q4_k":  # d * sc * q - dmin * m, sc, m in 0..63, q in 0..15: std ~ 258 d; dmin = 7.5 d centres it
        d = std / 258 * spread
        blocks[:, 0:2], blocks[:, 2:4] = f16(d), f16(7.5 * d)
    elif quant == "q5_k":  # the same with q in 0..31: std ~ 520 d, dmin = 15.5 d
        d = std / 520 * spread
        blocks[:, 0:2], blocks[:, 2:4] = f16(d), f16(15.5 * d)
    else:  # d * scale * (q - 32), scale in -128..127, q in 0..63: std ~ 1366 d
        blocks[:, 208:210] = f16(std / 1366 * spread)
    return blocks.reshape(rows, -1)


# A Mixtral small enough to write by hand, with rows of 256 weights (K-quant super-blocks).
KQUANT_MIXTRAL = {"hidden": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 4, "top_k": 2,
                  "intermediate": 256, "vocab": 64}


def quantized_mixtral(directory: Path, quant: str, seed: int = 0, metadata: dict | None = None) -> tuple[Path, Path]:
    """A tiny Mixtral GGUF whose matrices (experts, attention, embedding, output) are `quant`
    blocks, except that for q4_k the output matrix is Q6_K, as llama.cpp's Q4_K_M keeps it;
    norms and router stay F32. Returns it and its twin with every tensor F32, dequantized by
    gguf's reference: the same model, so their logits differ only by the kernels' rounding.
    metadata: further keys -> values (a float is written as float32, an int as uint32)."""
    from gguf.quants import dequantize

    c = KQUANT_MIXTRAL
    H, I, E, V = c["hidden"], c["intermediate"], c["n_experts"], c["vocab"]
    head_dim = H // c["n_heads"]
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H)}
    for layer in range(c["n_layers"]):
        shapes.update({f"blk.{layer}.{name}": shape for name, shape in {
            "attn_norm.weight": (H,), "ffn_norm.weight": (H,), "attn_q.weight": (c["n_heads"] * head_dim, H),
            "attn_k.weight": (c["n_kv_heads"] * head_dim, H), "attn_v.weight": (c["n_kv_heads"] * head_dim, H),
            "attn_output.weight": (H, c["n_heads"] * head_dim), "ffn_gate_inp.weight": (E, H),
            "ffn_gate_exps.weight": (E, I, H), "ffn_up_exps.weight": (E, I, H),
            "ffn_down_exps.weight": (E, H, I)}.items()})
    rng = np.random.default_rng(seed)
    quantized, dense = {}, {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # RMSNorm scales near one, as trained models have them
            quantized[name] = dense[name] = (rng.normal(1.0, 0.08, shape).astype(np.float32), None)
        elif "ffn_gate_inp" in name:
            quantized[name] = dense[name] = (rng.normal(0, 0.08, shape).astype(np.float32), None)
        else:
            q = "q6_k" if quant == "q4_k" and name == "output.weight" else quant
            blocks = random_blocks(q, int(np.prod(shape[:-1])), shape[-1], rng).reshape(*shape[:-1], -1)
            quantized[name] = (blocks, q)
            dense[name] = (dequantize(blocks, _qtype(q)).reshape(shape), None)
    paths = directory / f"mixtral-{quant}.gguf", directory / f"mixtral-{quant}-dequantized.gguf"
    for path, tensors in zip(paths, (quantized, dense)):
        _write_mixtral(path, tensors, metadata or {})
    return paths


def _qtype(quant: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(QUANT_TYPES[quant])


def _write_mixtral(path: Path, tensors: dict, metadata: dict) -> None:
    """tensors: name -> (array, quant): float32 values (quant None) or raw blocks [..., bytes per row]."""
    import gguf

    c = KQUANT_MIXTRAL
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c["n_layers"])
    w.add_context_length(256)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["intermediate"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(c["n_experts"])
    w.add_expert_used_count(c["top_k"])
    w.add_vocab_size(c["vocab"])
    for key, value in metadata.items():
        {float: w.add_float32, int: w.add_uint32, str: w.add_string}[type(value)](key, value)
    for name, (array, quant) in tensors.items():
        w.add_tensor(name, array, raw_dtype=None if quant is None else _qtype(quant))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
