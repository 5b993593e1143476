"""What one generation is asked to do, and the device model it runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ...local_runtime.loaded import render_chat
from ...protocols.messages import ChatMessage, Constraint, OpenSession, SamplingParams


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
    messages: tuple[dict, ...] | None = None  # a conversation instead of one prompt (then `prompt` is its last user turn)
    tools: tuple[dict, ...] | None = None  # {name, description, parameters}: rendered into the prompt by the chat template
    constraint: Constraint | None = None  # structured output: every token follows this grammar

    def prompt_ids(self, tok: Any) -> list[int]:
        """The prompt as this tokenizer's ids: one user turn, or the conversation, with the tools."""
        if self.messages is None and not self.tools:
            return tok.prompt_tokens(self.prompt, self.chat)
        return render_chat(tok, self.chat_messages(), list(self.tools) if self.tools else None)

    def chat_messages(self) -> list[dict]:
        return [dict(m) for m in self.messages] if self.messages is not None else [{"role": "user", "content": self.prompt}]

    def gateway_prompt(self) -> dict:
        """The prompt as the gateway renders it: chat messages (its own template, with the tools)
        or raw text."""
        if self.chat or self.messages is not None:
            return dict(messages=[ChatMessage(**m) for m in self.chat_messages()], tools=list(self.tools) if self.tools else None)
        return dict(prompt_text=self.prompt)

    def grammar(self, device: "DeviceModel"):
        """The device's own copy of the constraint's grammar (None without one)."""
        if self.constraint is None:
            return None
        from ...local_runtime.grammar import compile_constraint

        return compile_constraint(self.constraint, device.tokenizer, device.model.vocab_size)

    def open_text(self, resume_text: str, remaining: int) -> OpenSession:
        """A text-space session: the prompt as chat messages (or raw text) the gateway renders
        with its own template, continuing after `resume_text`."""
        return OpenSession(
            **self.gateway_prompt(), resume_text=resume_text or None, constraint=self.constraint,
            sampling=self.sampling, max_new_tokens=max(1, remaining), model=self.target,
        )

    def open_tokens(self, prompt: list[int], generated: list[int], fingerprint: str, remaining: int) -> OpenSession:
        """A token-space session over the prompt plus everything generated so far. Under a
        constraint the generated tokens go as `resume_tokens`, so the gateway's grammar starts
        after them; otherwise they are simply part of the prompt."""
        if self.constraint is not None and generated:
            return OpenSession(
                prompt_tokens=prompt, resume_tokens=generated, tokenizer_fingerprint=fingerprint, sampling=self.sampling,
                max_new_tokens=len(generated) + max(1, remaining), model=self.target, constraint=self.constraint,
            )
        return OpenSession(
            prompt_tokens=prompt + generated, tokenizer_fingerprint=fingerprint, sampling=self.sampling,
            max_new_tokens=max(1, remaining), model=self.target, constraint=self.constraint,
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
