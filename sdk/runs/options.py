"""What one generation is asked to do, and the device model it runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ...protocols.messages import ChatMessage, OpenSession, SamplingParams


@dataclass(frozen=True)
class RunOptions:
    """One generation's parameters. `draft_len` is a fixed k or "auto" (from the link
    estimate, up to `max_draft_len`); `pipeline` drafts the next block while a verify is in
    flight; `fallback="local"` lets the device go on alone when the gateway is away, trying to
    rejoin every `rejoin_every` tokens; `token_router`/`assist_threshold` steer `assist` mode."""

    prompt: str
    chat: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    target: str | None = None  # the gateway's model, when it serves several (None: its default)
    draft_len: int | Literal["auto"] = "auto"
    max_draft_len: int = 16
    pipeline: bool = False
    fallback: Literal["local", "error"] = "local"
    rejoin_every: int = 16
    token_router: str = "confidence"
    assist_threshold: float = 0.5

    def open_text(self, resume_text: str, remaining: int) -> OpenSession:
        """A text-space session: the prompt as chat messages (or raw text) the gateway renders
        with its own template, continuing after `resume_text`."""
        return OpenSession(
            messages=[ChatMessage(role="user", content=self.prompt)] if self.chat else None,
            prompt_text=None if self.chat else self.prompt,
            resume_text=resume_text or None,
            sampling=self.sampling, max_new_tokens=max(1, remaining), model=self.target,
        )

    def open_tokens(self, tokens: list[int], fingerprint: str, remaining: int) -> OpenSession:
        """A token-space session over `tokens` (the prompt plus everything generated so far)."""
        return OpenSession(
            prompt_tokens=tokens, tokenizer_fingerprint=fingerprint, sampling=self.sampling,
            max_new_tokens=max(1, remaining), model=self.target,
        )


@dataclass
class DeviceModel:
    """The device's model on its drafting backend: `model` is what `load_drafter` returned (a
    LoadedModel, or a backend's own model object); each run takes a fresh engine (one sequence)."""

    model: Any
    backend: str | None = None

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def name(self) -> str:
        return self.model.name

    def new_engine(self):
        from ...local_runtime.backends import drafter_engine

        return drafter_engine(self.model, self.backend)


__all__ = ["RunOptions", "DeviceModel"]
