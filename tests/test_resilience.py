"""The client never strands the user: a lost reply is retried once, a lost session is re-opened
where it was, a vanished gateway is replaced by the device model, and speculation resumes when
the gateway is back."""

from contextlib import aclosing

import pytest

from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import (
    GatewayError,
    SessionEvictedError,
    TransportError,
    UnknownSessionError,
    WrongPositionError,
    gateway_error,
)
from tandem.protocols.http import HttpTransport
from tandem.protocols.messages import VerifyRequest
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client
from tandem.sdk.bench.linksim import LinkProxy
from tandem.sdk.runs.link import session_lost, unreachable

from .conftest import run, serve_in_thread

PROMPT = "The quick brown fox"


def _reference(lm, n, prefix=()):
    return list(generate_alone(lm, lm.tokenizer.prompt_tokens(PROMPT, chat=False) + list(prefix), n))


@pytest.fixture()
def own_server(tiny_target):
    """A gateway of this test's own, which the test may kill."""
    gw = Gateway(tiny_target)
    ctx = serve_in_thread(create_app(gw))
    url = ctx.__enter__()
    state = {"alive": True}

    def kill():
        if state["alive"]:
            state["alive"] = False
            ctx.__exit__(None, None, None)

    yield url, kill, gw
    kill()
    gw.close()


class LosesOneReply(HttpTransport):
    """Delivers the n-th verify to the gateway but loses its reply (the gateway did the work)."""

    def __init__(self, url, lose_at=2):
        super().__init__(url, timeout_s=10)
        self.verifies, self.lose_at = 0, lose_at

    async def request(self, msg):
        reply = await super().request(msg)
        if isinstance(msg, VerifyRequest):
            self.verifies += 1
            if self.verifies == self.lose_at:
                raise TransportError("reply lost in transit (simulated)")
        return reply


def test_lost_reply_is_retried_and_the_session_advances_once(own_server, tiny_target):
    url, _, gw = own_server

    async def go():
        async with Client(drafter="tiny-llama:int8", gateway=LosesOneReply(url), draft_len=3) as c:
            return await c.generate(PROMPT, max_new_tokens=30, chat=False)

    rec = run(go())
    assert rec.tokens == _reference(tiny_target, 30)
    assert gw.stats["replays"] == 1 and rec.usage.fallbacks == 0


@pytest.mark.parametrize("exc, lost, away", [
    (SessionEvictedError("evicted", detail={"reason": "replica"}), True, False),
    (UnknownSessionError("unknown"), True, False),
    (TransportError("connection refused"), True, True),
    (gateway_error("not_ready", "draining"), True, True),
    (GatewayError("bad gateway", status=502), True, True),
    (WrongPositionError("position"), False, False),
    (gateway_error("rate_limited", "slow down"), False, False),
    (gateway_error("internal", "crashed"), False, False),
])
def test_what_counts_as_a_lost_session(exc, lost, away):
    assert (session_lost(exc), unreachable(exc)) == (lost, away)


class DropsOneVerify(HttpTransport):
    """Never delivers the n-th verify (as when the replica holding its session dies with it in
    flight); everything else goes through."""

    def __init__(self, url, drop_at=3):
        super().__init__(url, timeout_s=10)
        self.verifies, self.drop_at = 0, drop_at

    async def request(self, msg):
        if isinstance(msg, VerifyRequest):
            self.verifies += 1
            if self.verifies == self.drop_at:
                raise TransportError("connection reset (simulated)")
        return await super().request(msg)


def test_a_verify_lost_in_transit_reopens_the_session_not_the_device(own_server, tiny_target):
    url, _, gw = own_server

    async def go():
        async with Client(drafter="tiny-llama-b", gateway=DropsOneVerify(url), draft_len=3, retries=0) as c:
            return await c.generate(PROMPT, max_new_tokens=30, chat=False)

    opened = gw.stats["opened"]
    rec = run(go())
    assert rec.tokens == _reference(tiny_target, 30)
    assert rec.usage.fallbacks == 0
    assert gw.stats["opened"] == opened + 2  # the first session, and the one re-opened where it was


class CutsTheStreamOnce(InProcessTransport):
    """Cuts the first generate stream after `after` chunks (as when the replica streaming it
    dies); keeps every generate request it was asked."""

    def __init__(self, gateway, after=3):
        super().__init__(gateway)
        self.after, self.asked = after, []

    async def stream(self, msg):
        self.asked.append(msg)
        async with aclosing(super().stream(msg)) as chunks:
            sent = 0
            async for chunk in chunks:
                if len(self.asked) == 1 and sent == self.after:
                    raise TransportError("stream cut (simulated)")
                sent += 1
                yield chunk


