"""The sentencepiece-style ("llama") tokenizer a GGUF file embeds: pieces, scores, types.

Encoding is sentencepiece's BPE as llama.cpp's llm_tokenizer_spm does it: spaces
become U+2581, a space is put before the text (add_space_prefix), the text is split into
characters, and the adjacent pair whose concatenation is the highest-scoring piece is
merged (ties: leftmost first) until no pair is a piece. Characters that are no piece
fall back to <0xXX> byte pieces, or <unk>. Special pieces (control, user-defined)
written in the text are kept whole, as llama.cpp and transformers do.
"""
from __future__ import annotations

import heapq
import re

from moeedge.tokenizer import Tokenizer, check_prompt

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class GGUFTokenizer(Tokenizer):
    """Offers what Tokenizer offers: encode, decode, encode_chat, bos_id, eos_ids."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int], *, bos_id: int | None = None,
                 eos_ids: list[int] | None = None, add_bos: bool = True, add_space_prefix: bool = True,
                 chat_template: str | None = None):
        self._hf = self._sp = None
        self.pieces, self.types = tokens, types
        self.add_space_prefix = add_space_prefix
        self.bos_id = bos_id if add_bos else None
        self.eos_ids = list(eos_ids or [])
        # A template of another type is reported when the chat is rendered (Tokenizer._set_template).
        self._set_template(chat_template, "GGUF metadata tokenizer.chat_template")
        self.special = {name: tokens[i] for name, i in (("bos_token", bos_id), ("eos_token", (eos_ids or [None])[0]))
                        if i is not None}
        self._ids: dict[str, int] = {}
        for i, piece in enumerate(tokens):
            self._ids.setdefault(piece, i)
        # Pieces that merges may form, with their scores (sentencepiece: normal and user-defined).
        self._merge = {p: (float(scores[i]), i) for i, p in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
        self._bytes: dict[int, int] = {}
        for i, piece in enumerate(tokens):
            m = _BYTE_PIECE.fullmatch(piece) if types[i] == BYTE else None
            if m:
                self._bytes.setdefault(int(m.group(1), 16), i)
        self.unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
        specials = sorted((p for i, p in enumerate(tokens) if p and types[i] in (CONTROL, USER_DEFINED, UNKNOWN)),
                          key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def token_id(self, token: str) -> int | None:
        return self._ids.get(token)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    # -- encoding ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        check_prompt(text)
        ids: list[int] = []
        prev_special = True  # the text's start counts as after a special piece: it gets the space prefix
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            if m.start() > pos:
                ids += self._encode_plain(text[pos:m.start()], prev_special)
            ids.append(self._ids[m.group()])
            prev_special, pos = True, m.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:], prev_special)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def _encode_plain(self, text: str, prefix: bool) -> list[int]:
        if prefix and self.add_space_prefix:
            text = " " + text
        return self._merge_pieces(list(text.replace(" ", SPACE)))

    def _merge_pieces(self, sym: list[str]) -> list[int]:
        """Greedy highest-score merges over a doubly linked list of symbols (llama.cpp llm_tokenizer_spm)."""
        n = len(sym)
        if n == 0:
            return []
        nxt, prv = list(range(1, n)) + [-1], list(range(-1, n - 1))
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                piece = sym[left] + sym[right]
                if piece in self._merge:
                    heapq.heappush(heap, (-self._merge[piece][0], left, right, piece))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, piece = heapq.heappop(heap)
            if nxt[left] != right or sym[left] + sym[right] != piece:
                continue  # one side merged with something else since this pair was queued
            sym[left], sym[right] = piece, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            nxt[right] = -2  # gone
            push(prv[left], left)
            push(left, nxt[left])
        ids: list[int] = []
        i = 0
        while i >= 0:
            piece = sym[i]
            if piece in self._merge:
                ids.append(self._merge[piece][1])
            else:
                ids += self._fallback(piece)
            i = nxt[i]
        return ids

    def _fallback(self, piece: str) -> list[int]:
        data = piece.encode("utf-8")
        if all(b in self._bytes for b in data):
            return [self._bytes[b] for b in data]
        return [self.unk_id] if self.unk_id is not None else []

    # -- decoding ----------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in self._known_ids(ids):
            kind = self.types[i]
            if kind == CONTROL:
                continue
            if kind == BYTE and (m := _BYTE_PIECE.fullmatch(self.pieces[i])):
                out.append(int(m.group(1), 16))
            elif kind == UNKNOWN:
                out += " \u2047 ".encode()  # what sentencepiece writes for <unk>
            else:
                out += self.pieces[i].replace(SPACE, " ").encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]  # the space encode() put before the text
        return text
