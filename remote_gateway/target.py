"""What a target backend gives the gateway (the logic of sessions, the accept rule, limits and
batching is backend-free): per-session sequence state, and forward passes over many sessions'
pending tokens at once.

    backend.new_engine()          -> per-session state: a local_runtime `Sequence`
    backend.forward([engines])    -> for each, the logits rows of its uncached tokens
    backend.fill(engine, upto)    -> put a prompt into the cache (no logits wanted)

Implementations: backends.py (transformers in-process, vLLM), llamacpp_target.py (llama.cpp).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class TargetBackend(ABC):
    lm: Any  # .name, .tokenizer (local_runtime.models.Tokenizer), .vocab_size
    batched: bool = False  # whether forward() packs several sessions into one pass
    supports_sampling: bool = True
    max_sequence_tokens: int | None = None  # a session's longest sequence, where the backend bounds it
    choice: Any = None  # choice.TargetChoice when the target was chosen for this machine (NAME@auto)

    @property
    def name(self) -> str:
        return self.lm.name

    @abstractmethod
    def new_engine(self, tie_margin: float | None = None) -> Any:
        """A session's engine; `tie_margin` None: the model's own (`model.tie_margin`)."""

    @abstractmethod
    def forward(self, engines: list) -> list[torch.Tensor]: ...

    def fill(self, engine, upto: int) -> None:
        self.forward_one(engine, upto)

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one cached token takes (0: unknown, no KV budget applies)."""
        return 0

    def forward_one(self, engine, upto: int | None = None) -> torch.Tensor:
        return engine.compute(upto)


__all__ = ["TargetBackend"]
