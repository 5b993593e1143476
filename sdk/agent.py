"""A small tool loop for agents: the model calls tools, the device runs them, their results go
back into the conversation, until the model answers or the step limit is reached.

    @tool
    def add(a: float, b: float) -> float:
        "Add two numbers."
        return a + b

    agent = Agent(client, [add, read_file], max_steps=6)
    result = await agent.run("What is 2.5 + 4?")
    result.text, result.trace, result.usage

Each turn is one generation of the client's (any mode), with the tools rendered into the prompt
by the model's chat template and `tool_choice` "auto". A call's arguments are validated against
the tool's signature before it runs; a call the model got wrong, a tool that raises or one that
runs past its `timeout_s` becomes an error message in the conversation (the model may correct
itself), never an exception. A call repeated with the same arguments is not run again: the model
gets the same result with a nudge to answer from it. A tool marked `local_only` reads something
that must not leave the device: after it has run, every later turn is tagged `local_only`, which the client always runs in
local mode, whatever the mode or policy would choose, and the trace says from which step.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError, create_model

from .structured import LOCAL_ONLY_TAG
from .usage import Usage

MAX_RESULT_CHARS = 4000  # a tool's result as the model reads it
# small models call the same tool again after its result unless told how the loop ends; said
# from the first tool result on (said from the start, it keeps some from calling at all)
AFTER_TOOLS_SYSTEM = ("You are a helpful assistant. Call a tool when you need one. When a tool response gives you "
                      "what you need, answer the user in plain words, without calling the tool again.")


@dataclass
class Tool:
    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict
    local_only: bool = False
    timeout_s: float = 10.0

    def spec(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def arguments(self, raw: str) -> dict:
        """The call's arguments, parsed and validated against the function's signature."""
        args = json.loads(raw) if raw.strip() else {}
        if not isinstance(args, dict):
            raise ValueError("the arguments must be a JSON object")
        return self._model.model_validate(args).model_dump()

    def __post_init__(self) -> None:
        fields = {}
        for p in inspect.signature(self.fn).parameters.values():
            annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
            fields[p.name] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
        self._model = create_model(f"{self.name}_arguments", **fields)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         local_only: bool = False, timeout_s: float = 10.0):
    """Make a function a Tool: its name, its docstring's first paragraph as the description, and
    a JSON Schema of its parameters from the signature's annotations (pydantic)."""

    def wrap(f: Callable) -> Tool:
        doc = inspect.getdoc(f) or ""
        t = Tool(f, name or f.__name__, description or doc.split("\n\n")[0].strip(), {}, local_only, timeout_s)
        schema = t._model.model_json_schema()
        t.parameters = {"type": "object", "properties": schema.get("properties", {}), "required": schema.get("required", []),
                        "additionalProperties": False}
        return t

    return wrap(fn) if fn is not None else wrap


@dataclass
class Step:
    """One tool call in the trace."""

    turn: int
    name: str
    arguments: str
    result: str
    error: str | None
    seconds: float
    mode: str


@dataclass
class AgentResult:
    text: str  # the model's final answer
    messages: list[dict]  # the whole conversation, tool calls and results included
    trace: list[Step] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)  # every turn's, summed
    turns: int = 0
    stopped: str = "answer"  # answer | max_steps
    local_only_from: int | None = None  # the turn from which a local_only tool kept the agent on the device

    def to_dict(self) -> dict:
        return {"text": self.text, "turns": self.turns, "stopped": self.stopped, "local_only_from": self.local_only_from,
                "trace": [s.__dict__ for s in self.trace], "usage": self.usage.to_dict()}


