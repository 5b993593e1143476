"""Tool calls and JSON output on the real Qwen2.5-Coder pair (slow): the `openai` package against a
loopback gateway serving the 1.5B model on llama.cpp, and the SDK drafting under the grammar with
the 0.5B model."""

import json

import jsonschema
import pytest

from tandem.sdk.bench.structured import load_schemas

from .conftest import run, serve_in_thread

pytestmark = pytest.mark.slow

DRAFTER, TARGET = "qwen2.5-coder-0.5b@llama.cpp", "qwen2.5-coder-1.5b@llama.cpp"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What's the weather like in Oslo right now, in celsius?"}]


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("llama_cpp")
    from tandem.remote_gateway.app import create_app
    from tandem.remote_gateway.service import Gateway

    gw = Gateway(TARGET)
    with serve_in_thread(create_app(gw)) as url:
        yield url, gw.model_name
    gw.close()


@pytest.fixture(scope="module")
def oai(served):
    import openai

    with openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=600) as c:
        yield c, served[1]


def test_openai_tool_calls_required_auto_and_streamed(oai):
    client, model = oai
    kw = dict(model=model, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80)
    required = client.chat.completions.create(tool_choice="required", **kw).choices[0]
    (call,) = required.message.tool_calls
    assert required.finish_reason == "tool_calls" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert args["city"] == "Oslo"
    auto = client.chat.completions.create(tool_choice="auto", **kw).choices[0]
    assert auto.finish_reason == "tool_calls" and auto.message.tool_calls[0].function.name == "get_weather"
    parts = {"name": "", "arguments": ""}
    for chunk in client.chat.completions.create(tool_choice="required", stream=True, **kw):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            parts["name"] += (d.function.name or "") if d.function else ""
            parts["arguments"] += (d.function.arguments or "") if d.function else ""
    assert (parts["name"], parts["arguments"]) == (call.function.name, call.function.arguments)


def test_openai_json_schema_validates_and_a_bad_schema_is_400(oai):
    import openai

    client, model = oai
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
              "required": ["name", "age", "languages"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Invent a software engineer and describe them."}], temperature=0,
        max_tokens=120, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}})
    jsonschema.validate(json.loads(out.choices[0].message.content), person)
    with pytest.raises(openai.BadRequestError, match="propertiez") as exc:
        client.chat.completions.create(model=model, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "propertiez": {}}}})
    assert exc.value.body["param"] == "response_format"


def test_speculative_under_a_schema_is_cloud_under_it_with_forced_drafts(served):
    from tandem.sdk import Client

    items = load_schemas(None)[:2]

    async def go():
        async with Client(drafter=DRAFTER, gateway=served[0], draft_len=4) as c:
            return [(await c.generate(it["prompt"], mode="cloud", response_format=it["schema"], max_new_tokens=96),
                     await c.generate(it["prompt"], mode="speculative", response_format=it["schema"], max_new_tokens=96))
                    for it in items]

    for it, (cloud, spec) in zip(items, run(go())):
        assert spec.tokens == cloud.tokens
        jsonschema.validate(spec.parsed, it["schema"])
        assert spec.usage.forced_tokens > 0 and spec.parse_error is None


def test_the_agent_sample_runs_its_tools_on_the_device():
    """samples/agent.py on the device model alone: it reads the example file (a local_only
    tool) or computes, and every turn after a local_only read stays on the device."""
    import subprocess
    import sys
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "samples" / "agent.py"
    done = subprocess.run([sys.executable, str(sample), "--mode", "local", "--max-steps", "3", "--max-new-tokens", "96"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tool " in done.stderr and "Traceback" not in done.stderr
    assert "turns," in done.stderr
