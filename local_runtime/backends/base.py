"""The two interfaces a device backend implements.

    PrefillBackend      prompt in, next-token logits (and the prompt's keys/values) out;
                        what an accelerator runs (defined in local_runtime/prefill.py, beside
                        its result, so the torch engine takes one without importing backends)
    DraftingEngine      the part of a `Sequence` (local_runtime/sequence.py) the speculative loop
                        drives: tokens with a cache written by position, `draft(k)`,
                        `truncate(pos)`; every engine extends that base, so the loop runs
                        unchanged on torch, the lean int8 loop, llama.cpp and MLC

Both report `resident_bytes()`: the memory their copy of the model occupies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ...protocols.errors import BackendUnavailable

if TYPE_CHECKING:
    import torch

    from ..draft import Draft


@runtime_checkable
class DraftingEngine(Protocol):
    """One sequence and its cache. `tokens` may run ahead of the cache: whatever is not cached yet
    is computed on the next `next_logits`/`draft`/`step`."""

    tokens: list[int]

    def reset(self) -> None: ...

    def append(self, tokens: list[int]) -> None: ...

    def truncate(self, pos: int) -> None: ...

    def next_logits(self) -> "torch.Tensor": ...

    def prefill(self, prompt: list[int]) -> "torch.Tensor": ...

    def step(self, token: int) -> "torch.Tensor": ...

    def greedy_token(self, logits: "torch.Tensor", prefix_len: int, allowed: Any = None) -> int: ...

    def draft(self, k: int, *, temperature: float = 0.0, top_p: float = 1.0, generator: Any = None,
              support: int = ..., grammar: Any = None, max_len: int | None = None) -> "Draft": ...


def missing_extra(package: str, extra: str, what: str) -> BackendUnavailable:
    """The one-line error for an optional backend whose package is not installed."""
    return BackendUnavailable(f"{what} needs the '{package}' package: pip install 'tandem[{extra}]'")


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by distinct tensors (shared storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        try:
            ptr = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # opaque layouts (oneDNN-packed weights)
            ptr, size = id(t), t.numel() * t.element_size()
        if ptr not in seen:
            seen.add(ptr)
            total += size
    return total


__all__ = ["DraftingEngine", "missing_extra", "tensor_bytes"]
