"""What a loaded model is: its torch module, its tokenizer (the few things tandem needs of one),
and the fingerprint that says whether two tokenizers mean the same ids. models.py loads these,
tiny.py builds test ones. Nothing here imports a loader or an engine at import time: a model's
own engine (engine.py, which names no model type, only the `TorchLM` shape it runs) is imported
when one is made, so the arrows point one way."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Tokenizer:
    """The few things tandem needs from a tokenizer, over a Hugging Face tokenizer or our own."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    vocab: dict[str, int]
    eos_token_ids: list[int]
    chat: Callable[..., list[int]] | None = None  # (messages, tools=None) -> prompt ids, the model's chat template
    bos_token_id: int | None = None
    special_ids: frozenset[int] = frozenset()  # control tokens: never part of generated text
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = tokenizer_fingerprint(self.vocab, self.eos_token_ids, self.bos_token_id)
        self.special_ids = frozenset(self.special_ids) | set(self.eos_token_ids)

    @property
    def eot_token_id(self) -> int:
        """The token that ends an answer: the chat turn's end marker where there is one."""
        return self.eos_token_ids[-1] if self._eot is None else self._eot

    _eot: int | None = None

    def text(self, ids: Sequence[int]) -> str:
        """The text of generated ids, control tokens left out."""
        return self.decode([i for i in ids if i not in self.special_ids])

    def prompt_tokens(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids for a user prompt: through the chat template when there is one."""
        if chat and self.chat is not None:
            return self.chat([{"role": "user", "content": prompt}])
        ids = self.encode(prompt)
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids


def hf_messages(messages: list[dict]) -> list[dict]:
    """Chat messages in the shape Hugging Face chat templates read: an assistant turn's calls as
    {"type": "function", "function": {"name", "arguments": {...}}} (arguments as an object, which
    the template writes out as JSON), tool results as role "tool"."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function", c)
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        pass  # the template writes what it was given
                calls.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
            m["tool_calls"] = calls
        out.append(m)
    return out


def render_chat(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """A conversation (and the tools it may call) as prompt ids: the chat template when the model
    has one, else the turns' text joined by blank lines (tools then cannot be offered)."""
    if tok.chat is not None:
        return tok.chat(messages, tools) if tools else tok.chat(messages)
    if tools:
        raise ValueError("tools need a model with a chat template, which renders them into the prompt")
    return tok.prompt_tokens("\n\n".join(m["content"] for m in messages), chat=False)


def tokenizer_fingerprint(vocab: dict[str, int], eos: Sequence[int], bos: int | None) -> str:
    """A short hash that is equal exactly when two tokenizers map the same strings to the same ids."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(json.dumps({"eos": sorted(eos), "bos": bos}).encode())
    return h.hexdigest()[:24]


@dataclass
class LoadedModel:
    name: str
    model: Any  # a transformers PreTrainedModel (torch), kept in eval mode
    tokenizer: Tokenizer
    source: str

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def batch_invariant(self) -> bool:
        """Whether its logits are the same bits however a sequence is split into passes
        (invariant.py); such a model needs no near-tie rule."""
        from .invariant import is_batch_invariant

        return is_batch_invariant(self.model)

    @property
    def tie_margin(self) -> float:
        """The near-tie margin for this model's arithmetic (draft.py): 0 for a batch-invariant one."""
        from .draft import BF16_TIE_MARGIN, DEFAULT_TIE_MARGIN

        if self.batch_invariant:
            return 0.0
        dtype = next(self.model.parameters()).dtype
        return DEFAULT_TIE_MARGIN if dtype.itemsize >= 4 else BF16_TIE_MARGIN

    def new_engine(self, *, tie_margin: float | None = None):
        """A fresh torch `Engine` (one sequence) over this model."""
        from .engine import Engine

        return Engine(self, tie_margin=self.tie_margin if tie_margin is None else tie_margin)

    def param_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


__all__ = ["LoadedModel", "Tokenizer", "tokenizer_fingerprint", "render_chat", "hf_messages"]
