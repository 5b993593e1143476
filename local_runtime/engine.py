"""The torch engine: one transformers model, one sequence, a DynamicCache written by position.

The sequence bookkeeping (append, truncate, the near-tie rule, the draft loop) is the shared
`Sequence` base (sequence.py); this module adds the forward pass:

    compute(upto)          one forward pass over tokens[cached:upto]: a row of logits per token
                           (row j predicts the token after token j), or with last=True only the
                           final row (the output layer then runs on one position, not n)
    fresh_logits(n)        a cache-free forward of tokens[:n] (canonical, leaves the cache alone)

A prompt run from an empty cache may go to an accelerated prefill backend
(`local_runtime.backends`: fixed-shape int8 chunks), whose keys/values become the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from .draft import DEFAULT_TIE_MARGIN, MIN_BACKEND_PREFILL
from .invariant import chunks
from .sequence import Sequence

if TYPE_CHECKING:
    from .prefill import PrefillBackend


class TorchLM(Protocol):
    """What the engine runs (a `LoadedModel` is one): a transformers causal LM in eval mode, its
    tokenizer, and whether its logits are the same bits however a sequence is split."""

    model: Any
    tokenizer: Any

    @property
    def batch_invariant(self) -> bool: ...


class Engine(Sequence):
    def __init__(
        self, lm: TorchLM, *, tie_margin: float = DEFAULT_TIE_MARGIN, prefill_backend: "PrefillBackend | None" = None
    ) -> None:
        super().__init__(lm, tie_margin=tie_margin)
        # an accelerated prefill (local_runtime.backends) for a prompt run from an empty cache
        self.prefill_backend = prefill_backend
        self._cache = None

    # -- the cache ---------------------------------------------------------------------------------

    def kv_cache(self):
        if self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache()
        return self._cache

    def _crop(self, pos: int) -> bool:
        if pos == 0:
            self._cache = None
        else:
            # transformers 5: a negative argument is the number of positions to drop
            self._cache.crop(pos - self.cached)
        return True

    @torch.inference_mode()
    def _run(self, start: int, upto: int, last: bool, *, cache=None) -> torch.Tensor:
        """Forward tokens[start:upto] over `cache` (the engine's own by default); a
        batch-invariant model runs a long block as passes of at most MAX_ROWS tokens (the row
        counts its kernels were probed at), which give the same bits."""
        cache = self.kv_cache() if cache is None else cache
        pieces = chunks(start, upto) if self.lm.batch_invariant else [(start, upto)]
        device = self.lm.model.device
        rows = []
        for s, e in pieces:
            positions = torch.arange(s, e, device=device)
            out = self.lm.model(
                input_ids=torch.tensor([self.tokens[s:e]], device=device),
                cache=cache,
                use_cache=True,
                position_ids=positions[None],
                cache_position=positions,
                logits_to_keep=1 if last else 0,
            )
            rows.append(out.logits[0].float().cpu())  # decisions are made on the host
        return rows[-1] if last else torch.cat(rows)

    def _forward(self, start: int, upto: int) -> torch.Tensor:
        return self._run(start, upto, last=True)[-1]

    def compute(self, upto: int | None = None, *, last: bool = False) -> torch.Tensor:
        """Forward tokens[cached:upto] through the model; logits rows of shape (n, vocab), or
        with `last` only the final row, (1, vocab)."""
        upto = len(self.tokens) if upto is None else upto
        if upto <= self.cached:
            raise RuntimeError("nothing to compute: every token is already in the cache")
        rows = self._run(self.cached, upto, last)
        self.cached = upto
        self.forward_passes += 1
        return rows

    @torch.inference_mode()
    def fresh_logits(self, prefix_len: int) -> torch.Tensor:
        if self.lm.batch_invariant:  # its own passes, on a scratch cache
            from transformers import DynamicCache

            self.forward_passes += 1
            return self._run(0, prefix_len, last=True, cache=DynamicCache())[-1]
        ids = torch.tensor([self.tokens[:prefix_len]], device=self.lm.model.device)
        out = self.lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        self.forward_passes += 1
        return out.logits[0, -1].float().cpu()

    # -- an accelerated prompt prefill ----------------------------------------------------------------

    def _backend_prefills(self) -> bool:
        if self.prefill_backend is None or self.cached:
            return False
        return len(self.tokens) >= MIN_BACKEND_PREFILL

    def _next_row(self) -> torch.Tensor:
        if self._backend_prefills():
            result = self.prefill_backend.prefill(self.tokens)
            self._cache = result.to_cache()
            self.cached = len(self.tokens)
            self.forward_passes += 1
            return result.logits
        return super()._next_row()


__all__ = ["Engine"]
