"""The seed checkpoints every input mutates, built once and kept in a cache directory:
tiny Mixtral, Qwen2-MoE, OLMoE and Switch Transformers directories written by
transformers' own classes with save_pretrained (a sharded Mixtral too, with its
model.safetensors.index.json), with a tokenizer.json or a sentencepiece tokenizer.model,
tokenizer_config.json (a chat template) and special_tokens_map.json; and tiny Mixtral
GGUF files (F32, and Q8_0 experts) kept as GGUFSpecs, their embedded vocabulary and
chat template included.

The Hugging Face seeds are built in a forked child: torch compute in the fork server
itself would leave a thread pool behind that its children could deadlock on.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeedge.fuzz import gguf_file as G

SEED_VERSION = 1  # bump when a seed changes: the cache key
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ("the quick brown fox jumps over the lazy dog. experts route tokens; a cache keeps hot experts in memory "
        "while the rest stay on disk. hello world, how are you today? fine thanks.")
VOCAB = 96
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
HF_SEEDS = ("mixtral", "qwen2_moe", "olmoe", "mixtral-sharded", "switch")
DECODER_SEEDS = ("mixtral", "qwen2_moe", "olmoe")
GGUF_SEEDS = ("mixtral-f32", "mixtral-q8_0")


@dataclass
class Seeds:
    root: Path
    hf: dict[str, Path]             # name -> checkpoint directory
    gguf: dict[str, G.GGUFSpec]     # name -> the file as data (also written to root/NAME.gguf)

    def gguf_path(self, name: str) -> Path:
        return self.root / f"{name}.gguf"


def cache_dir() -> Path:
    import tokenizers
    import torch
    import transformers

    key = hashlib.sha256(f"{SEED_VERSION} {torch.__version__} {transformers.__version__} "
                         f"{tokenizers.__version__}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("MOEEDGE_FUZZ_CACHE", "/var/tmp/moeedge-fuzz"))
    return base / f"seeds-{key}"


def build_seeds(root: Path | None = None) -> Seeds:
    """The seeds, built on first use (HF ones in a forked child) and read from the cache after."""
    root = root or cache_dir()
    if not (root / "done").is_file():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _in_child(lambda: _write_hf_seeds(tmp), tmp / "build.log")
        for name in GGUF_SEEDS:
            (tmp / f"{name}.gguf").write_bytes(G.to_bytes(gguf_seed(name)))
        (tmp / "done").write_text("ok\n")
        try:
            tmp.rename(root)  # atomic: another run sees all of it or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another run got there first
    return Seeds(root, {n: root / n for n in HF_SEEDS}, {n: gguf_seed(n) for n in GGUF_SEEDS})


def _in_child(work, log: Path) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # transformers' progress bars
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            work()
            code = 0
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise RuntimeError(f"building the fuzz seeds failed (wait status {status}):\n"
                           f"{log.read_text(errors='replace')[-3000:]}")


# --------------------------------------------------------------------------- Hugging Face

def _decoder_config(family: str):
    import transformers as tf

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=128, num_experts_per_tok=2, rms_norm_eps=1e-5,
                  dtype="float32", eos_token_id=2, bos_token_id=1)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
    if family == "qwen2_moe":  # three layers, the middle one a dense MLP (mlp_only_layers)
        return tf.Qwen2MoeConfig(**{**common, "num_hidden_layers": 3}, intermediate_size=40, moe_intermediate_size=24,
                                 shared_expert_intermediate_size=36, num_experts=4, norm_topk_prob=False,
                                 mlp_only_layers=[1])
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=4, norm_topk_prob=False, clip_qkv=4.0, **common)
    raise ValueError(family)


def _widen(model, seed: int) -> None:
    """Random init is near zero: normal weights (norms near one) so routing and logits vary."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and "weight" in name else 0.0, 0.08)


def _write_hf_seeds(root: Path) -> None:
    import torch
    import transformers as tf

    torch.set_num_threads(1)
    classes = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM, "olmoe": tf.OlmoeForCausalLM}
    for i, family in enumerate(DECODER_SEEDS):
        model = classes[family](_decoder_config(family)).eval()
        _widen(model, i)
        model.save_pretrained(root / family)
        if family == "mixtral":  # the same model in shards, with an index
            model.save_pretrained(root / "mixtral-sharded", max_shard_size="40KB")
    cfg = tf.SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
                                      num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                      num_experts=4, expert_capacity=8, relative_attention_num_buckets=8,
                                      relative_attention_max_distance=20, decoder_start_token_id=0, pad_token_id=0,
                                      eos_token_id=1, dtype="float32")
    model = tf.SwitchTransformersForConditionalGeneration(cfg).eval()
    _widen(model, 9)
    model.save_pretrained(root / "switch")
    for name in ("mixtral", "olmoe", "mixtral-sharded", "switch"):
        _write_bpe_tokenizer(root / name)
    _write_sentencepiece_tokenizer(root / "qwen2_moe")
    if not (root / "mixtral-sharded" / "model.safetensors.index.json").is_file():
        raise RuntimeError("the sharded seed has no model.safetensors.index.json")


