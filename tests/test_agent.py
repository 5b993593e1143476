"""The tool loop (sdk/agent.py): calls run locally, results go back, limits hold, failures are data.

The model is scripted here (a client that answers with given texts, read by the real parser), so
the loop itself is what is tested; the real model's tool use is in test_qwen_pair.py (slow)."""

import json
import time

import pytest

from tandem.sdk.agent import Agent, tool
from tandem.sdk.structured import LOCAL_ONLY_TAG, Structure
from tandem.sdk.usage import GenerationRecord, Piece

from .conftest import run


def call(tool_name: str, **args) -> str:
    return f"<tool_call>\n{json.dumps({'name': tool_name, 'arguments': args})}\n</tool_call>"


class ScriptedClient:
    """Answers each turn with the next text of the script; records what each turn was asked."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.turns: list[dict] = []

    def stream(self, messages, *, tools, tool_choice, mode, max_new_tokens, tags=()):
        self.turns.append({"messages": [dict(m) for m in messages], "tags": frozenset(tags), "mode": mode})
        text = self.script.pop(0)
        structure = Structure.of(messages, tools, tool_choice, True, None)
        mode = "local" if LOCAL_ONLY_TAG in tags else (mode or "speculative")
        return _Gen(text, structure, mode)


class _Gen:
    def __init__(self, text, structure, mode):
        self.record = GenerationRecord(mode=mode)
        self._text, self._structure = text, structure

    def __aiter__(self):
        return self._go()

    async def _go(self):
        self.record.text = self._text
        self.record.usage.local_tokens = len(self._text)
        yield Piece(self._text, "local")
        self._structure.finish(self.record)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(timeout_s=0.2)
def slow() -> str:
    """Takes too long."""
    time.sleep(2)
    return "late"


@tool(local_only=True)
def secret(name: str) -> str:
    """Reads something private."""
    return f"the secret of {name}"


def test_a_tool_schema_comes_from_the_signature():
    assert add.name == "add" and add.description == "Add two integers."
    assert add.parameters == {"type": "object", "properties": {"a": {"title": "A", "type": "integer"},
                                                               "b": {"title": "B", "type": "integer"}},
                              "required": ["a", "b"], "additionalProperties": False}


def test_calls_run_and_their_results_go_back():
    client = ScriptedClient([call("add", a=2, b=40), "The answer is 42."])
    result = run(Agent(client, [add]).run("2 + 40?"))
    assert result.text == "The answer is 42." and result.turns == 2 and result.stopped == "answer"
    (step,) = result.trace
    assert step.name == "add" and step.result == "42" and step.error is None
    second = client.turns[1]["messages"]
    assert second[-2]["role"] == "assistant" and second[-2]["tool_calls"] == [{"name": "add", "arguments": '{"a": 2, "b": 40}'}]
    assert second[-1] == {"role": "tool", "content": "42"}
    assert result.usage.local_tokens == sum(len(t) for t in [call("add", a=2, b=40), "The answer is 42."])


def test_bad_calls_timeouts_and_unknown_tools_are_errors_the_model_reads():
    client = ScriptedClient([
        call("add", a="two", b=1) + "\n" + call("nope") + "\n" + call("slow") + "\n<tool_call>\n{broken\n</tool_call>",
        "Sorry.",
    ])
    result = run(Agent(client, [add, slow]).run("?"))
    errors = [s.error for s in result.trace]
    assert len(errors) == 4 and all(errors)
    assert "bad arguments for add" in errors[0] and "no tool 'nope'" in errors[1]
    assert "longer than 0.2 s" in errors[2] and "did not parse" in errors[3]
    assert all(m["content"].startswith("error: ") for m in client.turns[1]["messages"][-4:])
    assert result.text == "Sorry."


def test_the_step_limit_holds():
    client = ScriptedClient([call("add", a=1, b=1)] * 3)
    result = run(Agent(client, [add], max_steps=3).run("loop"))
    assert result.stopped == "max_steps" and result.turns == 3 and len(result.trace) == 3


def test_a_local_only_tool_keeps_later_turns_on_the_device():
    client = ScriptedClient([call("add", a=1, b=2), call("secret", name="x"), call("add", a=3, b=4), "done"])
    result = run(Agent(client, [add, secret], mode="speculative").run("?"))
    assert [LOCAL_ONLY_TAG in t["tags"] for t in client.turns] == [False, False, True, True]
    assert result.local_only_from == 3 and [s.mode for s in result.trace] == ["speculative", "speculative", "local"]


def test_the_client_runs_a_local_only_request_locally(tiny_gateway):
    from tandem.protocols.transport import InProcessTransport
    from tandem.sdk import Client

    async def go():
        async with Client(drafter="tiny-llama-b", gateway=InProcessTransport(tiny_gateway), mode="cloud") as c:
            return await c.generate("hi", chat=False, max_new_tokens=4, tags={LOCAL_ONLY_TAG})

    rec = run(go())
    assert rec.mode == "local" and rec.usage.cloud_tokens == 0 and rec.usage.bytes_up == 0
    assert rec.decision["why"] == "tagged local_only"


@pytest.mark.parametrize("text", ["plain answer", '{"name": "add", "arguments": {"a": 1, "b": 1}}'])
def test_answers_with_and_without_the_envelope(text):
    client = ScriptedClient([text, "fine"])
    result = run(Agent(client, [add]).run("?"))
    assert len(result.trace) == (0 if text == "plain answer" else 1)
