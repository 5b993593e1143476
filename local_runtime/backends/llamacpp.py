"""llama.cpp as a drafting engine (llama-cpp-python, the `llamacpp` extra).

The engine keeps its own KV cache inside llama.cpp and rolls back by position:
`truncate(pos)` is `llama_memory_seq_rm(mem, seq, pos, -1)`, the same move-the-position rollback
the torch engine does with `DynamicCache.crop`. Token ids are the model's own, and the tokenizer
stays tandem's (read from the same GGUF by transformers), so a llama.cpp drafter and a torch
target that share a vocabulary verify token ids exactly as before.

Each decode is one `llama_decode` of the uncached tokens through the low-level API (no sampler
chain, no per-call copy of the whole logits matrix): a greedy draft step is the decode plus an
argmax over the last row, which is what llama.cpp's own generation loop does.
"""

from __future__ import annotations

import atexit
import math
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import BackendUnavailable, missing_extra

if TYPE_CHECKING:
    import torch

    from ..engine import Draft
    from ..models import Tokenizer

DEFAULT_N_CTX = 4096

# Every open model, closed at interpreter exit while llama_cpp's module is still whole: left to
# Llama.__del__ during teardown, its free functions are already None and it prints a traceback.
_open_models: "weakref.WeakSet[LlamaCppModel]" = weakref.WeakSet()


@atexit.register
def _close_open_models() -> None:
    for model in list(_open_models):
        model.close()


def _llama_cpp():
    try:
        import llama_cpp  # noqa: PLC0415 - optional and heavy
    except ImportError as exc:
        raise missing_extra("llama-cpp-python", "llamacpp", "the llama.cpp backend") from exc
    return llama_cpp


def default_threads() -> int:
    import os

    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp, with tandem's tokenizer for the same vocabulary."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        tokenizer: "Tokenizer",
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_batch: int = 512,
    ) -> None:
        llama_cpp = _llama_cpp()
        self.name = name
        self.source = str(path)
        self.tokenizer = tokenizer
        self.n_threads = n_threads or default_threads()
        self.n_batch = n_batch
        if not Path(path).is_file():
            raise BackendUnavailable(f"llama.cpp needs a GGUF file; nothing at {path}")
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=self.n_threads,
            n_threads_batch=self.n_threads, logits_all=False, verbose=False,
        )
        _open_models.add(self)
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        ours = max(tokenizer.vocab.values()) + 1 if tokenizer.vocab else 0
        if ours > self.n_vocab:
            raise BackendUnavailable(
                f"{path} has {self.n_vocab} tokens but the tokenizer of '{name}' has {ours}: not the same vocabulary"
            )

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    def resident_bytes(self) -> int:
        """The weights as llama.cpp holds them plus this context's state (KV cache, logits)."""
        llama_cpp = _llama_cpp()
        return int(llama_cpp.llama_model_size(self.llm.model)) + int(llama_cpp.llama_state_get_size(self.llm.ctx))

    def new_engine(self, *, tie_margin: float | None = None) -> "LlamaCppEngine":
        from ..engine import DEFAULT_TIE_MARGIN

        return LlamaCppEngine(self, tie_margin=DEFAULT_TIE_MARGIN if tie_margin is None else tie_margin)

    def close(self) -> None:
        """Free llama.cpp's model and context (idempotent)."""
        self.llm.close()
        _open_models.discard(self)


