"""Full-size Mixtral GGUF files with random weights, quantized as llama.cpp quantizes them.

gguf-py cannot quantize to the K formats, and a 93 GB bf16 original has no room on our
disks, so the blocks are written directly: random codes (every nibble, scale and min value
occurs) with fp16 scales generated as values (finite, sized so the weights have a std near
0.02). Tensor types are the ones llama.cpp's llama_tensor_get_type (src/llama-quant.cpp)
gives an 8-expert llama model:

- q4_k_m: output Q6_K; token_embd, attn_q, ffn_gate_exps, ffn_up_exps Q4_K; attn_k, attn_v
  Q8_0 (n_expert == 8); attn_output Q5_K (n_expert == 8); ffn_down_exps Q6_K in the layers
  use_more_bits picks (the first and last eighth, and every third between), else Q4_K;
- q8_0: every matrix Q8_0;
norms and the router (ffn_gate_inp) stay F32 in both.

The file is written tensor by tensor (one tensor in memory at a time), with a
SentencePiece-style ("llama") vocabulary in its metadata, as llama.cpp needs to load it:

    python -m moeedge.synthetic_gguf --arch mixtral --size 8x7b --ftype q4_k_m \\
        -o /var/tmp/moeedge-models/mixtral-8x7b-q4_k_m.gguf
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from moeedge.synthetic import SHAPES

# --size -> (hidden, intermediate, layers, heads, kv heads, experts, experts per token, vocab)
SIZES = {name.removeprefix("mixtral-"): (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                                         s["num_attention_heads"], s["num_key_value_heads"],
                                         s["num_local_experts"], s["num_experts_per_tok"], s["vocab_size"])
         for name, s in SHAPES.items() if name != "mixtral-test"}
SIZES["tiny"] = (256, 512, 4, 4, 2, 8, 2, 512)  # whole K-quant super-blocks both ways; for tests
FTYPES = {"q4_k_m": 15, "q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_K_M, LLAMA_FTYPE_MOSTLY_Q8_0
STD = 0.02
# quant -> (weights per block, bytes per block, byte offsets of its fp16 d (and dmin), std of the
# weights per unit d with random codes, dmin / d that centres them). For Q4_K, w = d sc q - dmin m with
# sc, m uniform in 0..63 and q in 0..15: var = d^2 (E[sc^2] var(q) + (dmin/d)^2 2 var(sc)) at dmin = 7.5 d
# (the mean q), 258^2 d^2; Q5_K the same with q in 0..31; Q6_K d sc (q - 32), sc int8, q in 0..63; Q8_0 d q.
BLOCK = {"Q4_K": (256, 144, (0, 2), 258.0, 7.5), "Q5_K": (256, 176, (0, 2), 527.0, 15.5),
         "Q6_K": (256, 210, (208,), 1366.0, 0.0), "Q8_0": (32, 34, (0,), 73.9, 0.0)}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits (layer >= n_layers / 8 wherever its % sees a negative)."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def tensor_type(name: str, n_layers: int, ftype: str) -> str:
    """The ggml type name llama.cpp's quantizer gives this tensor of an 8-expert llama model."""
    if name.endswith("norm.weight") or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    if ftype == "q8_0":
        return "Q8_0"
    short = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if short == "ffn_down_exps.weight":
        return "Q6_K" if use_more_bits(int(name.split(".")[1]), n_layers) else "Q4_K"
    return {"output.weight": "Q6_K", "attn_k.weight": "Q8_0", "attn_v.weight": "Q8_0",
            "attn_output.weight": "Q5_K"}.get(short, "Q4_K")