def test_a_cut_cloud_stream_is_asked_again_after_its_text(text_gateway):
    """Without a device model the client knows the answer only as text: it asks again with the
    text so far as `resume_text`, and the answer goes on unchanged."""

    async def go(transport):
        async with Client(drafter=None, gateway=transport) as c:
            return await c.generate(PROMPT, mode="cloud", max_new_tokens=24, chat=False)

    whole = run(go(InProcessTransport(text_gateway)))
    cut = CutsTheStreamOnce(text_gateway)
    rec = run(go(cut))
    assert (rec.text, rec.tokens) == (whole.text, whole.tokens)
    assert rec.usage.rounds == 2 and rec.usage.fallbacks == 0
    again = cut.asked[1]
    assert again.prompt_text == PROMPT and again.resume_text == whole.text[:3] and again.max_new_tokens == 21


def test_gateway_killed_mid_generation_the_device_finishes(own_server, tiny_target):
    url, kill, _ = own_server
    drafter = load_model("tiny-llama-b")

    async def go():
        async with Client(drafter=drafter, gateway=url, draft_len=3, timeout_s=5, retries=1, rejoin_every=8) as c:
            gen = c.stream(PROMPT, max_new_tokens=40, chat=False)
            cloud_tokens = None
            async for _ in gen:
                if cloud_tokens is None and len(gen.tokens) >= 6:
                    cloud_tokens = len(gen.tokens)
                    kill()  # between two rounds: the next verify finds nobody
            return gen, cloud_tokens

    gen, n = run(go())
    tokens = gen.tokens
    assert len(tokens) == 40 and gen.record.finish_reason == "length"
    assert gen.usage.fallbacks == 1
    # up to the failure: the target's own output; after it: the device model continuing exactly there
    assert tokens[:n] == _reference(tiny_target, n)
    assert tokens[n:] == _reference(drafter, 40 - n, prefix=tokens[:n])
    assert gen.usage.local_tokens >= 40 - n


def test_outage_then_recovery_resumes_speculation(tiny_server, tiny_target):
    port = int(tiny_server.rsplit(":", 1)[1])

    async def go(link):
        async with Client(drafter="tiny-llama:int8", gateway=link.url, draft_len=3, timeout_s=3, retries=0, rejoin_every=4) as c:
            gen = c.stream(PROMPT, max_new_tokens=80, chat=False)
            rounds_at_fallback = None
            async for _ in gen:
                if len(gen.tokens) >= 8 and not link.stats.resets and rounds_at_fallback is None and not gen.usage.fallbacks:
                    link.outage(3600)
                if gen.usage.fallbacks and rounds_at_fallback is None:
                    rounds_at_fallback = gen.usage.rounds
                    link.restore()
            return gen, rounds_at_fallback

    with LinkProxy(port) as link:
        gen, rounds_at_fallback = run(go(link))
    assert gen.usage.fallbacks == 1
    assert gen.usage.rounds > rounds_at_fallback  # speculation came back
    assert len(gen.tokens) == 80


def test_unreachable_gateway_with_fallback_error_raises():
    async def go():
        async with Client(drafter="tiny-llama", gateway="http://127.0.0.1:9", fallback="error", timeout_s=2, retries=0) as c:
            await c.generate(PROMPT, max_new_tokens=5, chat=False)

    with pytest.raises(TransportError, match="fallback"):
        run(go())


def test_unreachable_gateway_from_the_start_runs_locally(tiny_target):
    async def go():
        async with Client(drafter="tiny-llama", gateway="http://127.0.0.1:9", timeout_s=2, retries=0, probe_timeout_s=0.5) as c:
            return await c.generate(PROMPT, max_new_tokens=12, chat=False)

    rec = run(go())
    assert rec.tokens == _reference(tiny_target, 12) and rec.usage.fallbacks == 1 and rec.usage.rounds == 0


def test_cloud_mode_falls_back_to_the_device_when_the_gateway_is_away(tiny_target):
    async def go():
        async with Client(drafter="tiny-llama", gateway="http://127.0.0.1:9", timeout_s=2, retries=0) as c:
            return await c.generate(PROMPT, mode="cloud", max_new_tokens=12, chat=False)

    rec = run(go())
    assert rec.tokens == _reference(tiny_target, 12) and rec.usage.fallbacks == 1 and rec.usage.cloud_tokens == 0
