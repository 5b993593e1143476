"""One token sequence and the cache of a prefix of it: the base every engine extends.

`tokens` is the sequence; the engine's cache (a transformers DynamicCache, llama.cpp's KV memory,
a static tensor, vLLM's prefix cache...) holds keys/values for the first `cached` of them.
Appending is free; whatever is not cached yet is computed on the next `next_logits`, `step` or
`draft`. Rejecting drafts is `truncate(pos)`: the sequence is cut and the cache cropped by moving
a position, never copied. An engine supplies only two things:

    _forward(start, upto)   evaluate tokens[start:upto] over a cache holding tokens[:start];
                            return the logits row after token upto - 1 (a 1-D tensor or array)
    _crop(pos)              drop cached keys/values from position `pos` on (False: cannot, clear)

and may override `fresh_logits` (the canonical recomputation) where it has a cheaper one.

Near ties. A block forward pass and a one-token step compute the same logits in a different
floating-point order, so when the two best logits are closer than `tie_margin`, `greedy_token`
takes the argmax of `fresh_logits`: the logits after the exact prefix recomputed in one block from
an empty cache, a deterministic function of the tokens alone. The verifier (block passes) and
the target decoding alone (one-token steps) then make the same choice even where their cached
logits disagree in the last bits.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .draft import DEFAULT_DRAFT_SUPPORT, DEFAULT_TIE_MARGIN, Draft
from .grammar import GrammarState, apply_mask
from .sampling import logits_to_probs, sample_sparse, top2_margin, truncate_support


def _as_tensor(row: Any) -> torch.Tensor:
    """A logits row as a float tensor that owns its memory (engine buffers are reused)."""
    if isinstance(row, torch.Tensor):
        return row.float()
    return torch.from_numpy(np.array(row, dtype=np.float32, copy=True))


def greedy_pick(row: Any) -> tuple[int, float]:
    """argmax of a logits row and its softmax probability q = 1 / sum(exp(l - l_max)) (the max
    term is subtracted, so nothing overflows)."""
    r = row.detach().numpy() if isinstance(row, torch.Tensor) else np.asarray(row)
    tok = int(r.argmax())
    # exp in the row's own precision (every term is <= 1), summed in float64: half the time of a
    # float64 copy of a 150k-token row, and q agrees to ~1e-7
    return tok, 1.0 / float(np.exp(r - r[tok]).sum(dtype=np.float64))


class Sequence(ABC):
    def __init__(self, lm: Any, *, tie_margin: float = DEFAULT_TIE_MARGIN) -> None:
        self.lm = lm
        self.tie_margin = tie_margin
        self.tokens: list[int] = []
        self.cached = 0
        self.forward_passes = 0
        self.tie_recomputes = 0

    # -- what an engine implements -------------------------------------------------------------

    @abstractmethod
    def _forward(self, start: int, upto: int) -> Any:
        """Evaluate tokens[start:upto] into the cache; the logits row after token upto - 1."""

    @abstractmethod
    def _crop(self, pos: int) -> bool:
        """Drop cached keys/values from `pos` on; False if this cache cannot (then it is cleared)."""

    # -- the sequence and its cache ----------------------------------------------------------------

    def reset(self) -> None:
        self.tokens = []
        self.truncate_cache(0)

    def release(self) -> None:
        """The sequence is over: free what it holds (engines sharing a pool give its slot back)."""
        self.reset()

    def append(self, tokens: list[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def truncate(self, pos: int) -> None:
        """Keep tokens[:pos]; cached keys/values past it are dropped by moving the position."""
        if pos < 0 or pos > len(self.tokens):
            raise ValueError(f"cannot truncate a sequence of {len(self.tokens)} tokens to {pos}")
        del self.tokens[pos:]
        self.truncate_cache(pos)

    def truncate_cache(self, pos: int) -> None:
        """Drop cached keys/values from position `pos` on (the tokens stay, to be recomputed)."""
        if self.cached > pos:
            self.cached = pos if self._crop(pos) else 0

    def _evaluate(self, upto: int) -> Any:
        row = self._forward(self.cached, upto)
        self.cached = upto
        self.forward_passes += 1
        return row

    def _next_row(self) -> Any:
        """The row after the whole sequence; a fully cached sequence recomputes its last token."""
        if not self.tokens:
            raise RuntimeError("nothing to compute: the sequence is empty")
        if self.cached == len(self.tokens):
            self.truncate_cache(len(self.tokens) - 1)
        return self._evaluate(len(self.tokens))

    # -- the usual entry points ----------------------------------------------------------------------

    def next_logits(self) -> torch.Tensor:
        """Logits for the position after the sequence, computing what is not cached yet."""
        return _as_tensor(self._next_row())

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        self.reset()
        self.append(prompt)
        return self.next_logits()

    def step(self, token: int) -> torch.Tensor:
        self.append([token])
        return self.next_logits()

    def fresh_logits(self, prefix_len: int) -> torch.Tensor:
        """Logits after tokens[:prefix_len] recomputed in one block from an empty cache (canonical)."""
        self.truncate_cache(0)
        return _as_tensor(self._evaluate(prefix_len))

    def greedy_token(self, logits: torch.Tensor, prefix_len: int, allowed: np.ndarray | None = None) -> int:
        """argmax of `logits`, the row predicting position `prefix_len`, with near-ties resolved
        by the canonical recomputation (see the module docstring); over the tokens a grammar
        admits when `allowed` is given (grammar.py)."""
        if allowed is not None:
            logits = apply_mask(logits, allowed)
        if top2_margin(logits) >= self.tie_margin:
            return int(torch.argmax(logits))
        self.tie_recomputes += 1
        fresh = self.fresh_logits(prefix_len)
        return int(torch.argmax(fresh if allowed is None else apply_mask(fresh, allowed)))

    def draft(
        self,
        k: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        support: int = DEFAULT_DRAFT_SUPPORT,
        grammar: GrammarState | None = None,
        max_len: int | None = None,
    ) -> Draft:
        """Propose k tokens after the sequence. They are appended to `tokens` (the caller
        truncates back to what the target accepts); the last one is not yet computed. A drafter's
        greedy choice need not be canonical: the target decides.

        Under a `grammar` (already in line with the tokens generated so far; it advances over
        the drafts, and the caller syncs it back) the drafter's logits are masked, and a token the
        grammar forces is drafted without running the model: the only token it admits (always
        accepted), or the first of the bytes it forces (its fast-forward, a guess with q = 1).
        Such drafts do not count towards k, and a draft goes on through what the grammar forces
        after the k-th, up to `max_len` drafts in all; the model evaluates them together with the
        next token it drafts itself."""
        t0 = time.perf_counter()
        out = Draft.empty(sampled=temperature > 0)
        limit = k if max_len is None or grammar is None else max(k, max_len)
        row, drafted = None, 0
        while len(out) < limit and (drafted < k or grammar is not None):
            mask = grammar.mask() if grammar is not None else None
            if mask is not None and not mask.allowed.any():
                break  # the grammar is complete: nothing can follow
            guess = None if mask is None else mask.only if mask.only is not None else grammar.fast_forward()
            if guess is None and drafted >= k:
                break  # k drafts of the model's own, and the grammar forces nothing more
            if guess is not None:  # forced by the grammar: no model run (a fast-forward guess may still be rejected)
                tok, q = guess, 1.0
                if temperature > 0:
                    out.dists.append(([tok], [1.0]))
                out.forced.append(True)
            else:
                if row is None or len(self.tokens) > self.cached:
                    row = self._next_row() if not out.tokens else self._evaluate(len(self.tokens))
                logits = _as_tensor(row) if mask is None else apply_mask(row, mask.allowed)
                if temperature > 0:
                    ids, probs = truncate_support(logits_to_probs(logits, temperature, top_p), support)
                    tok = sample_sparse(ids, probs, generator)
                    q = float(probs[(ids == tok).nonzero()[0, 0]])
                    out.dists.append((ids.tolist(), probs.tolist()))
                else:
                    tok, q = greedy_pick(logits)
                drafted += 1
                out.forced.append(False)
            out.tokens.append(tok)
            out.probs.append(q)
            self.tokens.append(tok)
            if grammar is not None:
                grammar.sync(grammar.tokens + [tok])
        out.seconds = time.perf_counter() - t0
        return out


def generate_alone(
    lm: Any,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    tie_margin: float | None = None,
    eos_token_ids: list[int] | None = None,
    grammar: GrammarState | None = None,
) -> Iterator[int]:
    """One model decoding by itself, one token per step: the reference speculative output is
    compared against, and the `local`/`cloud` modes. Yields token ids as they are chosen. Every
    model brings its own engine (`new_engine`: torch, llama.cpp, the lean int8 loop, ...).
    Under a `grammar` (at its start) the logits are masked; a forced token skips the model, and
    the generation ends where the grammar admits nothing more."""
    engine = lm.new_engine(tie_margin=tie_margin)
    eos = set(lm.tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    engine.reset()
    engine.append(prompt)
    for _ in range(max_new_tokens):
        mask = grammar.mask() if grammar is not None else None
        if mask is not None and not mask.allowed.any():
            return
        if mask is not None and mask.only is not None:
            tok = mask.only
        elif temperature > 0:
            logits = engine.next_logits()
            probs = logits_to_probs(logits if mask is None else apply_mask(logits, mask.allowed), temperature, top_p)
            tok = int(torch.multinomial(probs.float(), 1, generator=gen))
        else:
            tok = engine.greedy_token(engine.next_logits(), len(engine.tokens), None if mask is None else mask.allowed)
        yield tok
        if tok in eos:
            return
        engine.append([tok])
        if grammar is not None:
            grammar.sync(grammar.tokens + [tok])


__all__ = ["Sequence", "generate_alone", "greedy_pick", "Draft", "DEFAULT_TIE_MARGIN"]
