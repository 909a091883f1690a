"""Tokenizers from the checkpoint's own files: tokenizer.json (tokenizers) or a
sentencepiece tokenizer.model; chat templates from tokenizer_config.json, rendered
with jinja2 as transformers renders them."""
from __future__ import annotations

import json
import re
from pathlib import Path


class Tokenizer:
    def __init__(self, files: dict[str, str]):
        self.bos_id: int | None = None
        self.eos_ids: list[int] = []
        self.chat_template: str | None = None
        self.special: dict[str, str] = {}
        if "tokenizer.json" in files:
            from tokenizers import Tokenizer as HfTokenizer

            self._hf = HfTokenizer.from_file(files["tokenizer.json"])
            self._sp = None
        elif "tokenizer.model" in files:
            import sentencepiece

            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=files["tokenizer.model"])
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_ids = [self._sp.eos_id()] if self._sp.eos_id() >= 0 else []
        else:
            raise ValueError("the checkpoint has no tokenizer.json or tokenizer.model")
        if "tokenizer_config.json" in files:
            self._read_config(Path(files["tokenizer_config.json"]))

    def _read_config(self, path: Path) -> None:
        cfg = json.loads(path.read_text())
        self.chat_template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        for name in ("bos_token", "eos_token"):
            token = cfg.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                self.special[name] = token
                tid = self.token_id(token)
                if tid is not None and name == "bos_token" and cfg.get("add_bos_token", True):
                    self.bos_id = tid
                if tid is not None and name == "eos_token" and tid not in self.eos_ids:
                    self.eos_ids.append(tid)

    def token_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        tid = self._sp.piece_to_id(token)
        return tid if tid != self._sp.unk_id() or token == self._sp.id_to_piece(tid) else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
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
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as the model was trained to see it, ready for the assistant's turn."""
        if not self.chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + "assistant:"
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=self.special.get("bos_token", ""), eos_token=self.special.get("eos_token", ""))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.render_chat(messages)
        # A template that writes the BOS token itself must not get a second one.
        add_bos = not (self.special.get("bos_token") and text.startswith(self.special["bos_token"]))
        return self.encode(text, add_bos=add_bos)
