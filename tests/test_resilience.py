"""The client never strands the user: a lost reply is retried once, a vanished gateway is
replaced by the device model, and speculation resumes when the gateway is back."""


import pytest

from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import TransportError
from tandem.protocols.http import HttpTransport
from tandem.protocols.messages import VerifyRequest
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client
from tandem.sdk.bench.linksim import LinkProxy

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