class Agent:
    def __init__(self, client: Any, tools: list[Tool | Callable], *, max_steps: int = 6, system: str | None = None,
                 after_tools_system: str | None = AFTER_TOOLS_SYSTEM,
                 mode: str | None = None, max_new_tokens: int = 256, on_text: Callable[[str, str], None] | None = None,
                 on_step: Callable[[Step], None] | None = None) -> None:
        """`max_steps` bounds the turns; `system` is the system prompt (None: the chat template's
        own), replaced by `after_tools_system` once a tool has answered (None: kept); `mode` is
        each turn's (the client's default if None);
        `on_text(piece, mode)` sees each turn's text as it streams, `on_step` each tool call."""
        self.client = client
        self.tools = {t.name: t for t in (x if isinstance(x, Tool) else tool(x) for x in tools)}
        self.max_steps = max_steps
        self.system = system
        self.after_tools_system = after_tools_system
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.on_text = on_text
        self.on_step = on_step

    async def run(self, prompt: str, **kwargs) -> AgentResult:
        messages: list[dict] = ([{"role": "system", "content": self.system}] if self.system else [])
        messages.append({"role": "user", "content": prompt})
        result = AgentResult(text="", messages=messages)
        specs = [t.spec() for t in self.tools.values()]
        seen: dict[tuple[str, str], str] = {}  # (name, arguments) -> result
        for turn in range(self.max_steps):
            local = result.local_only_from is not None
            if result.trace and self.after_tools_system and messages[0].get("content") != self.after_tools_system:
                if messages[0]["role"] == "system":
                    messages[0] = {"role": "system", "content": self.after_tools_system}
                else:
                    messages.insert(0, {"role": "system", "content": self.after_tools_system})
            gen = self.client.stream(messages, tools=specs, tool_choice="auto", mode=self.mode,
                                     max_new_tokens=self.max_new_tokens, tags={LOCAL_ONLY_TAG} if local else (), **kwargs)
            async for piece in gen:
                if self.on_text is not None:
                    self.on_text(piece, gen.record.mode)
            rec = gen.record
            result.usage, result.turns = result.usage + rec.usage, turn + 1
            if not rec.tool_calls:
                result.text = rec.text
                messages.append({"role": "assistant", "content": rec.text})
                return result
            messages.append({"role": "assistant", "content": rec.content or "",
                             "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in rec.tool_calls]})
            for call in rec.tool_calls:
                key = (call.name, call.arguments)
                if key in seen:  # the same call again (small models loop): its answer, and a nudge to use it
                    step = Step(turn + 1, call.name, call.arguments, f"{seen[key]} (the same call's result again: "
                                "answer the user with it)", None, 0.0, rec.mode)
                else:
                    step = await self._call(call, turn, rec.mode)
                    seen[key] = step.result
                result.trace.append(step)
                if self.on_step is not None:
                    self.on_step(step)
                messages.append({"role": "tool", "content": step.result})
                t = self.tools.get(call.name)
                if t is not None and t.local_only and result.local_only_from is None:
                    result.local_only_from = turn + 2  # the next turn (1-based) is the first on the device
        result.stopped = "max_steps"
        result.text = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        return result

    async def _call(self, call: Any, turn: int, mode: str) -> Step:
        t0 = time.perf_counter()
        t = self.tools.get(call.name)
        error, text = None, ""
        if call.error:
            error = f"the call did not parse ({call.error})"
        elif t is None:
            error = f"there is no tool '{call.name}' (tools: {', '.join(self.tools)})"
        else:
            try:
                args = t.arguments(call.arguments)
            except (ValueError, ValidationError) as exc:
                error = f"bad arguments for {call.name}: {exc}"
        if error is None:
            try:
                if inspect.iscoroutinefunction(t.fn):
                    value = await asyncio.wait_for(t.fn(**args), t.timeout_s)
                else:  # a blocking tool runs on a thread; past its timeout its answer is no longer waited for
                    value = await asyncio.wait_for(asyncio.to_thread(t.fn, **args), t.timeout_s)
                text = value if isinstance(value, str) else json.dumps(value, default=str)
            except asyncio.TimeoutError:
                error = f"{call.name} took longer than {t.timeout_s} s"
            except Exception as exc:  # a tool's own failure is the model's to read, not the app's crash
                error = f"{call.name} failed: {type(exc).__name__}: {exc}"
        result = f"error: {error}" if error else text
        return Step(turn + 1, call.name, call.arguments, result[:MAX_RESULT_CHARS], error, round(time.perf_counter() - t0, 3), mode)


__all__ = ["Agent", "AgentResult", "Step", "Tool", "tool", "LOCAL_ONLY_TAG", "AFTER_TOOLS_SYSTEM"]