class LlamaCppEngine:
    """The `DraftingEngine` interface over one llama.cpp context (sequence 0)."""

    def __init__(self, model: LlamaCppModel, *, tie_margin: float) -> None:
        self.lm = model
        self.tie_margin = tie_margin
        self.tokens: list[int] = []
        self.cached = 0
        self.forward_passes = 0
        self.tie_recomputes = 0
        self._llama_cpp = _llama_cpp()
        self._ctx = model.llm.ctx
        self._mem = self._llama_cpp.llama_get_memory(self._ctx)
        self._clear()

    # -- the cache ---------------------------------------------------------------------------

    def _clear(self) -> None:
        self._llama_cpp.llama_memory_clear(self._mem, True)
        self.cached = 0

    def reset(self) -> None:
        self.tokens = []
        self._clear()

    def append(self, tokens: list[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def truncate(self, pos: int) -> None:
        if pos < 0 or pos > len(self.tokens):
            raise ValueError(f"cannot truncate a sequence of {len(self.tokens)} tokens to {pos}")
        del self.tokens[pos:]
        self.truncate_cache(pos)

    def truncate_cache(self, pos: int) -> None:
        if self.cached > pos:
            if not self._llama_cpp.llama_memory_seq_rm(self._mem, 0, pos, -1):
                # a cache that cannot drop a suffix (recurrent models): recompute from scratch
                self._clear()
                return
            self.cached = pos

    def _decode(self, upto: int) -> np.ndarray:
        """Evaluate tokens[cached:upto]; a view of the last position's logits (valid until the next decode)."""
        llama_cpp = self._llama_cpp
        if upto > self.lm.n_ctx:
            raise BackendUnavailable(f"sequence of {upto} tokens exceeds the llama.cpp context ({self.lm.n_ctx})")
        while self.cached < upto:
            n = min(self.lm.n_batch, upto - self.cached)
            arr = (llama_cpp.llama_token * n)(*self.tokens[self.cached : self.cached + n])
            rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, n))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self.cached += n
            self.forward_passes += 1
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.lm.n_vocab,))

    def _next_row(self) -> np.ndarray:
        if not self.tokens:
            raise RuntimeError("nothing to compute: the sequence is empty")
        if self.cached == len(self.tokens):
            self.truncate_cache(len(self.tokens) - 1)
        return self._decode(len(self.tokens))

    def next_logits(self) -> "torch.Tensor":
        import torch

        return torch.from_numpy(self._next_row().copy())

    def fresh_logits(self, prefix_len: int) -> "torch.Tensor":
        """Logits after tokens[:prefix_len], recomputed from an empty cache in one batch (canonical)."""
        import torch

        self._clear()
        row = self._decode(prefix_len)
        return torch.from_numpy(row.copy())

    # -- entry points --------------------------------------------------------------------------

    def prefill(self, prompt: list[int]) -> "torch.Tensor":
        self.reset()
        self.append(prompt)
        return self.next_logits()

    def step(self, token: int) -> "torch.Tensor":
        self.append([token])
        return self.next_logits()

    def greedy_token(self, logits: "torch.Tensor", prefix_len: int) -> int:
        import torch

        from ..sampling import top2_margin

        if top2_margin(logits) >= self.tie_margin:
            return int(torch.argmax(logits))
        self.tie_recomputes += 1
        return int(torch.argmax(self.fresh_logits(prefix_len)))

    def draft(
        self,
        k: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: Any = None,
        support: int | None = None,
    ) -> "Draft":
        """k tokens after the sequence, appended to `tokens` (the last one not yet evaluated)."""
        from ..engine import Draft
        from ..sampling import DEFAULT_DRAFT_SUPPORT

        t0 = time.perf_counter()
        out = Draft(tokens=[], probs=[], dists=[] if temperature > 0 else None)
        if k == 0:
            return out
        if temperature > 0:
            return self._draft_sampled(k, temperature, top_p, generator, support or DEFAULT_DRAFT_SUPPORT, out, t0)
        row = self._next_row()
        for i in range(k):
            tok = int(row.argmax())
            # q(tok) = 1 / sum(exp(l - l[tok])); l[tok] is the max, so no term overflows
            out.probs.append(1.0 / float(np.exp(row - row[tok]).sum(dtype=np.float64)))
            out.tokens.append(tok)
            self.tokens.append(tok)
            if i < k - 1:
                row = self._decode(len(self.tokens))
        out.seconds = time.perf_counter() - t0
        return out

    def _draft_sampled(self, k, temperature, top_p, generator, support, out, t0) -> "Draft":
        import torch

        from ..sampling import logits_to_probs, sample_sparse, truncate_support

        logits = self.next_logits()
        for i in range(k):
            ids, probs = truncate_support(logits_to_probs(logits, temperature, top_p), support)
            tok = sample_sparse(ids, probs, generator)
            out.dists.append((ids.tolist(), probs.tolist()))
            out.probs.append(float(probs[(ids == tok).nonzero()[0, 0]]))
            out.tokens.append(tok)
            self.tokens.append(tok)
            if i < k - 1:
                logits = torch.from_numpy(self._decode(len(self.tokens)).copy())
        out.seconds = time.perf_counter() - t0
        return out


def native_generate_rate(model: LlamaCppModel, prompt: list[int], n: int) -> tuple[float, float]:
    """llama.cpp's own loop on a fresh context: (prompt tokens/s, generated tokens/s), greedy.

    Prefill is `Llama.eval` of the prompt (its batched path); decode is `Llama.generate`, timed
    from its first token to its n-th, so the prompt is not counted twice."""
    llm = model.llm
    llm.reset()
    _llama_cpp().llama_memory_clear(_llama_cpp().llama_get_memory(llm.ctx), True)
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t0)
    llm.reset()
    count, t1 = 0, 0.0
    for _tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if count == 0:
            t1 = time.perf_counter()
        count += 1
        if count > n:
            break
    decode = n / (time.perf_counter() - t1) if count > n else math.nan
    return prefill, decode


__all__ = ["LlamaCppModel", "LlamaCppEngine", "native_generate_rate", "default_threads"]
