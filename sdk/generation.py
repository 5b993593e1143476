"""One generation as an app holds it: iterate it for text as it is accepted; afterwards its
record (text, tokens, usage, tool calls, the parsed answer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from ..protocols.errors import TandemError
from .usage import GenerationRecord, Usage


class Generation:
    """One generation: iterate it (async) for text as it is accepted; afterwards `text`,
    `tokens` and `usage` hold the whole of it. Tokens already streamed stay in `record` even if
    the generation fails half-way."""

    def __init__(
        self, mode: str, run: Callable[[GenerationRecord], AsyncIterator[str]],
        on_done: Callable[[GenerationRecord], None] | None = None,
    ) -> None:
        self.record = GenerationRecord(mode=mode)
        self._run = run
        self._on_done = on_done
        self._started = False

    def __aiter__(self) -> AsyncIterator[str]:
        if self._started:
            raise TandemError("a Generation can be iterated once")
        self._started = True
        return self._timed()

    async def _timed(self) -> AsyncIterator[str]:
        t0 = time.perf_counter()
        try:
            async for piece in self._run(self.record):
                if self.record.first_piece_s is None:
                    self.record.first_piece_s = time.perf_counter() - t0
                    self.record.first_piece_tokens = len(self.record.tokens)
                self.record.text += piece
                yield piece
        finally:
            self.record.usage.wall_s = time.perf_counter() - t0
        if self._on_done is not None:
            self._on_done(self.record)

    async def collect(self) -> GenerationRecord:
        async for _ in self:
            pass
        return self.record

    @property
    def text(self) -> str:
        return self.record.text

    @property
    def tokens(self) -> list[int]:
        return self.record.tokens

    @property
    def usage(self) -> Usage:
        return self.record.usage

    @property
    def tool_calls(self) -> list:
        """The tool calls the model made (ToolCall: id, name, arguments as JSON text, error)."""
        return self.record.tool_calls

    @property
    def parsed(self):
        """The answer under a JSON response_format: a validated pydantic instance (for a model
        class) or the parsed JSON; None if it did not parse (`record.parse_error` says why)."""
        return self.record.parsed


__all__ = ["Generation"]
