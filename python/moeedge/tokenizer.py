"""Tokenizers from the checkpoint's own files: tokenizer.json (tokenizers) or a
sentencepiece tokenizer.model; chat templates from tokenizer_config.json (or
chat_template.jinja), rendered in a sandbox as transformers renders them.

A downloaded checkpoint is untrusted input: each file's size is checked before it is read,
and anything malformed ends in a CheckpointError (a ValueError) naming the file and the field.
"""
from __future__ import annotations

import json
import operator
import os
import re
import stat

from moeedge.chat_template import ChatTemplate, ChatTemplateError, check_messages
from moeedge.formats.errors import CheckpointError
from moeedge.units import format_bytes

# Refused above these sizes, before they are read. Real ones: tokenizer.json 7 MB (Qwen2),
# 9 MB (Llama 3), 33 MB (Gemma 3, 262k tokens); sentencepiece models under 5 MB;
# tokenizer_config.json under 2 MB; chat templates under 20 KB.
MAX_FILE_BYTES = {"tokenizer.json": 128 << 20, "tokenizer.model": 32 << 20, "tokenizer_config.json": 16 << 20,
                  "special_tokens_map.json": 16 << 20, "chat_template.jinja": 1 << 20}
_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def read_file(path: str, name: str) -> bytes:
    """The bytes of a tokenizer file, refusing one over MAX_FILE_BYTES[name] unread."""
    limit = MAX_FILE_BYTES[name]
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise CheckpointError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise CheckpointError(f"{path}: {format_bytes(st.st_size)}, over the limit of {format_bytes(limit)} "
                                  f"for a {name}")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > limit:  # it grew since stat()
        raise CheckpointError(f"{path}: over the limit of {format_bytes(limit)} for a {name}")
    return data


