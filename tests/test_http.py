"""The full path over a real uvicorn server on 127.0.0.1, and bad requests answered with 4xx."""

import httpx
import pytest

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import GatewayError, TransportError, UnknownSessionError, WrongPositionError
from tandem.protocols.http import HttpTransport
from tandem.protocols.messages import (
    CloseSession,
    ErrorReply,
    GenerateChunk,
    GenerateRequest,
    GetInfo,
    OpenSession,
    VerifyRequest,
)
from tandem.sdk import Client, SyncClient

from .conftest import run


def _open(tiny_target, prompt=(256, 72, 105), **kw) -> dict:
    return OpenSession(
        prompt_tokens=list(prompt), tokenizer_fingerprint=tiny_target.tokenizer.fingerprint, **kw
    ).model_dump(mode="json")


def test_speculative_over_http_equals_target_alone(tiny_server, tiny_target):
    async def go():
        async with Client(drafter="tiny-llama-b", gateway=tiny_server, draft_len=4) as c:
            gen = c.stream("Hello, world", max_new_tokens=30, chat=False)
            pieces = [p async for p in gen]
            return gen, pieces

    gen, pieces = run(go())
    reference = list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens("Hello, world", chat=False), 30))
    assert gen.tokens == reference
    assert "".join(pieces) == gen.text
    u = gen.usage
    assert u.rounds >= 1 and u.bytes_up > 0 and u.bytes_down > 0 and u.wall_s > 0


def test_only_new_tokens_travel(tiny_server):
    """Upload per round stays flat as the context grows: no verify re-sends the prompt."""

    async def go(prompt):
        async with Client(drafter="tiny-llama:int8", gateway=tiny_server, draft_len=4) as c:
            return await c.generate(prompt, max_new_tokens=24, chat=False)

    short, long = run(go("Hi")), run(go("Hi " * 300))
    per_round = lambda r, prompt_bytes: (r.usage.bytes_up - prompt_bytes) / r.usage.rounds  # noqa: E731
    # the open carries the prompt once; everything else is independent of its length
    assert long.usage.bytes_up - short.usage.bytes_up < 300 * 3 * 5 + 500
    assert per_round(long, 0) < 10 * per_round(short, 0)


def test_cloud_mode_streams_over_http(tiny_server, tiny_target):
    async def go():
        async with Client(drafter="tiny-llama-b", gateway=tiny_server) as c:
            return await c.generate("Hey", mode="cloud", max_new_tokens=10, chat=False)

    rec = run(go())
    assert rec.tokens == list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens("Hey", chat=False), 10))


def test_sync_client(tiny_server):
    with SyncClient(drafter="tiny-llama-b", gateway=tiny_server) as c:
        pieces = list(c.stream("abc", max_new_tokens=8, chat=False))
        rec = c.generate("abc", max_new_tokens=8, chat=False)
    assert "".join(pieces) == rec.text


def test_unknown_session_is_404(tiny_server):
    r = httpx.post(tiny_server + "/v1/sessions/verify", json={"session_id": "s_nope", "position": 3, "draft_tokens": [1], "draft_probs": [0.5]})
    assert r.status_code == 404
    assert r.json()["code"] == "unknown_session" and "s_nope" in r.json()["message"]


def test_wrong_position_is_409_and_session_survives(tiny_server, tiny_target):
    opened = httpx.post(tiny_server + "/v1/sessions", json=_open(tiny_target)).json()
    sid, pos = opened["session_id"], opened["position"]
    bad = httpx.post(tiny_server + "/v1/sessions/verify", json={"session_id": sid, "position": pos + 5, "draft_tokens": [1], "draft_probs": [0.5]})
    assert bad.status_code == 409 and bad.json()["detail"] == {"expected": pos, "got": pos + 5}
    ok = httpx.post(tiny_server + "/v1/sessions/verify", json={"session_id": sid, "position": pos, "draft_tokens": [1], "draft_probs": [0.5]})
    assert ok.status_code == 200 and ok.json()["position"] == pos + len(ok.json()["tokens"])
    # the same verify again (a retry after a lost reply) gets the same answer and advances nothing
    replay = httpx.post(tiny_server + "/v1/sessions/verify", json={"session_id": sid, "position": pos, "draft_tokens": [1], "draft_probs": [0.5]})
    assert replay.status_code == 200 and replay.json() == ok.json()
    # a different draft for the old position is out of order
    stale = httpx.post(tiny_server + "/v1/sessions/verify", json={"session_id": sid, "position": pos, "draft_tokens": [2], "draft_probs": [0.5]})
    assert stale.status_code == 409
    assert httpx.post(tiny_server + "/v1/sessions/close", json={"session_id": sid}).status_code == 200
    again = httpx.post(tiny_server + "/v1/sessions/close", json={"session_id": sid})
    assert again.status_code == 404


def test_oversized_draft_is_413(tiny_server, tiny_target, tiny_gateway):
    sid = httpx.post(tiny_server + "/v1/sessions", json=_open(tiny_target)).json()["session_id"]
    n = tiny_gateway.limits.max_draft_tokens + 1
    r = httpx.post(tiny_server + "/v1/sessions/verify", json={"session_id": sid, "position": 3, "draft_tokens": [1] * n, "draft_probs": [0.5] * n})
    assert r.status_code == 413 and "draft" in r.json()["message"]


