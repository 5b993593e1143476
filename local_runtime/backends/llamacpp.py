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
import logging
import math
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ...protocols.errors import BackendUnavailable
from ..draft import DEFAULT_TIE_MARGIN, MIN_BACKEND_PREFILL
from ..sequence import Sequence
from .base import missing_extra

if TYPE_CHECKING:
    import torch

    from ..loaded import Tokenizer

DEFAULT_N_CTX = 4096


class StateWriter(Protocol):
    """Writes a prompt's keys and values into a llama.cpp context's sequence state
    (`split_prefill.StatePrefill`, typed here by shape so the two modules do not import each
    other)."""

    def write(self, ctx, tokens: list[int]) -> None: ...

log = logging.getLogger("tandem.backends")

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
        n_ubatch: int | None = None,
        flash_attn: bool = True,
        prompt_batched: bool = False,
    ) -> None:
        """`n_ubatch` tokens are computed together (default `n_batch`); 1 computes every token
        as a decode step does, so rows do not depend on what else was in a batch. `flash_attn`
        is llama.cpp's own default on a CPU (llama-cpp-python turns it off): on the 0.5B drafter
        it prefills ~15% faster and decodes ~2% faster.

        `prompt_batched` is the split an exact target computes with (`split_points`): a
        sequence's prompt, all but its last token, in pieces of `n_batch` aligned at 0; every
        later token alone, as a decode step. Cloud mode, verification and the canonical
        recomputation then see the same rows, and the prompt costs a batched prefill."""
        llama_cpp = _llama_cpp()
        self.name = name
        self.source = str(path)
        self.tokenizer = tokenizer
        self.n_threads = n_threads or default_threads()
        self.n_batch = n_batch
        self.prompt_batched = prompt_batched
        if prompt_batched:
            n_ubatch = n_batch
        self.tie_margin = DEFAULT_TIE_MARGIN
        if not Path(path).is_file():
            raise BackendUnavailable(f"llama.cpp needs a GGUF file; nothing at {path}")
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or n_batch, n_threads=self.n_threads,
            n_threads_batch=self.n_threads, logits_all=False, verbose=False, flash_attn=flash_attn,
        )
        _open_models.add(self)
        # set by split_prefill.attach: prompts prefilled by another backend into this context
        self.state_prefill: StateWriter | None = None
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
        return LlamaCppEngine(self, tie_margin=self.tie_margin if tie_margin is None else tie_margin)

    def close(self) -> None:
        """Free llama.cpp's model and context (idempotent)."""
        self.llm.close()
        _open_models.discard(self)


