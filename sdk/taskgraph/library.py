"""Plain functions for task graphs that devices run by name ('tandem.sdk.taskgraph.library:NAME').

A device agent runs only functions from the module prefixes it announces (this module by
default), so a broker message can never name arbitrary code.
"""

from __future__ import annotations

import re
import time


def split_chunks(document: str, size: int = 800, overlap: int = 0) -> list[str]:
    """Cut `document` into pieces of at most `size` characters, at paragraph, then sentence,
    then word boundaries where one falls in the last fifth of a piece."""
    if size < 1:
        raise ValueError("size must be at least 1")
    if not 0 <= overlap < size:
        raise ValueError("overlap must be within [0, size)")
    text = document.strip()
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            window = text[start + (4 * size) // 5 : end]
            for pattern in (r"\n\s*\n", r"(?<=[.!?])\s", r"\s"):
                cuts = [m.end() for m in re.finditer(pattern, window)]
                if cuts:
                    end = start + (4 * size) // 5 + cuts[-1]
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        start = max(end - overlap, start + 1)
    return chunks


def join(items: list, sep: str = "\n") -> str:
    return sep.join(str(i) for i in items)


def numbered(items: list, max_chars: int | None = None) -> str:
    """'1. first', '2. second', ... one per line: a reduce input a model can cite by number;
    each item cut to `max_chars` when given (keeps a gathered prompt within a small context)."""
    return "\n".join(f"{i + 1}. {str(item).strip()[:max_chars]}" for i, item in enumerate(items))


def collect(*values: object) -> list:
    """Its inputs, as one list."""
    return list(values)


def word_count(document: str) -> int:
    return len(document.split())


def pause(value: object = None, seconds: float = 0.1) -> object:
    """Wait, then return `value`: a stand-in for work of known length in tests."""
    time.sleep(seconds)
    return value


__all__ = ["collect", "join", "numbered", "pause", "split_chunks", "word_count"]
