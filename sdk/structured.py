"""What a generation asks of its output's structure, from the arguments an app passes, and what
it finds in the output afterwards (the tool calls, the parsed answer).

    Structure.of(prompt, tools, tool_choice, parallel, response_format)
        -> the prompt (or conversation), the tools to render, the Constraint every mode follows
    Structure.finish(record)
        -> record.tool_calls / content (with tools), record.parsed / parse_error (with a JSON format)

The grammar itself (compiling, masks, the tool-call envelope) is local_runtime/grammar.py's.
An output that does not parse or validate never raises: it is returned as data, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..local_runtime.constraints import constraint_for, parse_tool_calls, plain_tools, schema_of
from ..protocols.messages import Constraint
from .usage import GenerationRecord

# a request with tools or a schema says so to the policy, whose rules may act on it
STRUCTURED_TAG = "structured"
TOOLS_TAG = "tools"
# a request so tagged never leaves the device: the client runs it in local mode, whatever else says
LOCAL_ONLY_TAG = "local_only"


@dataclass(frozen=True)
class Structure:
    prompt: str
    messages: tuple[dict, ...] | None
    tools: tuple[dict, ...] | None
    tool_choice: Any
    response_format: Any
    constraint: Constraint | None

    @classmethod
    def of(cls, prompt: str | list[dict], tools: list | None, tool_choice: Any, parallel: bool,
           response_format: Any, constraint: Constraint | None = None) -> "Structure":
        messages = None
        if not isinstance(prompt, str):
            messages = tuple(_message(m, i) for i, m in enumerate(prompt))
            if not messages:
                raise ValueError("a conversation needs at least one message")
            prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        plain = plain_tools(tools)
        asked = constraint_for(tools=plain, tool_choice=tool_choice, response_format=response_format,
                               parallel_tool_calls=parallel)
        if constraint is not None and asked is not None:
            raise ValueError("give a constraint, or tools/response_format that make one, not both")
        constraint = constraint or asked
        return cls(prompt, messages, tuple(plain) if plain else None, tool_choice, response_format, constraint)

    @property
    def tags(self) -> frozenset[str]:
        return frozenset({TOOLS_TAG} if self.tools else set()) | frozenset({STRUCTURED_TAG} if self.constraint else set())

    def finish(self, rec: GenerationRecord) -> None:
        """Read the output: tool calls (with tools), the parsed answer (with a JSON format)."""
        if self.tools and self.tool_choice != "none":
            content, rec.tool_calls = parse_tool_calls(rec.text, names=[t["name"] for t in self.tools])
            rec.content = content if rec.tool_calls else rec.text
        kind, _ = schema_of(self.response_format)
        if kind == "text":
            return
        try:
            if isinstance(self.response_format, type):
                rec.parsed = self.response_format.model_validate_json(rec.text)
            else:
                rec.parsed = json.loads(rec.text)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            rec.parse_error = f"{type(exc).__name__}: {exc}"
            if rec.finish_reason == "length":
                rec.parse_error += " (the answer was cut at max_new_tokens)"


def _message(m: Any, i: int) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
        raise ValueError(f"messages[{i}]: a message is {{'role': system|user|assistant|tool, 'content': ...}}")
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [_call(c) for c in m["tool_calls"]]
    return out


def _call(c: Any) -> dict:
    """A call as the protocol carries it ({name, arguments}), from ours, OpenAI's or a ToolCall."""
    if hasattr(c, "name") and hasattr(c, "arguments"):
        return {"name": c.name, "arguments": c.arguments}
    fn = c.get("function", c)
    return {"name": fn["name"], "arguments": fn.get("arguments", {})}


__all__ = ["Structure", "STRUCTURED_TAG", "TOOLS_TAG", "LOCAL_ONLY_TAG"]