def test_oversized_body_is_413(tiny_server, tiny_gateway):
    r = httpx.post(tiny_server + "/v1/sessions", content=b"x" * (tiny_gateway.limits.max_body_bytes + 1))
    assert r.status_code == 413


def test_mismatched_tokenizer_is_refused(tiny_server, tiny_target):
    body = _open(tiny_target)
    body["tokenizer_fingerprint"] = "0123456789abcdef01234567"
    r = httpx.post(tiny_server + "/v1/sessions", json=body)
    assert r.status_code == 409 and r.json()["code"] == "tokenizer_mismatch"
    assert tiny_target.tokenizer.fingerprint in r.json()["message"]


def test_a_drafter_with_another_tokenizer_switches_to_text(tiny_server, tiny_target):
    """The client sees the fingerprints differ and verifies text instead of token ids."""
    from tandem.local_runtime.models import LoadedModel, Tokenizer, tiny_llama

    other = Tokenizer(encode=lambda s: [1], decode=lambda ids: "", vocab={"a": 1}, eos_token_ids=[0])
    lm = LoadedModel("odd", tiny_llama(3, 32, 1, 2, 320), other, "test")

    async def go():
        async with Client(drafter=lm, gateway=tiny_server) as c:
            return await c.generate("x", chat=False, max_new_tokens=6)

    rec = run(go())
    assert rec.tokens == list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens("x", chat=False), 6))


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "body"),
        (b'{"session_id": "s", "position": 1, "draft_tokens": [1, 2], "draft_probs": [0.5]}', "draft_probs"),
        (b'{"session_id": "s", "position": -4, "draft_tokens": [], "draft_probs": []}', "position"),
        (b'{"session_id": "s", "position": 1, "draft_tokens": [-1], "draft_probs": [0.5]}', "draft_tokens"),
        (b'{"session_id": "s", "position": 1, "draft_tokens": [], "draft_probs": [], "version": 99}', "version"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(tiny_server, body, field):
    r = httpx.post(tiny_server + "/v1/sessions/verify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"
    assert field in r.json()["message"] or field == "body"
    assert httpx.get(tiny_server + "/healthz").status_code == 200


def test_out_of_vocabulary_ids_are_400(tiny_server, tiny_target):
    r = httpx.post(tiny_server + "/v1/sessions", json=_open(tiny_target, prompt=(256, 10**6)))
    assert r.status_code == 400 and "vocabulary" in r.json()["message"]


def test_transport_maps_errors_to_the_tree(tiny_server, tiny_target):
    async def go():
        async with HttpTransport(tiny_server) as t:
            with pytest.raises(UnknownSessionError):
                await t.request(CloseSession(session_id="s_missing"))
            opened = await t.request(OpenSession(**_open(tiny_target)))
            with pytest.raises(WrongPositionError):
                await t.request(VerifyRequest(session_id=opened.session_id, position=99, draft_tokens=[], draft_probs=[]))

    run(go())


def test_unreachable_gateway_is_a_transport_error():
    async def go():
        async with HttpTransport("http://127.0.0.1:9", timeout_s=2) as t:
            await t.info()

    with pytest.raises(TransportError, match="127.0.0.1:9"):
        run(go())


def test_a_balancers_own_errors_and_a_cut_stream_are_transport_errors(tiny_target):
    """A 502/503/504 without an ErrorReply (nginx with no replica to ask) is retryable like a
    dropped connection; the gateway's own 503 stays its error; a stream that ends before its
    last chunk was cut."""
    not_ready = ErrorReply(code="not_ready", message="draining").model_dump_json()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/generate":
            return httpx.Response(200, content=GenerateChunk(tokens=[72], text="H").model_dump_json() + "\n")
        if request.url.path == "/v1/sessions":
            return httpx.Response(503, content=not_ready, headers={"content-type": "application/json"})
        return httpx.Response(502, text="<html><center><h1>502 Bad Gateway</h1></center></html>")

    async def go():
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://lb")
        async with HttpTransport("http://lb", client=client) as t:
            with pytest.raises(TransportError, match="HTTP 502"):
                await t.request(GetInfo())
            with pytest.raises(GatewayError) as gateway_own:
                await t.request(OpenSession(**_open(tiny_target)))
            assert gateway_own.value.code == "not_ready" and gateway_own.value.status == 503
            chunks = []
            with pytest.raises(TransportError, match="before its last chunk"):
                async for chunk in t.stream(GenerateRequest(prompt_text="Hi")):
                    chunks.append(chunk)
            assert [c.text for c in chunks] == ["H"]

    run(go())


def test_lost_final_reply_can_be_retried(tiny_server, tiny_target):
    opened = httpx.post(tiny_server + "/v1/sessions", json=_open(tiny_target, max_new_tokens=1)).json()
    body = {"session_id": opened["session_id"], "position": opened["position"], "draft_tokens": [5], "draft_probs": [0.5]}
    first = httpx.post(tiny_server + "/v1/sessions/verify", json=body)
    assert first.status_code == 200 and first.json()["finished"]
    again = httpx.post(tiny_server + "/v1/sessions/verify", json=body)
    assert again.json() == first.json()
    body["draft_tokens"] = [6]
    done = httpx.post(tiny_server + "/v1/sessions/verify", json=body)
    assert done.status_code == 409 and done.json()["code"] == "session_finished"
