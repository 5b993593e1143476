"""Tenants cannot starve, overrun or crash each other: one test (or more) per class of defect a
gateway exposed to the internet must not have.

1. lock-out: at the session cap, idle sessions are evicted (from the key holding the most first),
   so a client that opens sessions and never closes them cannot hold everyone else out;
2. budgets: a generation reserves its tokens up front, so concurrent completions of one key stay
   within its budget; every path that holds KV counts as a session; a client that disconnects
   cancels its work;
3. races: close, evict and expire are serialised with in-flight work on the same session;
4. an over-long chat prompt is a 413 before any model object is built, with nothing of it logged;
5. the edge: slow clients are dropped without slowing others, bodies have a deadline, the
   connection count is capped, the key is checked before the body is read, Host allow-list, and
   OpenAI fields the gateway does not implement are refused by name.
"""

import asyncio
import itertools
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import GatewayError, RateLimitError, SessionEvictedError
from tandem.protocols.messages import AppendRequest, CloseSession, GenerateRequest, OpenSession, VerifyRequest
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.auth import KeyRing, Principal, hash_key
from tandem.remote_gateway.edge import EdgeLimits, host_allowed
from tandem.remote_gateway.limits import RateLimiter
from tandem.remote_gateway.service import Gateway, GatewayLimits

from .conftest import run, serve_in_thread


def _open(lm, prompt=(256, 72, 105), **kw) -> OpenSession:
    return OpenSession(prompt_tokens=list(prompt), tokenizer_fingerprint=lm.tokenizer.fingerprint, **kw)


def _keys(**limits) -> KeyRing:
    return KeyRing({hash_key(f"k-{name}"): Principal(name, **kw) for name, kw in limits.items()}, required=True)


# -- 1. one client cannot lock everyone out ------------------------------------------------------


def test_at_the_session_cap_an_idle_session_is_evicted_not_the_newcomer_refused(tiny_target):
    gw = Gateway(tiny_target, GatewayLimits(max_sessions=4))

    async def go():
        hog = [await gw.open(_open(tiny_target)) for _ in range(4)]  # anonymous, never closed
        newcomer = await gw.open(_open(tiny_target))  # before: 429 capacity for the whole TTL
        chunks = [c async for c in await gw.generate(GenerateRequest(prompt_text="hi", max_new_tokens=4))]
        assert sum(len(c.tokens) for c in chunks) == 4
        with pytest.raises(SessionEvictedError, match="session cap"):
            await gw.verify(VerifyRequest(session_id=hog[0].session_id, position=hog[0].position, draft_tokens=[], draft_probs=[]))
        r = await gw.verify(VerifyRequest(session_id=newcomer.session_id, position=newcomer.position, draft_tokens=[], draft_probs=[]))
        assert r.position == newcomer.position + 1

    run(go())
    assert gw.sessions.evicted >= 2 and len(gw.sessions) <= 4
    gw.close()


def test_eviction_takes_from_the_key_that_holds_the_most(tiny_target):
    gw = Gateway(tiny_target, GatewayLimits(max_sessions=4, max_sessions_per_key=4))
    alice, bob, carol = Principal("alice"), Principal("bob"), Principal("carol")

    async def go():
        a = [await gw.open(_open(tiny_target), alice) for _ in range(3)]
        b = await gw.open(_open(tiny_target), bob)  # bob's is the least recently used of all...
        await gw.verify(VerifyRequest(session_id=a[0].session_id, position=a[0].position, draft_tokens=[], draft_probs=[]), alice)
        await gw.open(_open(tiny_target), carol)
        # ... but alice holds three: her least recently used one goes, bob keeps his
        assert gw.sessions.get(b.session_id, "bob")
        with pytest.raises(SessionEvictedError):
            gw.sessions.get(a[1].session_id, "alice")
        assert gw.sessions.count("alice") == 2

    run(go())
    gw.close()


