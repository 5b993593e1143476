"""Turning a growing list of token ids into a stream of text.

Decoding token by token breaks multi-byte characters and tokenizers that merge a leading space
into the next piece, so the decoder re-decodes a short window and emits only the text that is
stable: everything except a trailing U+FFFD (an incomplete UTF-8 sequence still waiting for its
next byte).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str], skip_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._skip = set(skip_ids)
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the new text that is now certain."""
        self._ids.extend(i for i in ids if i not in self._skip)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if not text.startswith(self._emitted):
            # a tokenizer that rewrites earlier text (rare); emit nothing until it settles
            return ""
        new = text[len(self._emitted) :]
        self._emitted = text
        return new

    def flush(self) -> str:
        """The rest, including any incomplete character as U+FFFD."""
        text = self._decode(self._ids)
        new = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new

    def pending_text(self) -> str:
        """Decoded text not emitted yet (an incomplete character, as U+FFFD)."""
        text = self._decode(self._ids)
        return text[len(self._emitted) :] if text.startswith(self._emitted) else text

    @property
    def text(self) -> str:
        return self._emitted


__all__ = ["IncrementalDecoder"]