def _write_tokenizer_config(directory: Path) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "chat_template": CHAT_TEMPLATE}, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def _write_bpe_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    _write_tokenizer_config(directory)


def _write_sentencepiece_tokenizer(directory: Path) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([TEXT] * 4), model_writer=model, vocab_size=VOCAB - 8, model_type="bpe",
        character_coverage=1.0, minloglevel=2, num_threads=1, user_defined_symbols=SPECIALS[3:])
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    _write_tokenizer_config(directory)


# --------------------------------------------------------------------------- GGUF

GGUF_MODEL = {"hidden": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 4, "top_k": 2,
              "intermediate": 64}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_PAIRS = ("th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de "
          "ro ea").split()


def gguf_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece-style ("llama") vocabulary of VOCAB pieces: pieces, scores, types."""
    tokens = SPECIALS[:5] + ["\u2581"] + list(_LETTERS) + list(".,?!")
    tokens += ["\u2581" + c for c in _LETTERS] + list(_PAIRS)
    tokens = tokens[:VOCAB]
    types = [2, 3, 3, 4, 4] + [1] * (len(tokens) - 5)  # unknown, control x2, user-defined x2, normal
    scores = [0.0] * 5 + [-float(i) for i in range(len(tokens) - 5)]
    return tokens, scores, types


def gguf_seed(name: str) -> G.GGUFSpec:
    """A tiny Mixtral as llama.cpp's converter lays it out (q and k rows permuted for its RoPE)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    c = GGUF_MODEL
    H, I, E, L = c["hidden"], c["intermediate"], c["n_experts"], c["n_layers"]
    head_dim = H // c["n_heads"]
    tokens, scores, types = gguf_vocabulary()
    V = len(tokens)
    rng = np.random.default_rng(11)
    layout = G.Layout()
    entries = []

    def add(tensor_name: str, shape: tuple[int, ...], quant: bool = False, norm: bool = False) -> None:
        values = rng.normal(1.0 if norm else 0.0, 0.08, shape).astype(np.float32)
        if quant:
            payload, ggml_type = quantize(values, GGMLQuantizationType.Q8_0).tobytes(), 8
        else:
            payload, ggml_type = values.tobytes(), 0
        entries.append(G.TensorEntry(tensor_name, list(reversed(shape)), ggml_type, layout.add(payload)))

    add("token_embd.weight", (V, H))
    add("output_norm.weight", (H,), norm=True)
    add("output.weight", (V, H))
    q8 = name == "mixtral-q8_0"
    for layer in range(L):
        p = f"blk.{layer}."
        add(p + "attn_norm.weight", (H,), norm=True)
        add(p + "ffn_norm.weight", (H,), norm=True)
        add(p + "attn_q.weight", (c["n_heads"] * head_dim, H))
        add(p + "attn_k.weight", (c["n_kv_heads"] * head_dim, H))
        add(p + "attn_v.weight", (c["n_kv_heads"] * head_dim, H))
        add(p + "attn_output.weight", (H, c["n_heads"] * head_dim))
        add(p + "ffn_gate_inp.weight", (E, H))
        add(p + "ffn_gate_exps.weight", (E, I, H), quant=q8)
        add(p + "ffn_up_exps.weight", (E, I, H), quant=q8)
        add(p + "ffn_down_exps.weight", (E, H, I), quant=q8)
    kvs = [
        G.KV("general.architecture", G.STRING, "llama"),
        G.KV("general.name", G.STRING, name),
        G.KV("general.alignment", G.UINT32, 32),
        G.KV("llama.block_count", G.UINT32, L),
        G.KV("llama.context_length", G.UINT32, 128),
        G.KV("llama.embedding_length", G.UINT32, H),
        G.KV("llama.feed_forward_length", G.UINT32, I),
        G.KV("llama.attention.head_count", G.UINT32, c["n_heads"]),
        G.KV("llama.attention.head_count_kv", G.UINT32, c["n_kv_heads"]),
        G.KV("llama.attention.layer_norm_rms_epsilon", G.FLOAT32, 1e-5),
        G.KV("llama.rope.freq_base", G.FLOAT32, 10000.0),
        G.KV("llama.rope.dimension_count", G.UINT32, head_dim),
        G.KV("llama.expert_count", G.UINT32, E),
        G.KV("llama.expert_used_count", G.UINT32, c["top_k"]),
        G.KV("llama.vocab_size", G.UINT32, V),
        G.KV("tokenizer.ggml.model", G.STRING, "llama"),
        G.KV("tokenizer.ggml.tokens", G.ARRAY, tokens, G.STRING),
        G.KV("tokenizer.ggml.scores", G.ARRAY, scores, G.FLOAT32),
        G.KV("tokenizer.ggml.token_type", G.ARRAY, types, G.INT32),
        G.KV("tokenizer.ggml.bos_token_id", G.UINT32, 1),
        G.KV("tokenizer.ggml.eos_token_id", G.UINT32, 2),
        G.KV("tokenizer.ggml.add_bos_token", G.BOOL, True),
        G.KV("tokenizer.chat_template", G.STRING, CHAT_TEMPLATE.replace("</s>", "")),
    ]
    return G.GGUFSpec(kvs, entries, bytes(layout.data))
