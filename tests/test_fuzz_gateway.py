"""Fuzzing: schemathesis drives every operation of the gateway's OpenAPI schema (a tiny-model
gateway on 127.0.0.1) with generated requests, valid and not; none may get a 5xx or take the
server down. Hypothesis checks the protocol messages round-trip and refuse what they must."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError
from schemathesis.generation.modes import GenerationMode

from tandem.protocols.errors import from_reply, gateway_error
from tandem.protocols.messages import (
    AppendRequest,
    AppendResult,
    ErrorReply,
    GatewayInfo,
    OpenSession,
    VerifyTextRequest,
)
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.service import Gateway, GatewayLimits

from .conftest import serve_in_thread


@pytest.fixture(scope="module")
def fuzz_server(tiny_target):
    # small generation limits keep every generated request cheap
    gw = Gateway(tiny_target, GatewayLimits(max_new_tokens=8, max_prompt_tokens=256, max_sessions=512, session_ttl_s=30))
    with serve_in_thread(create_app(gw)) as url:
        yield url
    gw.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server, mode):
    """Every operation, with requests that fit the schema and requests that do not."""
    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/sessions", "/v1/sessions/verify", "/v1/sessions/append", "/v1/chat/completions"}
    seen: dict[int, int] = {}
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def check(case):
            response = case.call(base_url=fuzz_server, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
            ctype = response.headers.get("content-type") or ""
            ctype = ctype[0] if isinstance(ctype, list) else ctype
            if response.status_code >= 400 and ctype.startswith("application/json"):
                body = response.json()
                assert ("code" in body and "message" in body) or "error" in body, body

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has nothing to break
    assert sum(seen.values()) > 40 and any(s >= 400 for s in seen)


def test_server_is_still_up_after_fuzzing(fuzz_server):
    assert httpx.get(fuzz_server + "/healthz").status_code == 200
    assert httpx.get(fuzz_server + "/readyz").status_code == 200


# -- protocol messages ---------------------------------------------------------------------------

ids = st.lists(st.integers(0, 2**31 - 1), max_size=64)


@given(position=st.integers(0, 10**9), tokens=ids, sid=st.text(min_size=1, max_size=128))
def test_append_round_trips(position, tokens, sid):
    req = AppendRequest(session_id=sid, position=position, tokens=tokens)
    assert AppendRequest.model_validate_json(req.model_dump_json()) == req


@given(text=st.text(max_size=200), offset=st.integers(0, 10**6))
def test_text_append_round_trips(text, offset):
    req = AppendRequest(session_id="s", position=0, text=text, text_offset=offset)
    assert AppendRequest.model_validate_json(req.model_dump_json()) == req


@given(
    tokens=st.lists(st.integers(0, 10**6), max_size=40),
    nxt=st.none() | st.integers(0, 10**6),
    text=st.text(max_size=50),
    finished=st.booleans(),
)
def test_append_result_round_trips(tokens, nxt, text, finished):
    res = AppendResult(session_id="s", appended=len(tokens), next_token=nxt, text=text, tokens=tokens, position=len(tokens), finished=finished)
    assert AppendResult.model_validate_json(res.model_dump_json()) == res


@given(tokens=st.lists(st.integers(-(2**40), 2**40), max_size=8), text=st.none() | st.text(max_size=8))
def test_append_refuses_bad_payloads(tokens, text):
    """Ids must be non-negative int32; exactly one of tokens / text."""
    bad_ids = any(t < 0 or t >= 2**31 for t in tokens)
    try:
        AppendRequest(session_id="s", position=0, tokens=tokens, text=text, text_offset=0)
    except ValidationError:
        return
    assert not bad_ids and text is None


@given(resume=st.lists(st.integers(0, 2**31 - 1), max_size=20), text=st.text(min_size=1, max_size=40))
def test_open_with_resume_round_trips(resume, text):
    req = OpenSession(prompt_text=text, resume_tokens=resume or None)
    assert OpenSession.model_validate_json(req.model_dump_json()) == req


@given(draft=st.text(max_size=300), offset=st.integers(0, 10**6), eos=st.booleans())
def test_verify_text_round_trips(draft, offset, eos):
    req = VerifyTextRequest(session_id="s", position=0, text_offset=offset, draft_text=draft, draft_eos=eos)
    assert VerifyTextRequest.model_validate_json(req.model_dump_json()) == req


@given(
    code=st.sampled_from(["bad_request", "unknown_session", "wrong_position", "too_large", "unauthorized",
                          "rate_limited", "session_limit", "session_evicted", "capacity", "not_ready"]),
    message=st.text(max_size=80),
    retry=st.none() | st.floats(0.001, 3600),
)
def test_errors_survive_the_wire(code, message, retry):
    """An error keeps its class, status and Retry-After through ErrorReply JSON."""
    err = gateway_error(code, message, detail=None if retry is None else {"retry_after_s": retry}, retry_after_s=retry)
    back = from_reply(ErrorReply.model_validate_json(err.to_reply().model_dump_json()))
    assert type(back) is type(err) and back.status == err.status and back.code == code and back.message == message
    assert back.retry_after_s == retry


@given(replica=st.none() | st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True), auth=st.booleans(), batching=st.booleans())
@settings(max_examples=25)
def test_gateway_info_round_trips(replica, auth, batching):
    info = GatewayInfo(
        model="m", tokenizer_fingerprint="f" * 24, eos_token_ids=[1], vocab_size=10, max_draft_tokens=4,
        max_prompt_tokens=10, max_new_tokens=10, replica=replica, auth=auth, batching=batching,
    )
    assert GatewayInfo.model_validate_json(info.model_dump_json()) == info


def test_stateful_open_verify_append_close(fuzz_server):
    """schemathesis's state machine over the schema's links (open -> verify / append -> close):
    sequences of calls on real session ids, bodies fuzzed around the linked fields; never a 5xx."""
    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")

    @schema.hook
    def map_body(ctx, body):
        # an open is the door to every link: keep its generated prompt text when it has one,
        # and the rest valid, so that sessions really open and their links are followed
        if ctx.operation.path == "/v1/sessions" and isinstance(body, dict):
            text = body.get("prompt_text")
            return {"type": "open", "prompt_text": text if isinstance(text, str) and text.strip() else "The", "max_new_tokens": 8}
        return body

    Machine = schema.as_state_machine()
    seen: set[tuple[str, int]] = set()

    class Checked(Machine):
        def validate_response(self, response, case, **kwargs):
            seen.add((case.path, response.status_code))
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"

    Checked.run(settings=settings(max_examples=20, stateful_step_count=6, deadline=None,
                                  suppress_health_check=list(HealthCheck), derandomize=True, database=None))
    # the links were followed: sessions opened, then verified or appended to on their real ids
    assert ("/v1/sessions", 200) in seen
    assert {("/v1/sessions/verify", 200), ("/v1/sessions/append", 200), ("/v1/sessions/close", 200)} & seen, seen
    assert httpx.get(fuzz_server + "/healthz").status_code == 200