def read_text(path: str, name: str) -> str:
    data = read_file(path, name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_json_object(path: str, name: str) -> dict:
    try:
        value = json.loads(read_text(path, name))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: a JSON {type(value).__name__}, not an object")
    return value


def _token_text(value, path: str, field: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": string}, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{path}: {field} is {_short(value)}, not a string or {{\"content\": string}}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{path}: {field} is not valid text (it holds a lone surrogate)") from None
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def check_prompt(text, what: str = "the prompt") -> None:
    """A prompt must be a str that UTF-8 can encode: no lone surrogates, which is what
    invalid UTF-8 becomes when Python reads it from argv or a surrogateescape stream."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid text: {text[e.start]!r} at character {e.start} is a lone surrogate "
                         f"(was the input valid UTF-8?)") from None


class Tokenizer:
    # A chat template is compiled when first used, and a problem with it is reported then:
    # generating from a plain prompt does not need it.
    chat_template: str | None = None
    _template_origin = ""
    _template_problem: str | None = None
    _compiled: ChatTemplate | None = None

    def __init__(self, files: dict[str, str]):
        self.bos_id: int | None = None
        self.eos_ids: list[int] = []
        self.special: dict[str, str] = {}
        if "tokenizer.json" in files:
            from tokenizers import Tokenizer as HfTokenizer

            path = files["tokenizer.json"]
            text = read_text(path, "tokenizer.json")
            try:
                self._hf = HfTokenizer.from_str(text)
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise CheckpointError(f"{path}: not a tokenizer.json the tokenizers library reads "
                                      f"({_first_line(e)})") from None
            self._sp = None
        elif "tokenizer.model" in files:
            import sentencepiece

            path = files["tokenizer.model"]
            data = read_file(path, "tokenizer.model")
            self._hf = None
            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
            except Exception as e:  # RuntimeError: could not parse ModelProto
                raise CheckpointError(f"{path}: not a sentencepiece model ({_first_line(e)})") from None
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_ids = [self._sp.eos_id()] if self._sp.eos_id() >= 0 else []
        else:
            raise ValueError("the checkpoint has no tokenizer.json or tokenizer.model")
        config = read_json_object(files["tokenizer_config.json"], "tokenizer_config.json") \
            if "tokenizer_config.json" in files else {}
        if "special_tokens_map.json" in files:
            # Its end-of-sequence token stops generation where tokenizer_config.json names none
            # (its BOS token is not taken: that would change what a prompt starts with).
            path = files["special_tokens_map.json"]
            specials = read_json_object(path, "special_tokens_map.json")
            _check_special_tokens_map(specials, path)
            if "eos_token" not in config and "eos_token" in specials:
                config = {**config, "eos_token": specials["eos_token"]}
        self._read_config(config, files.get("tokenizer_config.json", "tokenizer_config.json"))
        if "chat_template.jinja" in files:  # transformers writes the template there since 4.50
            self._set_template(read_text(files["chat_template.jinja"], "chat_template.jinja"),
                               files["chat_template.jinja"])

    def _read_config(self, cfg: dict, path: str) -> None:
        add_bos = cfg.get("add_bos_token", True)
        if add_bos is not None and not isinstance(add_bos, bool):
            raise CheckpointError(f"{path}: add_bos_token is {_short(add_bos)}, not true or false")
        for name in ("bos_token", "eos_token"):
            token = _token_text(cfg.get(name), path, name)
            if token is not None:
                self.special[name] = token
                tid = self.token_id(token)
                if tid is not None and name == "bos_token" and add_bos:
                    self.bos_id = tid
                if tid is not None and name == "eos_token" and tid not in self.eos_ids:
                    self.eos_ids.append(tid)
        self._set_template(cfg.get("chat_template"), f"{path}: chat_template")

    def _set_template(self, template, origin: str) -> None:
        """A template as tokenizer_config.json holds it: a string, a list of {"name", "template"}
        (the one named "default" is used, as in transformers), or absent."""
        self.chat_template, self._template_origin, self._template_problem, self._compiled = None, origin, None, None
        if isinstance(template, list):
            named = {}
            for entry in template:
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    self._template_problem = f"{origin}: {_short(entry)} is not a {{\"name\": string, \"template\": " \
                                             f"string}} entry"
                    return
                named[entry["name"]] = entry["template"]
            if "default" not in named:
                self._template_problem = f"{origin}: has no template named 'default' (it has {sorted(named)})"
                return
            template, self._template_origin = named["default"], f"{origin} 'default'"
        if template is not None and not isinstance(template, str):
            self._template_problem = f"{origin}: is {_short(template)}, not a string or a list of " \
                                     f"{{\"name\", \"template\"}} entries"
            return
        self.chat_template = template

    def token_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        tid = self._sp.piece_to_id(token)
        return tid if tid != self._sp.unk_id() or token == self._sp.id_to_piece(tid) else None

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True) if self._hf is not None else self._sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        check_prompt(text)
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_sp(text)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def _encode_sp(self, text: str) -> list[int]:
        """sentencepiece reads "<s>" as three characters: special tokens written by a chat
        template are cut out and mapped to their ids, as transformers does."""
        specials = {t: self.token_id(t) for t in self.special.values()}
        specials = {t: i for t, i in specials.items() if i is not None}
        if not specials:
            return self._sp.encode(text)
        ids: list[int] = []
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = self._known_ids(ids)
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    def _known_ids(self, ids) -> list[int]:
        """ids as ints; those past the vocabulary dropped (a model's embedding may have more rows
        than its tokenizer has tokens; tokenizers skips them too), negative ones refused."""
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise TypeError(f"token ids must be a list of integers, got {_short(ids)}") from None
        if any(i < 0 for i in ids):
            raise ValueError(f"token id {min(ids)} is negative")
        n = self.vocab_size
        return [i for i in ids if i < n]

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as the model was trained to see it, ready for the assistant's turn."""
        messages = check_messages(messages)
        if self._template_problem:
            raise ChatTemplateError(self._template_problem)
        if not self.chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + "assistant:"
        if self._compiled is None:
            self._compiled = ChatTemplate(self.chat_template, self._template_origin)
        # The variables transformers passes (tools and documents are None without tool use).
        return self._compiled.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                     bos_token=self.special.get("bos_token", ""),
                                     eos_token=self.special.get("eos_token", ""))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.render_chat(messages)
        check_prompt(text, "the text the chat template rendered")
        # A template that writes the BOS token itself must not get a second one.
        add_bos = not (self.special.get("bos_token") and text.startswith(self.special["bos_token"]))
        ids = self.encode(text, add_bos=add_bos)
        if not ids:
            raise ValueError(f"the chat rendered as {_short(text)}, which is no tokens")
        return ids


def _check_special_tokens_map(specials: dict, path: str) -> None:
    for field in _TOKEN_FIELDS:
        _token_text(specials.get(field), path, field)
    extra = specials.get("additional_special_tokens", [])
    if not isinstance(extra, list):
        raise CheckpointError(f"{path}: additional_special_tokens is {_short(extra)}, not a list")
    for i, token in enumerate(extra):
        if _token_text(token, path, f"additional_special_tokens[{i}]") is None:
            raise CheckpointError(f"{path}: additional_special_tokens[{i}] is null")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:200] + "..."
