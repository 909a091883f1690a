"""Text in and out of a loaded model: prompts encoded, tokens streamed back as text,
stop strings, and chat templates (the tokenizer's)."""
from __future__ import annotations

from collections.abc import Iterator

from moeedge.tokenizer import Tokenizer


class TextGeneration:
    """The text half of moeedge.api.MoeModel (a mixin over its stream_ids and tokenizer)."""

    tokenizer: Tokenizer | None

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.checkpoint.source} has no tokenizer files: pass token ids to stream_ids()")
        return self.tokenizer

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               stop: list[str] | None = None, _ids: list[int] | None = None, **sampling) -> Iterator[str]:
        """Yield pieces of text as they are generated; sampling: stream_ids' min_p,
        repeat_penalty, repeat_last_n. None: the model's default (temperature=0: greedy)."""
        tok = self._need_tokenizer()
        ids = _ids if _ids is not None else tok.encode(prompt)
        generated: list[int] = []
        emitted = ""
        for token in self.stream_ids(ids, max_new_tokens, temperature, top_p, top_k, seed, **sampling):
            generated.append(token)
            text = tok.decode(generated)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            cut = min((text.find(s, max(0, len(emitted) - len(s))) for s in (stop or []) if s in text), default=-1)
            if cut >= 0:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                return
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: list[str] | None = None, **sampling) -> str:
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, **sampling))

    def chat(self, messages: list[dict], stream: bool = False, **kwargs):
        """The assistant's reply to a conversation, with the checkpoint's chat template;
        kwargs: stream's (sampling values, stop)."""
        ids = self._need_tokenizer().encode_chat(messages)
        pieces = self.stream("", _ids=ids, **kwargs)
        return pieces if stream else "".join(pieces)
