"""Limits: body size, sessions per key, tokens per minute (429 + Retry-After), the KV-cache
budget with LRU eviction (410 session_evicted), the TTL, and the SDK re-opening evicted sessions."""


import httpx
import pytest

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import RateLimitError, RequestTooLargeError, SessionEvictedError
from tandem.protocols.messages import OpenSession, VerifyRequest
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.auth import KeyRing, Principal, hash_key
from tandem.remote_gateway.limits import RateLimiter, TokenBucket
from tandem.remote_gateway.service import Gateway, GatewayLimits
from tandem.sdk import Client

from .conftest import run, serve_in_thread


def _open(tiny_target, prompt=(256, 72, 105), **kw) -> OpenSession:
    return OpenSession(prompt_tokens=list(prompt), tokenizer_fingerprint=tiny_target.tokenizer.fingerprint, **kw)


def test_token_bucket_exact():
    b = TokenBucket(capacity=600, level=600, updated=0.0)  # 10 tokens per second
    assert b.wait_for(600, 0.0) == 0.0
    b.level -= 600
    assert b.wait_for(50, 0.0) == pytest.approx(5.0)
    assert b.wait_for(50, 5.0) == 0.0  # refilled 50 in 5 s
    b.level -= 50
    assert b.wait_for(1, 100.0) == 0.0 and b.level == 600  # capped at a minute's worth


def test_rate_limiter_refuses_then_recovers():
    now = [0.0]
    rl = RateLimiter(60, clock=lambda: now[0])  # one token per second
    alice = Principal("alice")
    rl.charge(alice, 60)
    with pytest.raises(RateLimitError) as exc:
        rl.charge(alice, 10)
    assert exc.value.status == 429 and exc.value.retry_after_s == pytest.approx(10.0)
    assert "alice" in exc.value.message and "60 tokens per minute" in exc.value.message
    with pytest.raises(RequestTooLargeError):
        rl.charge(alice, 61)  # more than a minute's worth can never pass
    rl.charge(Principal("bob"), 60)  # keys are independent
    rl.charge(alice, 5, strict=False)  # a running stream goes into debt
    now[0] = 14.0
    with pytest.raises(RateLimitError):
        rl.charge(alice, 10)  # 14 - 5 = 9 available
    now[0] = 15.0
    rl.charge(alice, 10)
    RateLimiter(None).charge(alice, 10**9)  # no limit configured


@pytest.fixture(scope="module")
def limited(tiny_target):
    gw = Gateway(tiny_target, GatewayLimits(max_sessions_per_key=2, tokens_per_minute_per_key=400, max_body_bytes=4096))
    keys = KeyRing({hash_key("k-alice"): Principal("alice"), hash_key("k-bob"): Principal("bob", tokens_per_minute=30)}, required=True)
    with serve_in_thread(create_app(gw, keys)) as url:
        yield url, gw
    gw.close()


def test_body_over_the_limit_is_413_with_or_without_length(limited):
    url, _ = limited
    h = {"authorization": "Bearer k-alice", "content-type": "application/json"}
    r = httpx.post(url + "/v1/sessions", content=b"x" * 5000, headers=h)
    assert r.status_code == 413 and "5000" in r.json()["message"]
    # chunked: no content-length, counted as it arrives
    r = httpx.post(url + "/v1/sessions", content=(b"x" * 1000 for _ in range(10)), headers=h)
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    assert httpx.get(url + "/healthz").status_code == 200


def test_sessions_per_key_429(limited, tiny_target):
    url, _ = limited
    h = {"authorization": "Bearer k-alice"}
    body = _open(tiny_target).model_dump(mode="json")
    sids = [httpx.post(url + "/v1/sessions", json=body, headers=h).json()["session_id"] for _ in range(2)]
    r = httpx.post(url + "/v1/sessions", json=body, headers=h)
    assert r.status_code == 429 and r.json()["code"] == "session_limit"
    assert "alice" in r.json()["message"] and "2 open sessions" in r.json()["message"]
    assert int(r.headers["retry-after"]) >= 1
    httpx.post(url + "/v1/sessions/close", json={"session_id": sids[0]}, headers=h)
    assert httpx.post(url + "/v1/sessions", json=body, headers=h).status_code == 200
    for sid in sids[1:]:
        httpx.post(url + "/v1/sessions/close", json={"session_id": sid}, headers=h)


def test_tokens_per_minute_429_with_retry_after(limited, tiny_target):
    url, _ = limited
    h = {"authorization": "Bearer k-bob"}  # 30 tokens per minute
    body = _open(tiny_target, prompt=[256] + [65] * 19).model_dump(mode="json")  # 20 tokens
    opened = httpx.post(url + "/v1/sessions", json=body, headers=h)
    assert opened.status_code == 200
    r = httpx.post(url + "/v1/sessions", json=body, headers=h)
    assert r.status_code == 429 and r.json()["code"] == "rate_limited"
    assert "30 tokens per minute" in r.json()["message"]
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60 and r.json()["detail"]["retry_after_s"] > 0
    # a verify costs k + 1 tokens: 10 tokens are left, so 9 drafts pass and 10 more do not
    sid, pos = opened.json()["session_id"], opened.json()["position"]
    too_many = {"session_id": sid, "position": pos, "draft_tokens": [66] * 10, "draft_probs": [0.5] * 10}
    assert httpx.post(url + "/v1/sessions/verify", json=too_many, headers=h).status_code == 429
    # the refused verify left the session as it was
    ok = {"session_id": sid, "position": pos, "draft_tokens": [66] * 4, "draft_probs": [0.5] * 4}
    assert httpx.post(url + "/v1/sessions/verify", json=ok, headers=h).status_code == 200
    # more than a minute's worth can never pass: 413, not 429
    big = _open(tiny_target, prompt=[256] + [65] * 40).model_dump(mode="json")
    assert httpx.post(url + "/v1/sessions", json=big, headers=h).status_code == 413


