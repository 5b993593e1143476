"""Target-model backends: what computes the target's distributions for the gateway.

The gateway's logic (sessions, the accept rule, limits, batching) is backend-free; a backend
gives it per-session sequence state and one operation, a forward pass over many sessions' pending
tokens at once:

    backend.new_engine()          -> per-session state: tokens, a cache, truncate(pos), greedy_token()
    backend.forward([engines])    -> for each, the logits rows of its uncached tokens
    backend.fill(engine, upto)    -> put a prompt into the cache (no logits wanted)

    TransformersBackend   in-process torch/transformers (CPU or one GPU): packed multi-session
                          forward passes with per-session KV caches (batching.py). The default.
    VllmBackend           vLLM on a GPU node: each verify is a prompt-logprobs request over the
                          session's whole sequence, and vLLM's own continuous batching and
                          automatic prefix caching make the shared prefix nearly free. Greedy
                          sessions only (vLLM returns top-k logprobs, not the full distribution
                          the lossless sampling rule needs). Imported lazily: `pip install vllm`
                          on a CUDA machine. No GPU was available where this was written, so it is
                          exercised against a stand-in of vLLM's API in the tests, not benchmarked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..local_runtime.draft import DEFAULT_TIE_MARGIN
from ..local_runtime.models import LoadedModel, load_model
from ..local_runtime.sequence import Sequence
from ..protocols.errors import ModelLoadError
from .batching import SessionEngine, forward_packed, install


class TargetBackend(ABC):
    lm: Any  # .name, .tokenizer (local_runtime.models.Tokenizer), .vocab_size
    batched: bool = False  # whether forward() packs several sessions into one pass
    supports_sampling: bool = True

    @property
    def name(self) -> str:
        return self.lm.name

    @abstractmethod
    def new_engine(self, tie_margin: float = DEFAULT_TIE_MARGIN) -> Any: ...

    @abstractmethod
    def forward(self, engines: list) -> list[torch.Tensor]: ...

    def fill(self, engine, upto: int) -> None:
        self.forward_one(engine, upto)

    def forward_one(self, engine, upto: int | None = None) -> torch.Tensor:
        return engine.compute(upto)


class TransformersBackend(TargetBackend):
    """The target model in this process (transformers), batched by packing (see batching.py)."""

    def __init__(self, model: str | LoadedModel, *, batching: bool = True) -> None:
        self.lm = model if isinstance(model, LoadedModel) else load_model(model)
        self.batched = batching and install(self.lm.model)

    def new_engine(self, tie_margin: float = DEFAULT_TIE_MARGIN) -> SessionEngine:
        return SessionEngine(self.lm, tie_margin=tie_margin)

    def forward(self, engines: list[SessionEngine]) -> list[torch.Tensor]:
        if len(engines) == 1 or not self.batched:
            return [e.compute() for e in engines]
        return forward_packed(self.lm.model, engines)

    def fill(self, engine: SessionEngine, upto: int) -> None:
        engine.fill_cache(upto)


# ---------------------------------------------------------------------------------------------
# vLLM


class VllmSequence(Sequence):
    """A session's state under vLLM: the tokens only (vLLM's prefix cache holds the keys and
    values; `cached` counts the tokens whose distributions were already returned)."""

    def _forward(self, start: int, upto: int) -> torch.Tensor:
        raise RuntimeError("a vLLM sequence is computed by VllmBackend.forward, in batches")

    def _crop(self, pos: int) -> bool:
        return True  # vLLM re-uses its cached prefix up to `pos` on the next request

    def pending(self) -> list[int]:
        return self.tokens[self.cached :]

    def greedy_token(self, logits: torch.Tensor, prefix_len: int) -> int:
        # vLLM's logits define the target here; there is no second code path to agree with
        return int(torch.argmax(logits))


class VllmBackend(TargetBackend):
    supports_sampling = False
    batched = True

    def __init__(self, model: str, *, tokenizer_of: str | None = None, logprobs: int = 2, **engine_args: Any) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                "the vLLM backend needs the `vllm` package and a CUDA GPU: pip install vllm "
                f"(or use backend: transformers) ({exc})"
            ) from exc
        from vllm import LLM

        from ..local_runtime.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_of or model, progress=False)
        self.llm = LLM(model=model, enable_prefix_caching=True, **engine_args)
        vocab = max(tokenizer.vocab.values()) + 1
        self.lm = _VllmModelInfo(model, tokenizer, vocab)
        self.logprobs = logprobs

    def new_engine(self, tie_margin: float = DEFAULT_TIE_MARGIN) -> VllmSequence:
        return VllmSequence(self.lm)

    def fill(self, engine: VllmSequence, upto: int) -> None:
        engine.cached = upto  # nothing to do: vLLM prefills (and caches) the prefix on first use

    def forward_one(self, engine, upto: int | None = None) -> torch.Tensor:
        return self.forward([engine])[0]

    def forward(self, engines: list[VllmSequence]) -> list[torch.Tensor]:
        """One vLLM call for the batch: each sequence as a prompt with prompt logprobs, one token
        generated. Row j of a sequence is the distribution after its token `cached + j`: prompt
        logprobs at position p + 1 for p inside the prompt, the generated step's for the last."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.logprobs, prompt_logprobs=self.logprobs, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(e.tokens)) for e in engines], params, use_tqdm=False)
        rows = []
        for e, out in zip(engines, outputs):
            n = len(e.tokens)
            dists = [out.prompt_logprobs[p + 1] for p in range(e.cached, n - 1)]
            dists.append(out.outputs[0].logprobs[0])
            block = torch.full((len(dists), self.lm.vocab_size), float("-inf"))
            for j, d in enumerate(dists):
                for tok, lp in (d or {}).items():
                    if 0 <= tok < block.shape[1]:
                        block[j, tok] = float(getattr(lp, "logprob", lp))
            rows.append(block)
            e.cached = n
            e.forward_passes += 1
        return rows


class _VllmModelInfo:
    def __init__(self, name: str, tokenizer: Any, vocab_size: int) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.model = None


BACKENDS = {"transformers": TransformersBackend, "vllm": VllmBackend}


def make_backend(kind: str, model: str | LoadedModel, *, batching: bool = True) -> TargetBackend:
    if kind == "transformers":
        return TransformersBackend(model, batching=batching)
    if kind == "vllm":
        if not isinstance(model, str):
            raise ValueError("the vLLM backend takes a model name or path")
        return VllmBackend(model)
    raise ValueError(f"unknown backend '{kind}' (known: {', '.join(BACKENDS)})")


__all__ = ["TargetBackend", "TransformersBackend", "VllmBackend", "VllmSequence", "make_backend", "BACKENDS"]
