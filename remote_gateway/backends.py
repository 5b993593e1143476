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

from typing import Any

import torch

from ..local_runtime.grammar import apply_mask
from ..local_runtime.invariant import MAX_ROWS, make_batch_invariant
from ..local_runtime.models import LoadedModel, load_model
from ..local_runtime.sequence import Sequence
from ..protocols.errors import ModelLoadError
from .batching import SessionEngine, forward_packed, install, token_groups
from .target import TargetBackend


class TransformersBackend(TargetBackend):
    """The target model in this process (transformers), batched by packing (see batching.py)."""

    def __init__(self, model: str | LoadedModel, *, batching: bool = True, device: str = "cpu",
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.lm = model if isinstance(model, LoadedModel) else load_model(model)
        if device != "cpu":
            self.lm = on_device(self.lm, device)
        self.batched = batching and install(self.lm.model)

    def new_engine(self, tie_margin: float | None = None) -> SessionEngine:
        return SessionEngine(self.lm, tie_margin=self.lm.tie_margin if tie_margin is None else tie_margin)

    def forward(self, engines: list[SessionEngine]) -> list[torch.Tensor]:
        if len(engines) == 1 or not self.batched:
            return [e.compute() for e in engines]
        if not self.lm.batch_invariant:
            return forward_packed(self.lm.model, engines)
        rows = []  # packed passes of at most the row count the kernels were probed at
        for group in token_groups(engines, MAX_ROWS):
            rows += forward_packed(self.lm.model, group) if len(group) > 1 else [group[0].compute()]
        return rows

    def fill(self, engine: SessionEngine, upto: int) -> None:
        engine.fill_cache(upto)

    def kv_bytes_per_token(self) -> int:
        cfg = self.lm.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        element = next(self.lm.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * element


def on_device(lm: LoadedModel, device: str) -> LoadedModel:
    """The model moved to `device` ("cuda", "cuda:1"); refused clearly where there is none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for, but this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use device: cpu")
    if not device.startswith(("cuda", "cpu")):
        raise ModelLoadError(f"unknown device '{device}' (cpu, cuda, cuda:N)")
    invariant = lm.batch_invariant
    moved = LoadedModel(name=lm.name, model=lm.model.to(device), tokenizer=lm.tokenizer, source=lm.source)
    if invariant:
        make_batch_invariant(moved.model)  # probed again on the new device's kernels
    return moved


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

    def greedy_token(self, logits: torch.Tensor, prefix_len: int, allowed=None) -> int:
        # vLLM's logits define the target here; there is no second code path to agree with
        return int(torch.argmax(logits if allowed is None else apply_mask(logits, allowed)))


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

    def new_engine(self, tie_margin: float | None = None) -> VllmSequence:
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


BACKENDS = ("transformers", "llama.cpp", "vllm")


def split_target(model: str) -> tuple[str, str | None]:
    """`NAME@llama.cpp` -> ("NAME", "llama.cpp"); a name without a backend suffix -> (name, None)."""
    base, at, suffix = model.rpartition("@")
    if at and suffix in ("llama.cpp", "llamacpp", "transformers", "torch", "vllm"):
        return base, {"llamacpp": "llama.cpp", "torch": "transformers"}.get(suffix, suffix)
    return model, None


def make_backend(
    kind: str | None,
    model: str | LoadedModel,
    *,
    batching: bool = True,
    device: str = "cpu",
    threads: int | None = None,
    max_sessions: int = 64,
    prompt_batch: int = 512,
) -> TargetBackend:
    """The backend that runs `model`: `kind`, or the one its name asks for (`NAME@llama.cpp`;
    `NAME@auto`: the one choice.py picks for this machine, kept as `backend.choice`), else
    transformers. `device` (transformers): "cpu" or "cuda"; `threads`: CPU threads;
    `prompt_batch` (llama.cpp): the prompt tokens computed together."""
    choice = None
    if isinstance(model, str):
        from .choice import resolve_target

        model, choice = resolve_target(model)  # NAME@auto: the fastest exact target here
        model, suffix = split_target(model)
        if suffix is not None and kind not in (None, suffix):
            raise ValueError(f"model '{model}@{suffix}' names backend '{suffix}' but the config says '{kind}'")
        kind = kind if kind is not None else suffix
    kind = kind or "transformers"
    backend = _make(kind, model, batching=batching, device=device, threads=threads, max_sessions=max_sessions,
                    prompt_batch=prompt_batch)
    backend.choice = choice
    return backend


def _make(kind: str, model: str | LoadedModel, *, batching: bool, device: str, threads: int | None,
          max_sessions: int, prompt_batch: int) -> TargetBackend:
    if kind == "transformers":
        return TransformersBackend(model, batching=batching, device=device, threads=threads)
    if device != "cpu":
        raise ValueError(f"device '{device}' needs backend transformers (llama.cpp here runs on the CPU)")
    if not isinstance(model, str):
        raise ValueError(f"the {kind} backend takes a model name or path")
    if kind == "llama.cpp":
        from .llamacpp_target import LlamaCppTarget

        return LlamaCppTarget(model, n_threads=threads, max_sessions=min(max_sessions, 32), n_batch=prompt_batch)
    if kind == "vllm":
        return VllmBackend(model)
    raise ValueError(f"unknown backend '{kind}' (known: {', '.join(BACKENDS)})")


__all__ = ["TargetBackend", "TransformersBackend", "VllmBackend", "VllmSequence", "make_backend", "split_target", "BACKENDS"]