def test_kv_budget_evicts_the_least_recently_used_idle_session(tiny_target):
    # a few sessions of this prompt fit the budget (tiny-llama: 1 KiB of keys and values per token)
    gw = Gateway(tiny_target, GatewayLimits(kv_cache_budget_mb=0.15))

    async def go():
        t = InProcessTransport(gw)
        prompt = [256] + [65] * 40
        first = await t.request(_open(tiny_target, prompt=prompt))
        per_session = gw.sessions.kv_bytes(gw.sessions.get(first.session_id))
        assert per_session > 0
        n = int(gw.sessions.kv_budget_bytes // per_session)
        opened = [first] + [await t.request(_open(tiny_target, prompt=prompt)) for _ in range(n + 1)]
        assert gw.sessions.kv_bytes_total() <= gw.sessions.kv_budget_bytes
        assert gw.sessions.evicted >= 1
        # the oldest went first; it learns why, and how to come back
        with pytest.raises(SessionEvictedError, match="evicted to free KV-cache memory") as exc:
            await t.request(VerifyRequest(session_id=first.session_id, position=first.position, draft_tokens=[], draft_probs=[]))
        assert exc.value.status == 410 and exc.value.code == "session_evicted"
        last = opened[-1]
        r = await t.request(VerifyRequest(session_id=last.session_id, position=last.position, draft_tokens=[], draft_probs=[]))
        assert r.position == last.position + 1
        # another key never learns the evicted session existed
        from tandem.protocols.errors import UnknownSessionError

        with pytest.raises(UnknownSessionError) as other:
            await gw.verify(VerifyRequest(session_id=first.session_id, position=1, draft_tokens=[], draft_probs=[]), Principal("eve"))
        assert not isinstance(other.value, SessionEvictedError)

    run(go())
    assert 'tandem_session_evictions_total{reason="memory"}' in gw.metrics.render().decode()
    gw.close()


def test_resume_tokens_reopen_in_the_same_state(tiny_gateway, tiny_target):
    """A session re-opened with the tokens generated so far continues exactly where it was."""
    prompt = tiny_target.tokenizer.prompt_tokens("Hello", chat=False)
    reference = list(generate_alone(tiny_target, prompt, 12))

    async def go():
        t = InProcessTransport(tiny_gateway)
        a = await t.request(_open(tiny_target, prompt=prompt, max_new_tokens=12))
        r = await t.request(VerifyRequest(session_id=a.session_id, position=a.position, draft_tokens=[], draft_probs=[]))
        got = list(r.tokens)
        b = await t.request(_open(tiny_target, prompt=prompt, max_new_tokens=12, resume_tokens=got))
        assert b.position == len(prompt) + len(got)
        pos = b.position
        while True:
            r = await t.request(VerifyRequest(session_id=b.session_id, position=pos, draft_tokens=[], draft_probs=[]))
            got += r.tokens
            pos = r.position
            if r.finished:
                return got, r.finish_reason

    got, reason = run(go())
    assert got == reference and reason == "length"


class _EvictingTransport(InProcessTransport):
    """Evicts the session behind a verify every few verifies, as memory pressure would."""

    def __init__(self, gateway, every: int) -> None:
        super().__init__(gateway)
        self.every, self.count, self.evictions = every, 0, 0

    async def request(self, msg):
        if isinstance(msg, VerifyRequest):
            self.count += 1
            if self.count % self.every == 0:
                store = self.gateway.sessions
                store._evict(store.get(msg.session_id), "memory")
                self.evictions += 1
        return await super().request(msg)


@pytest.mark.parametrize("drafter", ["tiny-llama:int8", "tiny-llama-b"])
def test_sdk_reopens_evicted_sessions_transparently(tiny_gateway, tiny_target, drafter):
    transport = _EvictingTransport(tiny_gateway, every=3)

    async def go():
        async with Client(drafter=drafter, gateway=transport, draft_len=3) as c:
            return await c.generate("Once upon a time", max_new_tokens=30, chat=False)

    rec = run(go())
    reference = list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens("Once upon a time", chat=False), 30))
    assert transport.evictions >= 2
    assert rec.tokens == reference


def test_idle_sessions_expire_with_a_clear_error(tiny_target):
    now = [1000.0]
    gw = Gateway(tiny_target, GatewayLimits(session_ttl_s=60), clock=lambda: now[0])

    async def go():
        t = InProcessTransport(gw)
        opened = await t.request(_open(tiny_target))
        now[0] += 59  # idle, but not for long enough
        await t.request(VerifyRequest(session_id=opened.session_id, position=opened.position, draft_tokens=[], draft_probs=[]))
        now[0] += 61
        with pytest.raises(SessionEvictedError, match="expired after 60 s idle") as exc:
            await t.request(VerifyRequest(session_id=opened.session_id, position=opened.position + 1, draft_tokens=[], draft_probs=[]))
        assert "resume_tokens" in exc.value.message

    run(go())
    assert gw.sessions.expired == 1
    gw.close()