def test_default_per_key_cap_and_a_retry_after_that_says_when(tiny_target):
    now = [0.0]
    gw = Gateway(tiny_target, GatewayLimits(max_sessions=8, session_ttl_s=60), clock=lambda: now[0])
    assert gw.limits.per_key_sessions() == 2  # a quarter of max_sessions by default
    assert gw.sessions.kv_budget_bytes > 0  # and a KV budget from the machine's memory
    mallory = Principal("mallory")

    async def go():
        await gw.open(_open(tiny_target), mallory)
        now[0] = 20.0
        await gw.open(_open(tiny_target), mallory)
        with pytest.raises(RateLimitError) as exc:
            await gw.open(_open(tiny_target), mallory)
        assert exc.value.code == "session_limit"
        assert exc.value.retry_after_s == pytest.approx(40.0)  # her oldest idle session expires then
        await gw.open(_open(tiny_target), Principal("alice"))  # others are not affected

    run(go())
    gw.close()


# -- 2. budgets that hold --------------------------------------------------------------------------


def test_reserve_and_refund():
    now = [0.0]
    rl = RateLimiter(100, clock=lambda: now[0])
    alice = Principal("alice")
    assert rl.reserve(alice, 10, 50) == 50
    assert rl.reserve(alice, 10, 50) == 30  # what is left after the prompt
    with pytest.raises(RateLimitError):
        rl.reserve(alice, 1, 5)  # nothing left for even one token
    rl.refund(alice, 45)  # the first generation used 5 of its 50
    assert rl.reserve(alice, 5, 100) == 40
    assert RateLimiter(None).reserve(alice, 10**6, 77) == 77


def test_concurrent_chat_completions_stay_within_the_key_budget(tiny_target):
    gw = Gateway(tiny_target)
    with serve_in_thread(create_app(gw, _keys(alice={"tokens_per_minute": 200}))) as url:

        async def one(client):
            body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64, "temperature": 0}
            return await client.post(url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer k-alice"})

        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(one(c) for _ in range(8)))

        replies = run(go())
    gw.close()
    spent = sum(r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200)
    assert all(r.status_code in (200, 429) for r in replies), [r.text for r in replies]
    assert any(r.status_code == 200 for r in replies)
    assert spent <= 200  # before: 17x the budget (tokens charged after the fact, concurrently)


def test_generate_counts_against_the_per_key_session_cap(tiny_target):
    gw = Gateway(tiny_target)
    bob = Principal("bob", max_sessions=1)

    async def go():
        await gw.open(_open(tiny_target), bob)
        with pytest.raises(RateLimitError, match="1 open sessions"):
            await gw.generate(GenerateRequest(prompt_text="hi", max_new_tokens=4), bob)

    run(go())
    gw.close()


