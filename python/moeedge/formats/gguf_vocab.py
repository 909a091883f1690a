"""The tokenizer a GGUF file embeds, checked before it is built: sentencepiece-style
("llama": pieces, scores, types; moeedge.tokenizer_gguf) or GPT-2-style byte-level BPE
("gpt2": tokens, types, merges, the pre-tokenizer's name; moeedge.tokenizer_gguf_bpe)."""
from __future__ import annotations

import functools

from moeedge.formats.errors import CheckpointError, shown
from moeedge.formats.gguf_file import GGUFFile

SPECIAL_IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, str) for t in value)


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) for t in value)


def tokenizer_factory(f: GGUFFile):
    """A callable making the file's tokenizer; None where the file embeds none moeedge reads."""
    m = f.metadata
    model = m.get("tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        return None
    tokens, types = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.token_type")
    if not (_strings(tokens) and _ints(types) and len(tokens) == len(types)):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens (strings) and token_type (integers) are missing, "
                              f"of other types or differ in length")
    for key in SPECIAL_IDS:
        if key in m and not (isinstance(m[key], int) and 0 <= m[key] < len(tokens)):
            raise CheckpointError(f"{f.path}: {key} = {shown(m[key])} is not a token id (vocabulary of {len(tokens)})")
    eos = list(dict.fromkeys(m[k] for k in SPECIAL_IDS[1:] if k in m))
    add_bos = m.get("tokenizer.ggml.add_bos_token")
    template = m.get("tokenizer.chat_template")
    if model == "llama":
        return _sentencepiece(f, tokens, types, eos, add_bos, template)
    from moeedge.tokenizer_gguf_bpe import GGUFBPETokenizer, pre_tokenizer_kind

    merges = m.get("tokenizer.ggml.merges")
    if not _strings(merges):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.merges (strings) is missing or of another type: a "
                              f"byte-level BPE vocabulary needs its merges")
    # A file without the key predates it: llama.cpp reads it as "default".
    pre = m.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.pre = {shown(pre)} is not a string")
    pre_tokenizer_kind(pre, f.path)  # an unknown one refused when the checkpoint is opened
    # llama.cpp adds BOS to BPE prompts only where the file says so (Llama 3's pre-types: by default).
    add_bos = bool(add_bos) if add_bos is not None else pre in ("llama3", "llama-v3", "llama-bpe")
    return functools.partial(GGUFBPETokenizer, tokens, types, merges, pre, path=f.path,
                             bos_id=m.get("tokenizer.ggml.bos_token_id"), eos_ids=eos, add_bos=add_bos,
                             chat_template=template)


def _sentencepiece(f: GGUFFile, tokens, types, eos, add_bos, template):
    scores = f.metadata.get("tokenizer.ggml.scores")
    if not (isinstance(scores, list) and len(scores) == len(tokens)
            and all(isinstance(x, (int, float)) for x in scores)):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens (strings), scores (numbers) and token_type "
                              f"(integers) are missing, of other types or differ in length")
    from moeedge.tokenizer_gguf import GGUFTokenizer

    return functools.partial(GGUFTokenizer, tokens, scores, types, bos_id=f.metadata.get("tokenizer.ggml.bos_token_id"),
                             eos_ids=eos, add_bos=bool(add_bos if add_bos is not None else True),
                             add_space_prefix=bool(f.metadata.get("tokenizer.ggml.add_space_prefix", True)),
                             chat_template=template)
