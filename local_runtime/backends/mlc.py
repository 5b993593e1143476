"""`mlc`: MLC LLM's engine as a drafter, for users who have MLC installed.

MLC LLM's wheels are not on PyPI (the names there are placeholders); they come from MLC's own
package index and need a model compiled by `mlc_llm compile` (a weights folder plus a model
library). This adapter imports `mlc_llm` only when it is built, so tandem installs without it.

How it drafts: `MLCEngine.completions.create(prompt=<token ids>, max_tokens=k, temperature=0)`.
The engine keeps its KV cache in pages with prefix caching, so a request whose ids extend the
previous one's reuses the cached prefix: `truncate(pos)` only shortens the id list, and the next
request re-uses everything up to `pos`. The completion comes back as text, which is re-tokenised
with tandem's tokenizer (the same vocabulary): a proposal, which the target verifies as always,
so output stays lossless whatever the drafter proposes.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from ...protocols.errors import BackendUnavailable
from ..draft import Draft
from ..sequence import Sequence

if TYPE_CHECKING:
    from ..loaded import Tokenizer


def _mlc_llm():
    try:
        import mlc_llm  # noqa: PLC0415 - optional, not on PyPI
    except ImportError as exc:
        raise BackendUnavailable(
            "the mlc backend needs MLC LLM (package 'mlc_llm'), which is not on PyPI: install its wheel from "
            "MLC's own index (see the README) and compile the model with `mlc_llm compile`"
        ) from exc
    return mlc_llm


class MlcModel:
    """An MLC-compiled model (`model`: its folder, or an MLC model id) with tandem's tokenizer."""

    def __init__(self, name: str, tokenizer: "Tokenizer", *, model: str | None = None, model_lib: str | None = None,
                 device: str = "auto") -> None:
        mlc_llm = _mlc_llm()
        self.name = name
        self.tokenizer = tokenizer
        self.source = model or name
        self.engine = mlc_llm.MLCEngine(self.source, device=device, model_lib=model_lib, mode="local")

    def resident_bytes(self) -> int:
        return 0  # MLC does not report it; measure the process instead

    def new_engine(self, *, tie_margin: float | None = None) -> "MlcEngine":
        return MlcEngine(self)

    def close(self) -> None:
        self.engine.terminate()


class MlcEngine(Sequence):
    """The `DraftingEngine` interface over an MLC engine (greedy drafting). MLC keeps the cache
    (pages with prefix caching), so this side keeps only the token ids."""

    def __init__(self, model: MlcModel) -> None:
        super().__init__(model)

    def _crop(self, pos: int) -> bool:
        return True  # the next request re-uses MLC's cached prefix up to `pos`

    def _forward(self, start: int, upto: int) -> Any:
        raise BackendUnavailable("the mlc backend drafts greedily through MLC's engine and exposes no logits")

    def _complete(self, k: int) -> tuple[list[int], list[float]]:
        resp = self.lm.engine.completions.create(
            prompt=list(self.tokens), max_tokens=k, temperature=0.0, logprobs=True, model=self.lm.source
        )
        choice = resp.choices[0]
        ids = self.lm.tokenizer.encode(choice.text)[:k]
        logprobs = getattr(getattr(choice, "logprobs", None), "token_logprobs", None) or []
        probs = [math.exp(lp) if lp is not None else 1.0 for lp in logprobs][: len(ids)]
        return ids, probs + [1.0] * (len(ids) - len(probs))

    def draft(self, k: int, *, temperature: float = 0.0, top_p: float = 1.0, generator: Any = None,
              support: int | None = None, grammar: Any = None, max_len: int | None = None) -> Draft:
        if temperature > 0:
            raise BackendUnavailable("the mlc backend drafts greedily only (it exposes no draft distribution)")
        if grammar is not None:
            raise BackendUnavailable("the mlc backend exposes no logits to mask: structured output needs another drafter backend")
        t0 = time.perf_counter()
        ids, probs = self._complete(k) if k else ([], [])
        self.tokens.extend(ids)
        return Draft(tokens=ids, probs=probs, seconds=time.perf_counter() - t0)


__all__ = ["MlcModel", "MlcEngine"]