def test_a_client_that_disconnects_cancels_its_non_streaming_completion(words_pair):
    gw = Gateway(words_pair[0], GatewayLimits(max_new_tokens=4096))  # a target that never ends by itself
    with serve_in_thread(create_app(gw)) as url:
        body = {"model": "tiny-words", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 10
        while len(gw.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(gw.sessions) == 0  # closed on disconnect, not generated to the end
        steps = gw.stats["appends"]
        time.sleep(0.5)
        assert gw.stats["appends"] == steps < 4000
    gw.close()


# -- 3. close, evict and expire against in-flight work on one session ---------------------------

OPS = ("verify", "append", "close", "evict", "expire", "replay")
CLEAN = {"unknown_session", "session_evicted", "wrong_position", "session_finished"}


def test_every_pair_of_operations_on_one_session_races_cleanly(tiny_target):
    """Each pair of operations runs concurrently on one session, in both orders and with a few
    offsets, while another session decodes beside them: every reply is a result or one of the
    clean errors (never a crash), the session's books match its cache, and the bystander's
    output is the target's own."""
    now = [0.0]
    gw = Gateway(tiny_target, GatewayLimits(max_sessions=16, session_ttl_s=60), clock=lambda: now[0])
    bystander_prompt = [256, 84, 104, 101]

    async def bystander():
        opened = await gw.open(_open(tiny_target, bystander_prompt, max_new_tokens=40))
        out, pos = [], opened.position
        while True:
            r = await gw.append(AppendRequest(session_id=opened.session_id, position=pos, tokens=[]))
            out += r.tokens
            pos = r.position
            if r.finished:
                return out
            await asyncio.sleep(0)

    async def op(name: str, sid: str, pos: int, last: VerifyRequest, delay: int):
        for _ in range(delay):
            await asyncio.sleep(0)
        if name == "verify":
            return await gw.verify(VerifyRequest(session_id=sid, position=pos, draft_tokens=[70, 71, 72], draft_probs=[0.5] * 3))
        if name == "append":
            return await gw.append(AppendRequest(session_id=sid, position=pos, tokens=[73]))
        if name == "close":
            return await gw.close_session(CloseSession(session_id=sid))
        if name == "evict":
            return gw.sessions.evict_idle(sid)
        if name == "expire":
            session = gw.sessions._sessions.get(sid)
            if session is not None:
                session.last_used = now[0] - 61
            return gw.sessions.sweep()
        return await gw.verify(last)  # a retried request whose reply was lost

    async def pair(a: str, b: str, da: int, db: int):
        opened = await gw.open(_open(tiny_target))
        last = VerifyRequest(session_id=opened.session_id, position=opened.position, draft_tokens=[65], draft_probs=[0.5])
        first = await gw.verify(last)
        results = await asyncio.gather(
            op(a, opened.session_id, first.position, last, da), op(b, opened.session_id, first.position, last, db),
            return_exceptions=True,
        )
        for name, r in zip((a, b), results):
            if isinstance(r, BaseException):
                assert isinstance(r, GatewayError) and r.code in CLEAN, (a, b, da, db, name, repr(r))
        gw.sessions.sweep()  # an expiry that found the session busy happens now
        live = gw.sessions._sessions.get(opened.session_id)
        if live is not None:  # still open: its books match its cache, and it goes on
            assert live.gone is None and len(live.engine.tokens) == live.position
            r = await gw.verify(VerifyRequest(session_id=live.id, position=live.position, draft_tokens=[], draft_probs=[]))
            assert r.position == live.position
            await gw.close_session(CloseSession(session_id=live.id))

    async def go():
        side = asyncio.ensure_future(bystander())
        for a, b in itertools.combinations_with_replacement(OPS, 2):
            for da, db in ((0, 0), (0, 1), (1, 0), (0, 3)):
                await pair(a, b, da, db)
        return await side

    out = run(go())
    assert out == list(generate_alone(tiny_target, bystander_prompt, 40))
    assert len(gw.sessions) == 0 and gw.sessions._per_key == {}
    gw.close()


# -- 4. an over-long chat prompt ------------------------------------------------------------------


def test_an_over_long_chat_prompt_is_413_and_is_not_logged(tiny_target, caplog):
    gw = Gateway(tiny_target)
    with serve_in_thread(create_app(gw)) as url, caplog.at_level(logging.DEBUG):
        content = "ab" * 20_000  # 40,000 byte tokens: over the gateway's limit and the protocol's
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 413, r.text  # before: 500 and a reset connection
        assert "8192" in r.json()["error"]["message"]
        assert httpx.get(url + "/healthz").status_code == 200
    gw.close()
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    assert "abab" not in logged and "97, 98" not in logged
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


# -- 5. the edge -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_server(tiny_target):
    gw = Gateway(tiny_target)
    edge = EdgeLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_connections=8, metrics_need_key=True,
                      docs_need_key=True, allowed_hosts=["127.0.0.1", "*.example.com"])
    with serve_in_thread(create_app(gw, _keys(alice={}), edge)) as url:
        yield url, gw
    gw.close()


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_a_silent_client_is_dropped_without_slowing_others(edge_server):
    url, _ = edge_server
    slow = _raw(url)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end of the headers
    t0 = time.monotonic()
    assert httpx.get(url + "/healthz").status_code == 200  # others are served meanwhile
    assert time.monotonic() - t0 < 0.4
    assert slow.recv(1024) == b""  # dropped at the header deadline
    assert time.monotonic() - t0 < 3
    slow.close()


def test_a_body_that_does_not_arrive_in_time_is_408(edge_server):
    url, _ = edge_server
    s = _raw(url)
    s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k-alice\r\n"
              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt")
    reply = b""
    while b'"code"' not in reply:
        chunk = s.recv(4096)
        assert chunk, reply
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in reply.replace(b" ", b"")
    s.close()


def test_the_key_is_checked_before_the_body_is_read(edge_server):
    url, _ = edge_server
    s = _raw(url)
    s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n")
    reply = s.recv(4096).decode()  # answered without waiting for (or reading) 900 kB
    assert reply.startswith("HTTP/1.1 401")
    s.close()


def test_connections_over_the_cap_are_refused(edge_server):
    url, _ = edge_server
    held = []
    for _ in range(12):  # each starts a request and holds it (its body never comes)
        s = _raw(url)
        s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k-alice\r\nContent-Length: 10\r\n\r\n")
        held.append(s)
    refused = 0
    for s in held:
        s.settimeout(0.2)
        try:
            refused += s.recv(64).startswith(b"HTTP/1.1 503")
        except TimeoutError:
            pass
    assert refused >= 12 - 8  # beyond the cap of 8: 503 at once, and closed
    for s in held:
        s.close()
    assert httpx.get(url + "/healthz").status_code == 200


def test_metrics_docs_and_hosts(edge_server):
    url, _ = edge_server
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"authorization": "Bearer k-alice"}).status_code == 200
    assert httpx.get(url + "/openapi.json").status_code == 401
    r = httpx.get(url + "/healthz", headers={"host": "evil.test"})
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert httpx.get(url + "/healthz", headers={"host": "api.example.com"}).status_code == 200
    assert host_allowed("127.0.0.1:8000", ["127.0.0.1"]) and not host_allowed("example.com", ["*.example.com"])


