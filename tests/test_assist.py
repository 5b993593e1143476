"""assist: the device writes; the cloud supplies only the tokens the token router escalates."""

import pytest

from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.transport import InProcessTransport
from tandem.sdk import Client

from .conftest import run

PROMPT = "Once upon a time"


def _alone(lm, n):
    return list(generate_alone(lm, lm.tokenizer.prompt_tokens(PROMPT, chat=False), n))


def _assist(gateway, drafter, threshold, n=24, router="confidence"):
    async def go():
        async with Client(drafter=drafter, gateway=InProcessTransport(gateway)) as c:
            return await c.generate(PROMPT, mode="assist", max_new_tokens=n, chat=False,
                                    token_router=router, assist_threshold=threshold)

    return run(go())


def test_never_escalating_is_the_device_alone(tiny_gateway):
    rec = _assist(tiny_gateway, "tiny-llama-b", threshold=0.0)
    assert rec.tokens == _alone(load_model("tiny-llama-b"), 24)
    assert rec.usage.rounds == 0 and rec.usage.cloud_tokens == 0


def test_always_escalating_is_the_cloud_alone(tiny_gateway):
    rec = _assist(tiny_gateway, "tiny-llama-b", threshold=1.01)
    assert rec.tokens == _alone(tiny_gateway.lm, 24)
    assert rec.usage.rounds == 24 and rec.usage.cloud_tokens == 24 and rec.usage.local_tokens == 0


@pytest.mark.parametrize("router", ["confidence", "entropy"])
def test_a_threshold_in_between_mixes(tiny_gateway, router):
    rec = _assist(tiny_gateway, "tiny-llama-b", threshold=0.2, n=40, router=router)
    assert len(rec.tokens) == 40
    assert rec.usage.local_tokens + rec.usage.cloud_tokens == 40
    assert rec.decision["token_router"] == router


def test_assist_across_tokenizers_always_escalating_is_the_cloud_text(text_gateway):
    from tandem.local_runtime.models import LoadedModel, tiny_llama

    from .test_text_space import pair_tokenizer

    tok = pair_tokenizer()
    drafter = LoadedModel("tiny-pair", tiny_llama(5, 64, 2, 4, len(tok.vocab)), tok, "random init")
    rec = _assist(text_gateway, drafter, threshold=1.01, n=20)
    target = text_gateway.lm
    assert rec.text == target.tokenizer.text(_alone(target, 20))
    assert rec.usage.cloud_tokens == rec.usage.rounds >= 1


def test_assist_reopens_an_evicted_session(tiny_gateway):
    """The gateway drops the session mid-generation; the device opens a new one with everything
    so far and carries on: with every token escalated the output is still the cloud's own."""

    async def go():
        async with Client(drafter="tiny-llama-b", gateway=InProcessTransport(tiny_gateway)) as c:
            gen = c.stream(PROMPT, mode="assist", max_new_tokens=20, chat=False, assist_threshold=1.01)
            dropped = False
            async for _ in gen:
                if not dropped and len(gen.tokens) >= 5:
                    for session in list(tiny_gateway.sessions._sessions.values()):
                        tiny_gateway.sessions._evict(session, "test")
                    dropped = True
            return gen.record

    rec = run(go())
    assert rec.tokens == _alone(tiny_gateway.lm, 20)
    assert rec.usage.rounds == 20


def test_assist_writes_with_the_drafters_own_backend(tiny_gateway):
    """A drafter on another backend (here the lean int8 loop) writes the device's tokens: never
    escalating gives exactly that backend's own greedy output."""
    from tandem.local_runtime.backends import drafter_engine, load_drafter

    rec = _assist(tiny_gateway, "tiny-llama-b@torch-int8", threshold=0.0)
    model = load_drafter("tiny-llama-b", "torch-int8")
    engine = drafter_engine(model, "torch-int8")
    engine.append(model.tokenizer.prompt_tokens(PROMPT, chat=False))
    alone = []
    for _ in range(24):
        t = int(engine.next_logits().argmax())
        engine.append([t])
        alone.append(t)
    assert rec.tokens == alone


def test_the_reward_router_needs_a_torch_drafter(tiny_gateway):
    from tandem.protocols.errors import TandemError

    with pytest.raises(TandemError, match="hidden state"):
        _assist(tiny_gateway, "tiny-llama-b@torch-int8", threshold=0.5, router="reward")
