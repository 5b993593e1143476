"""Turning a growing list of token ids into a stream of text, in constant work per token.

Decoding token by token breaks multi-byte characters, and tokenizers that merge a leading space
into the next piece decode a token differently alone than after its predecessor. So the decoder
keeps two offsets into the ids (the method of Hugging Face's text-generation-inference and
vLLM's detokenizer):

    ids:   ... [prefix ........ read) [read ....... end)
                 already emitted:       new since then
                 decoded as context

Each push decodes only the window from `prefix`: the text of the new tokens is
decode(ids[prefix:]) minus decode(ids[prefix:read]), both starting at the same token, so a
leading-space rule affects them alike. Complete characters are emitted at once; a trailing
U+FFFD (an incomplete UTF-8 sequence still waiting for its next byte) is held back. Once the
window ends on a whole character it slides: prefix <- read, read <- end.

Written by hand rather than with `tokenizers.decoders.DecodeStream`: tandem's `Tokenizer` wraps
other decoders too (the byte-level test tokenizer, GGUF-embedded ones), and its callers need the
text held back (`pending_text`) and a final `flush`, which DecodeStream does not expose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str], skip_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._skip = set(skip_ids)
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this are emitted in full
        self._tail = 0  # characters emitted of the ids after `read` (whole characters before an incomplete one)
        self._emitted = ""

    def _window(self) -> tuple[str, str] | None:
        """(the text of ids[read:] as decoded in the window, the context it follows), or None
        while the tokenizer rewrites earlier text (rare; nothing is emitted until it settles)."""
        context = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if not text.startswith(context):
            return None
        return text[len(context) :], context

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the new text that is now certain."""
        self._ids.extend(i for i in ids if i not in self._skip)
        window = self._window()
        if window is None:
            return ""
        pending = window[0]
        stable = pending.rstrip("\ufffd")
        new = stable[self._tail :]
        self._tail = max(self._tail, len(stable))
        self._emitted += new
        if stable == pending:  # the window ends on a whole character: slide it
            self._prefix, self._read, self._tail = self._read, len(self._ids), 0
        return new

    def pending_text(self) -> str:
        """Decoded text not emitted yet (an incomplete character, as U+FFFD)."""
        window = self._window()
        return window[0][self._tail :] if window is not None else ""

    def flush(self) -> str:
        """The rest, including any incomplete character as U+FFFD."""
        rest = self.pending_text()
        self._emitted += rest
        self._prefix, self._read, self._tail = self._read, len(self._ids), 0
        return rest

    @property
    def text(self) -> str:
        return self._emitted


__all__ = ["IncrementalDecoder"]
