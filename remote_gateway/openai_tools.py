"""Tool calls and structured output on the OpenAI-compatible route, in OpenAI's shapes.

    request   tools, tool_choice, parallel_tool_calls, response_format  -> a Constraint (grammar.py)
              assistant messages with tool_calls, role "tool" messages   -> the chat template's turns
    response  the model's `<tool_call>` envelope -> message.tool_calls [{id, type, function: {name, arguments}}],
              finish_reason "tool_calls"; streamed as OpenAI's deltas (index, id, name, then argument fragments)

`tool_choice` "required" or a named function constrains the output to calls (grammar-forced);
"auto" (the default when tools are given) leaves it free and reads the calls from it; "none"
renders the tools but reads no calls. A call whose arguments do not parse is still returned (as
the model wrote it); the application decides.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..local_runtime.constraints import (
    CALL_CLOSE,
    call_arguments,
    call_head,
    constraint_for,
    parse_tool_calls,
    plain_tools,
)
from ..protocols.errors import GrammarError, gateway_error
from ..protocols.messages import Constraint

CALL_OPEN = "<tool_call>"


def request_structure(tools: list | None, tool_choice: Any, parallel: bool | None, response_format: Any,
                      ) -> tuple[list[dict] | None, Constraint | None]:
    """(the tools to render, the constraint) for a chat completion request; a 400 naming the
    parameter for anything malformed."""
    try:
        plain = plain_tools(tools)
        rf = None if response_format is None else response_format
        return plain, constraint_for(tools=plain, tool_choice=tool_choice, response_format=rf,
                                     parallel_tool_calls=True if parallel is None else parallel)
    except GrammarError as exc:
        raise gateway_error("too_large" if exc.too_large else "bad_request", exc.message, detail={"param": exc.param}) from None


def message_calls(tool_calls: list[dict] | None, where: str) -> list[dict] | None:
    """An assistant message's OpenAI tool_calls as the protocol's {name, arguments}."""
    if not tool_calls:
        return None
    out = []
    for j, c in enumerate(tool_calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise gateway_error("bad_request", f"{where}.tool_calls.{j}: a call is {{type: function, function: {{name, arguments}}}}",
                                detail={"param": f"{where}.tool_calls"})
        out.append({"name": fn["name"], "arguments": fn.get("arguments") or "{}"})
    return out


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def message_of(text: str, tools: list[dict] | None, tool_choice: Any) -> tuple[dict, bool]:
    """The assistant message for a whole completion, and whether it holds tool calls."""
    if not tools or tool_choice == "none":
        return {"role": "assistant", "content": text}, False
    content, calls = parse_tool_calls(text, names=[t["name"] for t in tools])
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content or None, "tool_calls": [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]}, True


class ToolCallStream:
    """A completion's text as it streams, split into OpenAI deltas: content until a call
    starts (text that might be the start of `<tool_call>` is held back), then for each call a
    first delta with its index, id and name, then fragments of its arguments as they grow.
    Assembled, the deltas equal `message_of` on the whole text (ids aside)."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.names = names or []
        self.text = ""
        self.sent = 0  # content characters sent
        self.calls: list[dict] = []  # per call: id, name, arguments sent so far
        self.in_calls = False

    def feed(self, piece: str, final: bool = False) -> list[dict]:
        self.text += piece
        deltas: list[dict] = []
        start = self.text.find(CALL_OPEN)
        if start < 0:
            lead = self.text.lstrip()[:3]  # maybe a call written without its envelope (held back until the end)
            bare = self.sent == 0 and (lead.startswith("{") or "```".startswith(lead) or lead == "```")
            if bare and final:
                _, calls = parse_tool_calls(self.text, names=self.names)
                if calls and not calls[0].error:
                    return self._whole(calls[0])
            safe = len(self.text) if final else (0 if bare else _content_safe(self.text))
            if safe > self.sent:
                deltas.append({"content": self.text[self.sent : safe]})
                self.sent = safe
            return deltas
        if not self.in_calls:
            self.in_calls = True
            head = self.text[self.sent : start].rstrip()
            if head:
                deltas.append({"content": head})
            self.sent = start
        bodies = self.text[start:].split(CALL_OPEN)[1:]
        for i, body in enumerate(bodies):
            head = call_head(body)
            if head is None:
                continue
            if i == len(self.calls):
                self.calls.append({"id": new_call_id(), "name": head[0], "sent": ""})
                deltas.append({"tool_calls": [{"index": i, "id": self.calls[i]["id"], "type": "function",
                                               "function": {"name": head[0], "arguments": ""}}]})
            complete = CALL_CLOSE in body or final
            args = call_arguments(body[head[1]:] + (CALL_CLOSE if final and CALL_CLOSE not in body else ""), complete)
            sent = self.calls[i]["sent"]
            if len(args) > len(sent) and args.startswith(sent):
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": args[len(sent):]}}]})
                self.calls[i]["sent"] = args
        return deltas

    def _whole(self, call) -> list[dict]:
        self.calls.append({"id": new_call_id(), "name": call.name, "sent": call.arguments})
        return [{"tool_calls": [{"index": 0, "id": self.calls[0]["id"], "type": "function",
                                 "function": {"name": call.name, "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": call.arguments}}]}]

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)


def _content_safe(text: str) -> int:
    """How much of `text` (no call in it yet) can go out: all but a tail that might begin
    `<tool_call>`, and the trailing space a call would strip."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return len(text[:-n].rstrip())
    return len(text.rstrip())


__all__ = ["request_structure", "message_calls", "message_of", "ToolCallStream", "new_call_id"]