def test_the_guarded_protocol_drops_a_reader_that_stalls():
    """The stalled-reader deadline, driven directly: the transport's buffer stays full (uvicorn
    pauses writing) for longer than send_timeout_s, and the connection is aborted."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from tandem.remote_gateway.edge import GuardedH11Protocol

    class Transport:
        aborted = False

        def get_extra_info(self, name, default=None):
            return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

        def is_closing(self):
            return self.aborted

        def abort(self):
            self.aborted = True

        def set_protocol(self, p): ...

        def close(self):
            self.aborted = True

    async def go():
        proto_cls = type("P", (GuardedH11Protocol,), {"send_timeout_s": 0.05, "header_timeout_s": 5})
        config = Config(app=lambda *a: None)
        proto = proto_cls(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        proto.connection_made(transport)
        proto.pause_writing()
        await asyncio.sleep(0.2)
        assert transport.aborted
        proto.connection_lost(None)

    run(go())


def test_openai_fields_the_gateway_does_not_implement_are_refused_by_name(tiny_server):
    base = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for field, value in [("functions", [{"name": "f"}]), ("tool_choice", "required"),
                         ("n", 2), ("logit_bias", {"5": 1.0}), ("presence_penalty", 0.5), ("frequency_penalty", 1.0),
                         ("response_format", {"type": "xml"}), ("audio", {}), ("frobnicate", 1)]:
        r = httpx.post(tiny_server + "/v1/chat/completions", json={**base, field: value})
        assert r.status_code == 400, (field, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"], (field, err)
    ok = {**base, "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u1", "logit_bias": {}}
    assert httpx.post(tiny_server + "/v1/chat/completions", json=ok).status_code == 200


def test_logprobs_are_the_targets_own(tiny_server, tiny_gateway):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    r = httpx.post(tiny_server + "/v1/chat/completions", json=body).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # greedy: the chosen token is the likeliest one
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)
    stream = httpx.post(tiny_server + "/v1/chat/completions", json={**body, "stream": True}).text
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    streamed = [e for ev in events for ch in ev["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)


def test_concurrent_clients_beside_a_stalled_one(edge_server, tiny_target):
    """A client that sends part of a body and stalls holds no lock and no worker: sessions of
    other clients open, verify and close meanwhile."""
    url, _ = edge_server
    stalled = _raw(url)
    stalled.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k-alice\r\nContent-Length: 50\r\n\r\n{")
    errors = []

    def client():
        try:
            h = {"authorization": "Bearer k-alice"}
            o = httpx.post(url + "/v1/sessions", json=_open(tiny_target).model_dump(mode="json"), headers=h, timeout=10).json()
            v = {"session_id": o["session_id"], "position": o["position"], "draft_tokens": [66], "draft_probs": [0.5]}
            assert httpx.post(url + "/v1/sessions/verify", json=v, headers=h, timeout=10).status_code == 200
            httpx.post(url + "/v1/sessions/close", json={"session_id": o["session_id"]}, headers=h, timeout=10)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    stalled.close()
