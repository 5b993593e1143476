"""Tool calls and structured output through the real `openai` package against a loopback gateway.

The tiny model is random, so only a constraint makes its output a call or JSON: these tests drive
the grammar-forced paths (tool_choice required / named, json_schema) and the API's shapes. The
real model's own tool use (`auto`) is in test_qwen_pair.py (slow)."""

import json
from dataclasses import replace

import jsonschema
import openai
import pytest

from tandem.local_runtime.models import load_model
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.openai_tools import ToolCallStream, message_of
from tandem.remote_gateway.service import Gateway

from .conftest import serve_in_thread

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "adult": {"type": "boolean"}},
          "required": ["name", "adult"], "additionalProperties": False}


def _chat(messages, tools=None):
    """A minimal chat template for the byte-level tiny model: tools listed, then the turns."""
    text = "".join(f"tool {t['name']}\n" for t in tools or [])
    for m in messages:
        text += f"{m['role']}: {m.get('content') or ''}{json.dumps(m.get('tool_calls')) if m.get('tool_calls') else ''}\n"
    return [256, *(text + "assistant: ").encode()]


@pytest.fixture(scope="module")
def client():
    lm = load_model("tiny-llama", progress=False)
    lm = replace(lm, tokenizer=replace(lm.tokenizer, chat=_chat))
    gw = Gateway(lm)
    with serve_in_thread(create_app(gw)) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
            yield c
    gw.close()


def _ask(client, **kw):
    base = dict(model="tiny-llama", messages=[{"role": "user", "content": "weather in Oslo?"}], max_tokens=160, temperature=0)
    return client.chat.completions.create(**{**base, **kw})


def test_a_required_tool_call_has_arguments_that_validate(client):
    out = _ask(client, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "add")
    schema = (WEATHER if call.function.name == "get_weather" else ADD)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_named_tool_is_the_one_called(client):
    out = _ask(client, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    calls = out.choices[0].message.tool_calls
    assert calls and all(c.function.name == "add" for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), ADD["function"]["parameters"])


def test_a_streamed_tool_call_assembled_equals_the_whole_one(client):
    kw = dict(tools=[WEATHER, ADD], tool_choice="required")
    whole = _ask(client, **kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reason = None
    for chunk in _ask(client, stream=True, **kw):
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = d.id or c["id"]
                if d.function is not None:
                    c["name"] += d.function.name or ""
                    c["arguments"] += d.function.arguments or ""
    assert reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [(c.function.name, c.function.arguments) for c in whole]
    assert all(c["id"] for c in calls.values())


def test_json_schema_output_validates(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = _ask(client, response_format=rf, messages=[{"role": "user", "content": "a person"}])
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    out = _ask(client, response_format={"type": "json_object"}, max_tokens=400)
    assert out.choices[0].finish_reason == "length" or isinstance(json.loads(out.choices[0].message.content), dict)


def test_tool_results_in_the_conversation(client):
    msgs = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = _ask(client, messages=msgs, tools=[WEATHER], max_tokens=8)
    assert out.choices[0].message.content is not None


@pytest.mark.parametrize("kw,param,says", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "colour": 1}}}),
     "response_format", "colour"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
     "response_format", "strin"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tools=[{"type": "function", "function": {"name": "rm -rf", "parameters": {"type": "object"}}}]), "tools", "identifier"),
    (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice", "sometimes"),
    (dict(response_format={"type": "yaml"}), "response_format", "yaml"),
])
def test_bad_structured_requests_are_400_naming_the_parameter(client, kw, param, says):
    with pytest.raises(openai.BadRequestError, match=says) as exc:
        _ask(client, **kw)
    assert exc.value.body["param"] == param
    assert _ask(client, max_tokens=2).choices[0].finish_reason == "length"  # the gateway is unaffected


def test_a_deeply_nested_schema_is_refused():
    deep = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    from tandem.local_runtime.constraints import GrammarError, check_schema

    with pytest.raises(GrammarError, match="deeper"):
        check_schema(deep)


def test_tool_call_stream_splits_content_and_calls():
    text = 'Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 12}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'
    stream = ToolCallStream()
    deltas = []
    for ch in text:  # one character at a time, the hardest split
        deltas += stream.feed(ch)
    deltas += stream.feed("", final=True)
    content = "".join(d.get("content", "") for d in deltas)
    args: dict[int, str] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            args[c["index"]] = args.get(c["index"], "") + c["function"].get("arguments", "")
    message, called = message_of(text, [{"name": "add"}], "auto")
    assert called and content == message["content"] == "Let me look."
    assert [args[0], args[1]] == [c["function"]["arguments"] for c in message["tool_calls"]] == ['{"a": 12}', "{}"]


def test_a_call_written_without_its_envelope_is_read_as_a_call():
    text = '{"name": "add", "arguments": {"a": 3}}'
    stream = ToolCallStream(["add"])
    deltas = [d for ch in text for d in stream.feed(ch)] + stream.feed("", final=True)
    assert not any("content" in d for d in deltas) and stream.has_calls
    message, called = message_of(text, [{"name": "add"}], "auto")
    assert called and message["tool_calls"][0]["function"]["arguments"] == '{"a": 3}'
    assert message_of('{"name": "other", "arguments": {}}', [{"name": "add"}], "auto")[1] is False
    fenced = '```json\n{\n  "name": "add",\n  "arguments": {\n    "a": 3\n  }\n}\n```'
    message, called = message_of(fenced, [{"name": "add"}], "auto")
    assert called and message["tool_calls"][0]["function"]["arguments"] == '{"a": 3}'
    stream = ToolCallStream(["add"])
    deltas = [d for ch in fenced for d in stream.feed(ch)] + stream.feed("", final=True)
    assert stream.has_calls and "".join(c["function"].get("arguments", "") for d in deltas for c in d.get("tool_calls", [])) == '{"a": 3}'
    plain = ToolCallStream(["add"])
    assert plain.feed("Hello") == [{"content": "Hello"}] and plain.feed("", final=True) == []
