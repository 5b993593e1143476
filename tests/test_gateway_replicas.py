"""Scaling out: two replicas behind a sticky router. Session ids name their replica, every
request of a session reaches it, and a client through the router gets the target's output."""

import asyncio

import httpx
import pytest

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.messages import OpenSession
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.replicas import StickyRouter, discover
from tandem.remote_gateway.service import Gateway
from tandem.remote_gateway.sessions import replica_of
from tandem.sdk import Client
from tandem.sdk.bench.gateway import serving

from .conftest import run, serve_in_thread


def test_replica_of():
    assert replica_of("s_r1.abcDEF-_x") == "r1"
    assert replica_of("s_us-east-2.x") == "us-east-2"
    for bad in ("s_nope", "s_.x", "s_r1.", "x_r1.abc", ""):
        assert replica_of(bad) is None


@pytest.fixture(scope="module")
def cluster(tiny_target):
    a, b = Gateway(tiny_target, replica_id="ra"), Gateway(tiny_target, replica_id="rb")
    with serve_in_thread(create_app(a)) as url_a, serve_in_thread(create_app(b)) as url_b:
        replicas = discover([url_a, url_b])
        assert replicas == {"ra": url_a, "rb": url_b}
        router = StickyRouter(replicas)
        with serving(router.app, lifespan="on") as url:
            yield url, router, a, b
    a.close()
    b.close()


def test_sessions_stay_on_their_replica(cluster, tiny_target):
    url, router, a, b = cluster

    async def one(prompt):
        async with Client(drafter="tiny-llama-b", gateway=url, draft_len=3) as c:
            return await c.generate(prompt, max_new_tokens=16, chat=False)

    async def go():
        return await asyncio.gather(*(one(p) for p in ["Hello", "abc", "The fox", "1 2 3"]))

    before = a.stats["opened"], b.stats["opened"]
    recs = run(go())
    for prompt, rec in zip(["Hello", "abc", "The fox", "1 2 3"], recs):
        assert rec.tokens == list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens(prompt, chat=False), 16))
    # opens were spread over both replicas, and each verify found its session where it was opened
    assert a.stats["opened"] > before[0] and b.stats["opened"] > before[1]
    assert a.stats["errors"] == b.stats["errors"] == 0


def test_a_session_id_routes_by_its_prefix(cluster, tiny_target):
    url, router, a, b = cluster
    body = OpenSession(prompt_tokens=[256, 65], tokenizer_fingerprint=tiny_target.tokenizer.fingerprint).model_dump(mode="json")
    opened = [httpx.post(url + "/v1/sessions", json=body) for _ in range(2)]
    replicas = {replica_of(r.json()["session_id"]) for r in opened}
    assert replicas == {"ra", "rb"}
    for r in opened:
        sid = r.json()["session_id"]
        assert r.headers["x-tandem-replica"] == replica_of(sid)
        # routed by the header alone, or by the body when a client sends no header
        v = httpx.post(url + "/v1/sessions/verify", json={"session_id": sid, "position": 2, "draft_tokens": [], "draft_probs": []})
        assert v.status_code == 200 and v.headers["x-tandem-replica"] == replica_of(sid)
        c = httpx.post(url + "/v1/sessions/close", json={"session_id": sid}, headers={"x-tandem-session": sid})
        assert c.status_code == 200
    # a session of a replica the router does not know, or sent to the wrong replica directly
    r = httpx.post(url + "/v1/sessions/verify", json={"session_id": "s_zz.abc", "position": 2, "draft_tokens": [], "draft_probs": []})
    assert r.status_code == 404 and r.json()["code"] == "unknown_session"
    sid = httpx.post(url + "/v1/sessions", json=body).json()["session_id"]
    other = next(u for rid, u in router.replicas.items() if rid != replica_of(sid))
    assert httpx.post(other + "/v1/sessions/close", json={"session_id": sid}).status_code == 404


def test_streams_pass_through_the_router(cluster, tiny_target):
    url, *_ = cluster

    async def go():
        async with Client(drafter="tiny-llama-b", gateway=url) as c:
            return await c.generate("Hey", mode="cloud", max_new_tokens=8, chat=False)

    rec = run(go())
    assert rec.tokens == list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens("Hey", chat=False), 8))
    out = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 4, "temperature": 0, "stream": True})
    assert out.status_code == 200 and out.text.rstrip().endswith("data: [DONE]")
