"""Token ids to text pieces as a request generates them.

Each token decodes within a short window of the tokens before it (as Hugging Face's
text-generation-inference does), so a piece costs the same at token 10 and at token
2,000 and the pieces join to what decoding all the ids at once gives, and a tokenizer that drops a word's leading space when it starts the text
(sentencepiece, Metaspace) still gives the space. Text is held back while it ends in half
a UTF-8 character, or in what could be the start of a stop string, until decided.
"""
from __future__ import annotations

from moeedge.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self._prefix = 0      # ids[_prefix:_read] decoded give what is already in self.text
        self._read = 0
        self.text = ""        # decided text, stop strings cut out
        self._held = ""       # decoded text not yet decided (a possible stop string's start)
        self.stopped = False  # a stop string was found; text ends before it

    def push(self, token: int) -> str:
        """The text this token decides (maybe ""); after a stop string, nothing more."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self._prefix:self._read])
        now = self.tok.decode(self.ids[self._prefix:])
        if now.endswith("\ufffd") or len(now) < len(before):  # half a character: wait for the rest
            return ""
        self._held += now[len(before):]
        # The window moves on to the previous token only if that decodes to text alone: a
        # token that decodes to nothing (a special one, one past the vocabulary) would leave
        # the next token first in the window, and the tokenizer would drop its leading space.
        if self._read > self._prefix and self.tok.decode(self.ids[self._read:self._read + 1]):
            self._prefix = self._read
        self._read = len(self.ids)
        return self._decide()

    def _decide(self) -> str:
        cut = min((i for i in (self._held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._held, self.stopped = self._held[:cut], "", True
        else:
            keep = max((n for s in self.stop for n in range(min(len(s) - 1, len(self._held)), 0, -1)
                        if self._held.endswith(s[:n])), default=0)
            out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of a generation without a stop string: what was held back."""
        out, self._held = ("" if self.stopped else self._held), ""
        self.text += out
        return out
