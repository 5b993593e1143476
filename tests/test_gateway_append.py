"""The `append` operation (assist mode): device tokens taken as they are, then the target's next
token, over the in-process and the HTTP transports."""

import httpx
import pytest
from pydantic import ValidationError

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import GatewayError, RequestTooLargeError, WrongPositionError
from tandem.protocols.http import HttpTransport
from tandem.protocols.messages import AppendRequest, AppendResult, OpenSession, VerifyRequest
from tandem.protocols.transport import InProcessTransport

from .conftest import run

PROMPT = [256, 72, 101, 108, 108, 111]  # <bos>Hello


def _open(tiny_target, **kw) -> OpenSession:
    return OpenSession(prompt_tokens=PROMPT, tokenizer_fingerprint=tiny_target.tokenizer.fingerprint, **kw)


def _next(tiny_target, seq) -> int:
    return next(generate_alone(tiny_target, list(seq), 1))


@pytest.fixture(params=["inproc", "http"])
def transport(request, tiny_gateway, tiny_server):
    return InProcessTransport(tiny_gateway) if request.param == "inproc" else HttpTransport(tiny_server)


def test_append_then_the_targets_next_token(transport, tiny_target):
    device = [44, 32, 119, 111]  # ", wo"

    async def go():
        async with transport as t:
            opened = await t.request(_open(tiny_target))
            r = await t.request(AppendRequest(session_id=opened.session_id, position=opened.position, tokens=device))
            assert isinstance(r, AppendResult)
            # the retried request (a lost reply) gets the same answer and advances nothing
            again = await t.request(AppendRequest(session_id=opened.session_id, position=opened.position, tokens=device))
            assert again == r
            # and the session goes on from there: a plain verify continues the target's decoding
            v = await t.request(VerifyRequest(session_id=opened.session_id, position=r.position, draft_tokens=[], draft_probs=[]))
            with pytest.raises(WrongPositionError):
                await t.request(AppendRequest(session_id=opened.session_id, position=r.position, tokens=[1]))
            return r, v

    r, v = run(go())
    nxt = _next(tiny_target, PROMPT + device)
    assert r.appended == 4 and r.next_token == nxt and r.tokens == device + [nxt]
    assert r.position == len(PROMPT) + 5 and not r.finished
    assert v.tokens == [_next(tiny_target, PROMPT + device + [nxt])]


def test_append_nothing_is_one_decode_step(tiny_gateway, tiny_target):
    async def go():
        t = InProcessTransport(tiny_gateway)
        opened = await t.request(_open(tiny_target, max_new_tokens=6))
        pos, out = opened.position, []
        while True:
            r = await t.request(AppendRequest(session_id=opened.session_id, position=pos, tokens=[]))
            out += r.tokens
            pos = r.position
            if r.finished:
                return out, r

    out, last = run(go())
    assert out == list(generate_alone(tiny_target, PROMPT, 6))
    assert last.finish_reason == "length"


def test_device_tokens_can_end_the_generation(tiny_gateway, tiny_target):
    async def go():
        t = InProcessTransport(tiny_gateway)
        a = await t.request(_open(tiny_target))
        eos = await t.request(AppendRequest(session_id=a.session_id, position=a.position, tokens=[65, 257, 66]))
        b = await t.request(_open(tiny_target, max_new_tokens=3))
        length = await t.request(AppendRequest(session_id=b.session_id, position=b.position, tokens=[65, 66, 67, 68, 69]))
        return eos, length

    eos, length = run(go())
    assert eos.finished and eos.finish_reason == "eos" and eos.next_token is None and eos.tokens == [65, 257]
    assert length.finished and length.finish_reason == "length" and length.appended == 3 and length.next_token is None


def test_text_session_appends_text(tiny_gateway, tiny_target):
    tok = tiny_target.tokenizer

    async def go():
        t = InProcessTransport(tiny_gateway)
        opened = await t.request(OpenSession(prompt_text="Hello", max_new_tokens=20))
        assert opened.text_space and opened.position == 0
        r = await t.request(AppendRequest(session_id=opened.session_id, position=0, text=", wo", text_offset=0))
        with pytest.raises(WrongPositionError):
            await t.request(AppendRequest(session_id=opened.session_id, position=r.position, text="x", text_offset=99))
        with pytest.raises(GatewayError, match="text session"):
            await t.request(AppendRequest(session_id=opened.session_id, position=r.position, tokens=[1]))
        return r

    r = run(go())
    seq = tok.prompt_tokens("Hello", chat=False) + tok.encode(", wo")
    nxt = _next(tiny_target, seq)
    assert r.appended == 4 and r.next_token == nxt and r.position == 5
    assert r.text == tok.text([nxt]).rstrip("\ufffd") and r.text_offset == len(", wo") + len(r.text)


def test_append_limits_and_kinds(tiny_server, tiny_target, tiny_gateway):
    async def go():
        async with HttpTransport(tiny_server) as t:
            opened = await t.request(_open(tiny_target))
            n = tiny_gateway.limits.max_append_tokens + 1
            with pytest.raises(RequestTooLargeError, match="append limit"):
                await t.request(AppendRequest(session_id=opened.session_id, position=opened.position, tokens=[65] * n))
            with pytest.raises(GatewayError, match="token session"):
                await t.request(AppendRequest(session_id=opened.session_id, position=opened.position, text="x", text_offset=0))

    run(go())
    r = httpx.post(tiny_server + "/v1/sessions/append", json={"session_id": "s_x", "position": 1, "tokens": [1], "text": "a", "text_offset": 0})
    assert r.status_code == 400 and "exactly one" in r.json()["message"]


def test_append_request_validates():
    with pytest.raises(ValidationError, match="exactly one"):
        AppendRequest(session_id="s", position=0)
    with pytest.raises(ValidationError, match="text_offset"):
        AppendRequest(session_id="s", position=0, text="hi")
    req = AppendRequest(session_id="s", position=3, tokens=[1, 2])
    assert AppendRequest.model_validate_json(req.model_dump_json()) == req