def split_points(start: int, upto: int, batched_upto: int, n_batch: int) -> list[tuple[int, int]]:
    """The decode calls that compute tokens [start, upto) under the prompt-batched rule: below
    `batched_upto` (the prompt but its last token) in pieces that end at multiples of `n_batch`,
    from it on one token a call."""
    calls, lo = [], start
    while lo < min(upto, batched_upto):
        hi = min(upto, batched_upto, (lo // n_batch + 1) * n_batch)
        calls.append((lo, hi))
        lo = hi
    calls += [(p, p + 1) for p in range(max(lo, start), upto)]
    return calls


class LlamaCppEngine(Sequence):
    """The `DraftingEngine` interface over one llama.cpp context (sequence 0). Rows are views of
    llama.cpp's logits buffer, valid until the next decode (the base copies what it keeps)."""

    def __init__(self, model: LlamaCppModel, *, tie_margin: float) -> None:
        super().__init__(model, tie_margin=tie_margin)
        self._llama_cpp = _llama_cpp()
        self._ctx = model.llm.ctx
        self._mem = self._llama_cpp.llama_get_memory(self._ctx)
        self._llama_cpp.llama_memory_clear(self._mem, True)
        self.batched_upto: int | None = None  # prompt_batched: where the batched prompt ends

    def reset(self) -> None:
        super().reset()
        self.batched_upto = None

    def _crop(self, pos: int) -> bool:
        if pos == 0:
            self._llama_cpp.llama_memory_clear(self._mem, True)
            return True
        # a cache that cannot drop a suffix (recurrent models) is cleared and recomputed
        if self._llama_cpp.llama_memory_seq_rm(self._mem, 0, pos, -1):
            return True
        self._llama_cpp.llama_memory_clear(self._mem, True)
        return False

    def fresh_logits(self, prefix_len: int) -> "torch.Tensor":
        """The canonical recomputation, from a context emptied whatever it held (engines over one
        model share its context, so `cached` alone cannot say it is empty)."""
        self._crop(0)
        self.cached = 0
        return super().fresh_logits(prefix_len)

    def _forward(self, start: int, upto: int) -> np.ndarray:
        llama_cpp = self._llama_cpp
        if upto > self.lm.n_ctx:
            raise BackendUnavailable(f"sequence of {upto} tokens exceeds the llama.cpp context ({self.lm.n_ctx})")
        if start == 0 and upto - 1 >= MIN_BACKEND_PREFILL and self.lm.state_prefill is not None:
            start = self._prefill_elsewhere(upto - 1)
        if self.lm.prompt_batched:
            if self.batched_upto is None:
                self.batched_upto = max(0, upto - 1)  # the first forward is the prompt
            calls = split_points(start, upto, self.batched_upto, self.lm.n_batch)
        else:
            calls = [(lo, min(upto, lo + self.lm.n_batch)) for lo in range(start, upto, self.lm.n_batch)]
        for lo, hi in calls:
            n = hi - lo
            arr = (llama_cpp.llama_token * n)(*self.tokens[lo : lo + n])
            rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, n))
            if rc != 0:
                self._crop(lo)
                raise RuntimeError(f"llama_decode failed with code {rc}")
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.lm.n_vocab,))

    def _prefill_elsewhere(self, upto: int) -> int:
        """The prompt's first `upto` tokens on the model's other prefill backend; where llama.cpp
        goes on from (`upto`, or 0 when that backend failed: it is dropped with one warning)."""
        try:
            self.lm.state_prefill.write(self._ctx, self.tokens[:upto])
        except BackendUnavailable as exc:
            log.warning("%s: prompts prefill on llama.cpp itself from now on (%s)", self.lm.name, exc)
            self.lm.state_prefill = None
            self._crop(0)
            return 0
        return upto


def native_generate_rate(
    model: LlamaCppModel, prompt: list[int], n: int, decode_prompt: list[int] | None = None
) -> tuple[float, float]:
    """llama.cpp's own loop on a fresh context: (prompt tokens/s, generated tokens/s), greedy.

    Prefill is `Llama.eval` of `prompt` (its batched path); decode is `Llama.generate` after
    `decode_prompt` (default: the same prompt), timed from its first token to its n-th, so the
    prompt is not counted twice."""
    llm = model.llm
    llm.reset()
    _llama_cpp().llama_memory_clear(_llama_cpp().llama_get_memory(llm.ctx), True)
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t0)
    llm.reset()
    _llama_cpp().llama_memory_clear(_llama_cpp().llama_get_memory(llm.ctx), True)
    count, t1 = 0, 0.0
    for _tok in llm.generate(prompt if decode_prompt is None else decode_prompt, top_k=1, temp=0.0, reset=True):
        if count == 0:
            t1 = time.perf_counter()
        count += 1
        if count > n:
            break
    decode = n / (time.perf_counter() - t1) if count > n else math.nan
    return prefill, decode


def native_generate(model: LlamaCppModel, prompt: list[int], max_new_tokens: int, eos: list[int]) -> dict:
    """One greedy generation by llama.cpp's own loop on a fresh context (`Llama.generate`: the
    prompt in batches, then a token a step), stopped at `eos` or `max_new_tokens`: its tokens,
    the seconds to the first and in all."""
    llm = model.llm
    llm.reset()
    _llama_cpp().llama_memory_clear(_llama_cpp().llama_get_memory(llm.ctx), True)
    stop, out, first = set(eos), [], 0.0
    t0 = time.perf_counter()
    for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if not out:
            first = time.perf_counter() - t0
        out.append(int(tok))
        if tok in stop or len(out) >= max_new_tokens:
            break
    return {"tokens": out, "first_s": first, "total_s": time.perf_counter() - t0}


__all__ = ["LlamaCppModel", "LlamaCppEngine", "split_points", "native_generate", "native_generate_rate", "default_threads"]
