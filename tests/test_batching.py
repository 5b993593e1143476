"""Batched verification: a packed forward over sessions with different cache lengths gives each
session the rows its own forward would (sliding-window layers included), and a gateway that
batches emits exactly the tokens of one that does not, and of the target alone."""

import asyncio
import random

import pytest
import torch

from tandem.local_runtime.models import LoadedModel, byte_tokenizer, load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.messages import AppendRequest, OpenSession, VerifyRequest
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.backends import TransformersBackend
from tandem.remote_gateway.batching import BatchingConfig, SessionEngine, forward_packed, install
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client

from .conftest import run


def _tiny_gemma() -> LoadedModel:
    """A Gemma 3 with a sliding window of 8 (shorter than the sequences below), so that the
    windowed layers' masks matter."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(cfg).eval()
    return LoadedModel("tiny-gemma", model, byte_tokenizer(320), "random init")


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma"])
def lm(request):
    return _tiny_gemma() if request.param == "tiny-gemma" else load_model("tiny-llama", progress=False)


def test_packed_forward_equals_each_sessions_own(lm):
    assert install(lm.model)
    rng = random.Random(7)
    prompts = [[rng.randrange(300) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    packed = [SessionEngine(lm) for _ in prompts]
    alone = [SessionEngine(lm) for _ in prompts]
    for e, p in zip(packed + alone, prompts + prompts):
        e.append(p)
        e.fill_cache(len(p) - 1)
    worst = 0.0
    for _ in range(6):
        drafts = [[rng.randrange(300) for _ in range(rng.randrange(0, 6))] for _ in prompts]
        for a, b, d in zip(packed, alone, drafts):
            a.append(d)
            b.append(d)
        rows_packed = forward_packed(lm.model, packed)
        rows_alone = [e.compute() for e in alone]
        for x, y in zip(rows_packed, rows_alone):
            assert x.shape == y.shape
            worst = max(worst, float((x - y).abs().max()))
            assert torch.equal(x.argmax(-1), y.argmax(-1))
        for a, b in zip(packed, alone):  # reject a random suffix on both, as verification does
            cut = rng.randrange(max(1, len(a.tokens) - 4), len(a.tokens) + 1)
            a.truncate(cut)
            b.truncate(cut)
            if a.cached == len(a.tokens):
                a.truncate_cache(cut - 1)
                b.truncate_cache(cut - 1)
    assert max(len(e.tokens) for e in packed) > 8  # past the sliding window
    assert worst < 1e-4  # float summation order only: far under the tie margin


def test_a_failed_pass_leaves_every_cache_as_it_was(lm):
    install(lm.model)
    engines = [SessionEngine(lm) for _ in range(3)]
    for i, e in enumerate(engines):
        e.append([256, 65 + i, 66, 67][: 2 + i])
        e.fill_cache(len(e.tokens) - 1)
    before = [(e.cached, [layer.keys.shape[-2] for layer in e.kv_cache().layers]) for e in engines]
    for e in engines:
        e.append([70, 71])
    calls = {"n": 0}
    layer = lm.model.model.layers[-1]

    def boom(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("injected")

    handle = layer.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            forward_packed(lm.model, engines)
    finally:
        handle.remove()
    assert calls["n"] == 1
    assert [(e.cached, [la.keys.shape[-2] for la in e.kv_cache().layers]) for e in engines] == before


PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4", "Once upon a time, in a land far away,", "abc", "Zz"]


async def _many_clients(gw: Gateway, drafters: list[str], n_tokens: int):
    async def one(i: int):
        async with Client(drafter=drafters[i % len(drafters)], gateway=InProcessTransport(gw), draft_len=1 + i % 4) as c:
            return await c.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=n_tokens, chat=False)

    return await asyncio.gather(*(one(i) for i in range(8)))


def test_batched_gateway_emits_the_target_alone_tokens(tiny_target):
    batched = Gateway(tiny_target, batching=BatchingConfig(enabled=True, window_ms=5))
    plain = Gateway(tiny_target, batching=BatchingConfig(enabled=False))
    drafters = ["tiny-llama:int8", "tiny-llama-b", "tiny-llama-c"]
    try:
        got = run(_many_clients(batched, drafters, 24))
        ref = run(_many_clients(plain, drafters, 24))
    finally:
        batched.close()
        plain.close()
    for i, (a, b) in enumerate(zip(got, ref)):
        alone = list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens(PROMPTS[i % len(PROMPTS)], chat=False), 24))
        assert a.tokens == b.tokens == alone, i
    # the load really was batched
    assert batched.batcher.batches > 0 and batched.batcher.batched_jobs / batched.batcher.batches > 1.5
    assert plain.batcher.batches == 0
    metrics = batched.metrics.render().decode()
    assert "tandem_verify_batch_size_bucket" in metrics and "tandem_verify_batch_size_count" in metrics


def test_tiny_gemma_gateway_batched_equals_alone():
    lm = _tiny_gemma()
    gw = Gateway(lm, batching=BatchingConfig(enabled=True, window_ms=5))
    prompts = [lm.tokenizer.prompt_tokens(p, chat=False) for p in PROMPTS]

    async def decode(i):  # draft-less verifies: one target step each, all sessions at once
        t = InProcessTransport(gw)
        opened = await t.request(OpenSession(prompt_tokens=prompts[i], tokenizer_fingerprint=lm.tokenizer.fingerprint, max_new_tokens=20))
        pos, out = opened.position, []
        while True:
            if i % 2:
                r = await t.request(AppendRequest(session_id=opened.session_id, position=pos, tokens=[]))
            else:
                r = await t.request(VerifyRequest(session_id=opened.session_id, position=pos, draft_tokens=[], draft_probs=[]))
            out += r.tokens
            pos = r.position
            if r.finished:
                return out

    async def go():
        return await asyncio.gather(*(decode(i) for i in range(len(prompts))))

    try:
        got = run(go())
    finally:
        gw.close()
    for p, out in zip(prompts, got):
        assert out == list(generate_alone(lm, p, 20))
    assert gw.batcher.batches > 0


def test_sampling_and_text_sessions_batch_alongside(tiny_target):
    """Sampled and cross-tokenizer sessions share passes with greedy ones and still finish."""
    from tandem.local_runtime.models import Tokenizer, tiny_llama

    other = Tokenizer(encode=lambda s: [1], decode=lambda ids: "", vocab={"a": 1}, eos_token_ids=[0])
    odd = LoadedModel("odd", tiny_llama(3, 32, 1, 2, 320), other, "test")
    gw = Gateway(tiny_target, batching=BatchingConfig(enabled=True, window_ms=5))

    async def go():
        async def sampled():
            async with Client(drafter="tiny-llama-b", gateway=InProcessTransport(gw)) as c:
                return await c.generate("x", max_new_tokens=12, temperature=0.8, seed=3, chat=False)

        async def text():
            async with Client(drafter=odd, gateway=InProcessTransport(gw)) as c:
                return await c.generate("x", max_new_tokens=12, chat=False)

        async def greedy():
            async with Client(drafter="tiny-llama:int8", gateway=InProcessTransport(gw)) as c:
                return await c.generate("x", max_new_tokens=12, chat=False)

        return await asyncio.gather(sampled(), text(), greedy(), greedy())

    try:
        s, t, g1, g2 = run(go())
    finally:
        gw.close()
    alone = list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens("x", chat=False), 12))
    assert t.tokens == g1.tokens == g2.tokens == alone
    assert len(s.tokens) == 12


def test_backend_without_batching_serves_one_at_a_time(tiny_target):
    backend = TransformersBackend(tiny_target, batching=False)
    assert not backend.batched
    gw = Gateway(backend=backend)
    assert not gw.info().batching
    gw.close()


def test_a_short_batch_waits_for_company_a_bounded_share_of_a_pass():
    from tandem.remote_gateway.batching import WAIT_SHARE, company_wait_s

    assert company_wait_s(20, None, 1, 4, 64) == 0.02  # no pass timed yet: the window
    assert company_wait_s(20, 0.17, 1, 2, 64) == 0.017  # a tenth of a 170 ms pass
    assert company_wait_s(20, 1.0, 1, 2, 64) == 0.02  # never over the window
    assert company_wait_s(20, 0.17, 2, 2, 64) == 0.0  # every live session is in
    assert company_wait_s(20, 0.17, 1, 1, 64) == 0.0  # a lone client is never delayed
    assert company_wait_s(20, 0.17, 4, 9, 4) == 0.0  # the batch is full
    assert company_wait_s(0, 0.17, 1, 2, 64) == 0.0  # switched off
    assert WAIT_SHARE * 0.17 == company_wait_s(50, 0.17, 1, 3, 64)
