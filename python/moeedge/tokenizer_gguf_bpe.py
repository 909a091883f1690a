"""GPT-2-style byte-level BPE vocabularies a GGUF file embeds (tokenizer.ggml.model "gpt2":
Qwen2-MoE, OLMoE, Llama 3 and most models since), rebuilt with the tokenizers library from
the file's tokens and merges. The text is split before BPE by the regular expressions
llama.cpp applies for the file's tokenizer.ggml.pre (llama-vocab.cpp), each splitting the
pieces of the one before, then mapped to GPT-2's byte alphabet. Control and user-defined
tokens written in the text are kept whole, as llama.cpp and transformers do."""
from __future__ import annotations

from moeedge.formats.errors import CheckpointError, brief, shown
from moeedge.tokenizer import Tokenizer
from moeedge.tokenizer_gguf import CONTROL, UNUSED, USER_DEFINED

# llama.cpp's expressions, by pre-tokenizer type (\p{L} letters, \p{N} digits).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
}
# tokenizer.ggml.pre as the converter writes it -> the expressions llama.cpp uses for it
PRE = {
    "default": "default",
    **dict.fromkeys(("gpt-2", "phi-2", "olmo", "mpt", "jais", "trillion", "granite-docling", "gigachat",
                     "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de"), "gpt2"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), "qwen2"),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), "starcoder"),
    "falcon": "falcon",
}
# llama.cpp ignores merges for a word the vocabulary holds whole (ignore_merges) for these
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}
# transformers normalises Qwen2's text to NFC (its tokenizer.json says so; llama.cpp does not):
# the model saw NFC text, so decomposed accents are composed first here too.
NFC = {"qwen2", "deepseek-r1-qwen"}


def pre_tokenizer_kind(pre: str, path) -> str:
    """The expressions' name for a tokenizer.ggml.pre value; CheckpointError names an unknown one."""
    if pre not in PRE:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {shown(pre)} is a pre-tokenizer moeedge does not know; "
                              f"known: {', '.join(sorted(PRE))}")
    return PRE[pre]


class GGUFBPETokenizer(Tokenizer):
    """Offers what Tokenizer offers (encode, decode, encode_chat, bos_id, eos_ids), through
    a tokenizers.Tokenizer built from the file."""

    def __init__(self, tokens: list[str], types: list[int], merges: list[str], pre: str, *, path="GGUF",
                 bos_id: int | None = None, eos_ids: list[int] | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        self._sp = None
        self._hf = _build(tokens, types, merges, pre, path)
        self.bos_id = bos_id if add_bos else None
        self.eos_ids = list(eos_ids or [])
        self.special = {name: tokens[i] for name, i in (("bos_token", bos_id), ("eos_token", (eos_ids or [None])[0]))
                        if i is not None}
        self._set_template(chat_template, "GGUF metadata tokenizer.chat_template")


def _build(tokens: list[str], types: list[int], merges: list[str], pre: str, path):
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )
    from tokenizers import Tokenizer as HfTokenizer

    kind = pre_tokenizer_kind(pre, path)
    vocab: dict[str, int] = {}
    for i, (token, kind_of) in enumerate(zip(tokens, types)):
        if kind_of != UNUSED:  # the converter's [PADn] fillers up to the embedding's rows
            vocab.setdefault(token, i)
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # llama.cpp: the first space after the first character
        if cut < 0:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges holds {shown(merge)}, not two tokens separated "
                                  f"by a space")
        pairs.append((merge[:cut], merge[cut + 1:]))
    try:
        model = models.BPE(vocab, pairs, byte_fallback=False, ignore_merges=pre in IGNORE_MERGES)
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens and merges do not make a BPE vocabulary "
                              f"({brief(e, 200)})") from None
    tok = HfTokenizer(model)
    if pre in NFC:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in SPLITS[kind]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=types[i] == CONTROL, normalized=False)
                for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED) and t]
    tok.add_special_tokens([a for a in specials if a.special])
    tok.add_tokens([a for a in specials if not a.special])
    return tok