def tensor_shapes(size: str, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> torch-order shape ([out, in]; experts [E, out, in]), in the order written."""
    H, I, L, heads, kv, E, _, V = SIZES[size]
    L = layers or L
    head_dim = H // heads
    shapes = {"token_embd.weight": (V, H)}
    for i in range(L):
        shapes.update({f"blk.{i}.{k}": s for k, s in {
            "attn_norm.weight": (H,), "attn_q.weight": (heads * head_dim, H), "attn_k.weight": (kv * head_dim, H),
            "attn_v.weight": (kv * head_dim, H), "attn_output.weight": (H, heads * head_dim),
            "ffn_norm.weight": (H,), "ffn_gate_inp.weight": (E, H), "ffn_gate_exps.weight": (E, I, H),
            "ffn_down_exps.weight": (E, H, I), "ffn_up_exps.weight": (E, I, H)}.items()})
    shapes.update({"output_norm.weight": (H,), "output.weight": (V, H)})
    return shapes


def random_blocks(qtype: str, n_weights: int, rng: np.random.Generator, std: float = STD) -> np.ndarray:
    """[blocks, bytes per block] uint8 of random codes with finite fp16 scales giving about `std`."""
    block, nbytes, scale_at, per_d, dmin_ratio = BLOCK[qtype]
    n = n_weights // block
    raw = rng.bit_generator.random_raw((n * nbytes + 7) // 8).view(np.uint8)[:n * nbytes]
    blocks = raw.reshape(n, nbytes)
    # |d| in [0.5, 1.5] of its mean, random sign: d and dmin are values, never random bit patterns (NaN, inf)
    d = std / per_d * rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)
    blocks[:, scale_at[0]:scale_at[0] + 2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
    if len(scale_at) > 1:
        blocks[:, scale_at[1]:scale_at[1] + 2] = (dmin_ratio * d).astype(np.float16).reshape(-1, 1).view(np.uint8)
    return blocks


def vocabulary(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of n pieces: <unk>, <s>, </s>, the 256 byte pieces
    <0x00>..<0xFF> (byte fallback), then pieces of 1, 2, 3... letters, each with and
    without the word-start mark, best-scored first. Token types as gguf's TokenType."""
    if n < 259 + 2:
        raise ValueError(f"a vocabulary of {n} tokens is too small (at least 261: specials and 256 bytes)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE...
    alphabet = "etaoinshrdlcumwfgypbvkjxqz" + "ETAOINSHRDLCUMWFGYPBVKJXQZ" + "0123456789" + ".,;:!?'\"-()"
    pieces, seen, stems = ["▁"], {"▁"}, [""]
    while len(tokens) + len(pieces) < n:
        stems = [s + c for s in stems for c in alphabet]
        for s in stems:
            for p in ("▁" + s, s):
                if p not in seen and len(tokens) + len(pieces) < n:
                    seen.add(p)
                    pieces.append(p)
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write(out: Path, size: str = "8x7b", ftype: str = "q4_k_m", layers: int | None = None, seed: int = 0,
          progress: bool = False, dequantized: bool = False) -> Path:
    """Write the file (through a .partial name, renamed when whole); returns its path.
    dequantized: every tensor F32, dequantized by gguf's reference from the blocks the same
    seed gives: the same model, to check a reader's kernels against (small sizes only)."""
    import gguf  # noqa: PLC0415 (only the writer needs it)
    import gguf.quants  # noqa: PLC0415

    if size not in SIZES or ftype not in FTYPES:
        raise ValueError(f"--size {size!r} / --ftype {ftype!r}: sizes {', '.join(SIZES)}; ftypes {', '.join(FTYPES)}")
    H, I, L, heads, kv, E, top_k, V = SIZES[size]
    if layers is not None and not 1 <= layers <= L:
        raise ValueError(f"--layers {layers}: a {size} model has 1 to {L} layers")
    n_layers = layers or L
    shapes = tensor_shapes(size, layers)
    types = {name: tensor_type(name, n_layers, ftype) for name in shapes}
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(f"synthetic-mixtral-{size}-{ftype}")
    w.add_file_type(FTYPES[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(32768)
    w.add_embedding_length(H)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(I)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(H // heads)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(E)
    w.add_expert_used_count(top_k)
    w.add_vocab_size(V)
    tokens, scores, token_types = vocabulary(V)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(token_types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    for name, shape in shapes.items():
        qtype = "F32" if dequantized else types[name]
        if qtype == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            block, nbytes = BLOCK[qtype][:2]
            byte_shape = (*shape[:-1], shape[-1] // block * nbytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(partial)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for i, (name, shape) in enumerate(shapes.items()):
        if progress:
            print(f"[{i + 1}/{len(shapes)}] {name} {types[name]} {list(shape)}", file=sys.stderr, flush=True)
        if types[name] != "F32":
            blocks = random_blocks(types[name], int(np.prod(shape)), rng)
            if dequantized:
                qtype = gguf.GGMLQuantizationType[types[name]]
                blocks = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(shape).astype(np.float32)
            w.write_tensor_data(blocks)
        elif name.endswith("norm.weight"):  # RMSNorm scales near one, as trained models have them
            w.write_tensor_data(rng.normal(1.0, STD, shape).astype(np.float32))
        else:
            w.write_tensor_data(rng.normal(0.0, STD, shape).astype(np.float32))
    w.close()
    os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.synthetic_gguf", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["mixtral"], default="mixtral")
    parser.add_argument("--size", choices=sorted(SIZES), default="8x7b")
    parser.add_argument("--ftype", choices=sorted(FTYPES), default="q4_k_m")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=None, help="write a slice of this many layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dequantized", action="store_true",
                        help="write every tensor F32, dequantized: the same model, for checks (small sizes)")
    args = parser.parse_args(argv)
    try:
        write(args.out, args.size, args.ftype, args.layers, args.seed, progress=True, dequantized=args.dequantized)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
