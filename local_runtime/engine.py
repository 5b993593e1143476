"""The engine: one model, one sequence, a KV cache written by position.

`tokens` is the sequence; the cache holds keys/values for a prefix of it (`cached` tokens).
Appending tokens is free; `compute()` runs one forward pass over every token not yet cached and
returns a row of logits per token (row j predicts the token after token j). Rejecting drafts is
`truncate(pos)`: the sequence is cut and the cache cropped, never copied.

    prefill(prompt)        -> logits for the first new token
    step(token)            -> logits for the token after it
    draft(k, ...)          -> k tokens and the drafter's probability of each (plus, when
                              sampling, the sparse distribution each was drawn from)
    truncate(pos)          -> keep tokens[:pos]

Greedy decisions go through `greedy_token`, which handles near-ties explicitly: a block forward
pass and a one-token step compute the same logits in a different floating-point order, so when
the two best logits are closer than `tie_margin` the argmax is taken from a fresh, cache-free
forward of the exact prefix instead. That recomputation is a deterministic function of the
tokens alone, so the verifier (block passes) and the target decoding alone (one-token steps)
make the same choice even where their cached logits disagree in the last bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .sampling import DEFAULT_DRAFT_SUPPORT, logits_to_probs, sample_sparse, top2_margin, truncate_support

if TYPE_CHECKING:
    from .backends.base import PrefillBackend
    from .models import LoadedModel

# Logit gap under which a greedy choice is recomputed canonically. Block-vs-step differences
# measured on the bundled models are ~5e-5 (logits of magnitude ~30); this leaves two orders of magnitude of room.
DEFAULT_TIE_MARGIN = 5e-3


@dataclass
class Draft:
    tokens: list[int]
    probs: list[float]
    # under sampling: (ids, probs) of the distribution each token was drawn from
    dists: list[tuple[list[int], list[float]]] | None = None
    seconds: float = 0.0


class Engine:
    def __init__(
        self, lm: "LoadedModel", *, tie_margin: float = DEFAULT_TIE_MARGIN, prefill_backend: "PrefillBackend | None" = None
    ) -> None:
        self.lm = lm
        self.tie_margin = tie_margin
        # an accelerated prefill (local_runtime.backends) for a prompt run from an empty cache
        self.prefill_backend = prefill_backend
        self.tokens: list[int] = []
        self.cached = 0
        self.forward_passes = 0
        self.tie_recomputes = 0
        self._cache = None

    # -- the cache ---------------------------------------------------------------------------

    def reset(self) -> None:
        self.tokens, self.cached, self._cache = [], 0, None

    def append(self, tokens: list[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def truncate(self, pos: int) -> None:
        """Keep tokens[:pos]; cached keys/values past it are dropped by moving the position."""
        if pos < 0 or pos > len(self.tokens):
            raise ValueError(f"cannot truncate a sequence of {len(self.tokens)} tokens to {pos}")
        del self.tokens[pos:]
        self.truncate_cache(pos)

    @torch.inference_mode()
    def compute(self, upto: int | None = None, *, last: bool = False) -> torch.Tensor:
        """Forward tokens[cached:upto] through the model; logits rows of shape (n, vocab), or
        with `last` only the final row, (1, vocab): the output layer then runs on one position
        instead of n (a prompt's worth of rows over a large vocabulary is much of a prefill)."""
        upto = len(self.tokens) if upto is None else upto
        new = self.tokens[self.cached : upto]
        if not new:
            raise RuntimeError("nothing to compute: every token is already in the cache")
        if self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache()
        positions = torch.arange(self.cached, upto)
        out = self.lm.model(
            input_ids=torch.tensor([new]),
            cache=self._cache,
            use_cache=True,
            position_ids=positions[None],
            cache_position=positions,
            logits_to_keep=1 if last else 0,
        )
        self.cached = upto
        self.forward_passes += 1
        return out.logits[0].float()

    @torch.inference_mode()
    def fresh_logits(self, prefix_len: int) -> torch.Tensor:
        """Logits after tokens[:prefix_len] from a cache-free forward pass (canonical, slower)."""
        out = self.lm.model(input_ids=torch.tensor([self.tokens[:prefix_len]]), use_cache=False, logits_to_keep=1)
        self.forward_passes += 1
        return out.logits[0, -1].float()

    # -- decisions ---------------------------------------------------------------------------

    def greedy_token(self, logits: torch.Tensor, prefix_len: int) -> int:
        """argmax of `logits`, the row predicting position `prefix_len`, with near-ties resolved
        by a canonical recomputation (see the module docstring)."""
        if top2_margin(logits) >= self.tie_margin:
            return int(torch.argmax(logits))
        self.tie_recomputes += 1
        return int(torch.argmax(self.fresh_logits(prefix_len)))

    # -- the usual entry points ------------------------------------------------------------

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        self.reset()
        self.append(prompt)
        if self._backend_prefills():
            return self._backend_prefill()
        return self.compute(last=True)[-1]

    def _backend_prefills(self) -> bool:
        if self.prefill_backend is None or self.cached:
            return False
        from .backends import MIN_BACKEND_PREFILL

        return len(self.tokens) >= MIN_BACKEND_PREFILL

    def _backend_prefill(self) -> torch.Tensor:
        """Run the whole uncached sequence on the prefill backend; its keys/values become the cache."""
        result = self.prefill_backend.prefill(self.tokens)
        self._cache = result.to_cache()
        self.cached = len(self.tokens)
        self.forward_passes += 1
        return result.logits

    def step(self, token: int) -> torch.Tensor:
        self.append([token])
        return self.compute(last=True)[-1]

    def next_logits(self) -> torch.Tensor:
        """Logits for the position after the sequence, computing what is not cached yet.
        A fully cached sequence recomputes its last token (one position, cheap)."""
        if self._backend_prefills():
            return self._backend_prefill()
        if self.cached == len(self.tokens):
            self.truncate_cache(len(self.tokens) - 1)
        return self.compute(last=True)[-1]

    def truncate_cache(self, pos: int) -> None:
        """Drop cached keys/values from position `pos` on (the tokens stay, to be recomputed)."""
        if self.cached > pos:
            # transformers 5: a negative argument is the number of positions to drop
            self._cache.crop(pos - self.cached)
            self.cached = pos

    def draft(
        self,
        k: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        support: int = DEFAULT_DRAFT_SUPPORT,
    ) -> Draft:
        """Propose k tokens after the sequence. They are appended to `tokens` (the caller
        truncates back to what the target accepts); the last one is not yet computed."""
        import time

        t0 = time.perf_counter()
        out = Draft(tokens=[], probs=[], dists=[] if temperature > 0 else None)
        if k == 0:
            return out
        logits = self.next_logits()
        for i in range(k):
            if temperature > 0:
                ids, probs = truncate_support(logits_to_probs(logits, temperature, top_p), support)
                tok = sample_sparse(ids, probs, generator)
                q = float(probs[(ids == tok).nonzero()[0, 0]])
                out.dists.append((ids.tolist(), probs.tolist()))
            else:
                # a drafter's greedy choice need not be canonical: the target decides
                tok = int(torch.argmax(logits))
                q = float(torch.softmax(logits.double(), -1)[tok])
            out.tokens.append(tok)
            out.probs.append(q)
            self.append([tok])
            if i < k - 1:
                logits = self.compute(last=True)[-1]
        out.seconds = time.perf_counter() - t0
        return out


def generate_alone(
    lm: "LoadedModel",
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    tie_margin: float = DEFAULT_TIE_MARGIN,
    eos_token_ids: list[int] | None = None,
):
    """One model decoding by itself, one token per step: the reference speculative output is
    compared against, and the `local`/`cloud` modes. Yields token ids as they are chosen."""
    # a device model with an engine of its own (llama.cpp, MLC: local_runtime.backends) brings it
    engine = lm.new_engine(tie_margin=tie_margin) if hasattr(lm, "new_engine") else Engine(lm, tie_margin=tie_margin)
    eos = set(lm.tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = engine.prefill(prompt)
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = logits_to_probs(logits, temperature, top_p)
            tok = int(torch.multinomial(probs.float(), 1, generator=gen))
        else:
            tok = engine.greedy_token(logits, len(engine.tokens))
        yield tok
        if tok in eos:
            return
        logits = engine.step(tok)


__all__ = ["Engine", "Draft", "generate_alone", "DEFAULT_TIE_MARGIN"]
