"""The OpenAI-compatible routes, driven by the real `openai` package against a loopback gateway."""

import openai
import pytest

from tandem.local_runtime.sequence import generate_alone
from tandem.local_runtime.text import IncrementalDecoder
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.auth import KeyRing, Principal, hash_key
from tandem.remote_gateway.service import Gateway

from .conftest import serve_in_thread


def _reference(tiny_gateway, content: str, n: int) -> str:
    lm = tiny_gateway.lm
    prompt = tiny_gateway.render([{"role": "user", "content": content}])
    decoder = IncrementalDecoder(lm.tokenizer.decode, skip_ids=lm.tokenizer.special_ids)
    return "".join(decoder.push([t]) for t in generate_alone(lm, prompt, n)) + decoder.flush()


@pytest.fixture(scope="module")
def client(tiny_server):
    with openai.OpenAI(base_url=tiny_server + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").owned_by == "tandem"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion_round_trip(client, tiny_gateway):
    msgs = [{"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny-llama"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == _reference(tiny_gateway, "Hello", 12)
    prompt_len = len(tiny_gateway.render(msgs))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (prompt_len, 12, prompt_len + 12)


def test_streaming_equals_non_streaming(client, tiny_gateway):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    whole = client.chat.completions.create(model="tiny-llama", messages=msgs, max_completion_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny-llama", messages=msgs, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_stop_sequences_and_sampling(client, tiny_gateway):
    reference = _reference(tiny_gateway, "Hello", 16)
    stop = next(reference[i : i + 2] for i in range(2, len(reference) - 2) if reference[i : i + 2].strip())
    out = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0, stop=[stop],
    )
    assert out.choices[0].message.content == reference[: reference.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    # the OpenAI default is to sample (temperature 1); a seed makes it repeatable
    a = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hey"}], max_tokens=8, seed=5)
    b = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hey"}], max_tokens=8, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_openai_errors(client):
    with pytest.raises(openai.NotFoundError, match="tiny-llama"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="chat template") as exc:  # the tiny model has none to render tools
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert exc.value.body["param"] == "tools"
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=32_000)
    assert exc.value.status_code == 413


def test_openai_client_with_api_keys(tiny_target):
    gw = Gateway(tiny_target)
    keys = KeyRing({hash_key("sk-good"): Principal("app")}, required=True)
    with serve_in_thread(create_app(gw, keys)) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="sk-good", max_retries=0) as good:
            out = good.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0)
            assert out.usage.completion_tokens == 3
        with openai.OpenAI(base_url=url + "/v1", api_key="sk-bad", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
    assert len(gw.sessions) == 0  # completions free their sessions
    gw.close()
