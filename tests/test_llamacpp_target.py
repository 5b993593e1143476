"""The gateway's llama.cpp target: sessions as sequences of one context, verified in shared
`llama_decode` calls, lossless against the same model decoding alone."""

import asyncio

import numpy as np
import pytest

from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import RateLimitError, RequestTooLargeError
from tandem.protocols.messages import CloseSession, OpenSession, VerifyRequest
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.service import Gateway, GatewayLimits
from tandem.sdk import Client

from .conftest import run

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time", "1, 2, 3,",
           "A prompt longer than two of the target's batched prefill pieces of sixteen tokens."]


@pytest.fixture(scope="module")
def target_model(tmp_path_factory):
    from tandem.local_runtime.backends.gguf_writer import write_llama_gguf
    from tandem.local_runtime.backends.llamacpp import LlamaCppModel

    lm = load_model("tiny-llama", progress=False)
    path = write_llama_gguf(lm, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    # the gateway's split (prompt batched in pieces of 16, then a token a micro-batch): the
    # reference decodes as the gateway does, and prompts of more than one piece are covered
    return LlamaCppModel("tiny-llama", path, lm.tokenizer, n_ctx=512, n_threads=1, n_batch=16, prompt_batched=True)


@pytest.fixture(scope="module")
def gateway(target_model):
    from tandem.remote_gateway.llamacpp_target import LlamaCppTarget

    target = LlamaCppTarget(target_model, max_sessions=8, ctx_per_session=512, n_threads=1)
    gw = Gateway(backend=target, limits=GatewayLimits(max_sessions=8))
    yield gw
    gw.close()


def _alone(model, prompt, n):
    return list(generate_alone(model, model.tokenizer.prompt_tokens(prompt, chat=False), n))


def test_batched_rows_equal_one_token_rows(gateway, target_model):
    """Rows of a decode shared by several sessions equal the same positions decoded one token at
    a time by the model alone (one token per micro-batch, a KV stream per sequence), up to float
    rounding far inside the tie margin, so the tie rule keeps the two in step."""
    target = gateway.backend
    prompt = target_model.tokenizer.prompt_tokens(PROMPTS[0], chat=False)
    alone = target_model.new_engine()
    alone.prefill(prompt)
    rows_alone = []
    for t in [65, 66, 67, 68]:
        rows_alone.append(alone.step(t).numpy())
    sessions = [target.new_engine() for _ in range(3)]
    for s in sessions:  # as the gateway does it: the prompt filled, then a block verified with the others
        s.append(prompt[:-1])
        target.fill(s, len(prompt) - 1)
        s.append([prompt[-1], 65, 66, 67, 68])
    out = target.forward(sessions)
    for s in sessions:
        s.release()
    for o in out:
        assert np.abs(o[1:].numpy() - np.stack(rows_alone)).max() < target_model.tie_margin / 4


@pytest.mark.parametrize("drafter,k", [("tiny-llama", 4), ("tiny-llama-b", 3)])
def test_speculative_over_llama_cpp_sessions_is_lossless(gateway, target_model, drafter, k):
    async def go():
        async with Client(drafter=drafter, gateway=InProcessTransport(gateway), draft_len=k, progress=False) as c:
            return await asyncio.gather(*[c.generate(p, max_new_tokens=20, chat=False) for p in PROMPTS])

    for prompt, rec in zip(PROMPTS, run(go())):
        assert rec.tokens == _alone(target_model, prompt, 20), prompt
        assert rec.usage.rounds >= 1


def test_cloud_mode_streams_the_target_alone(gateway, target_model):
    async def go():
        async with Client(drafter=None, gateway=InProcessTransport(gateway), mode="cloud") as c:
            return await asyncio.gather(*[c.generate(p, max_new_tokens=12, chat=False) for p in PROMPTS])

    for prompt, rec in zip(PROMPTS, run(go())):
        assert rec.tokens == _alone(target_model, prompt, 12)


def test_sampling_runs_on_full_rows(gateway):
    async def go():
        async with Client(drafter="tiny-llama", gateway=InProcessTransport(gateway), draft_len=3, progress=False) as c:
            return await c.generate(PROMPTS[1], max_new_tokens=16, temperature=0.8, seed=3, chat=False)

    rec = run(go())
    assert len(rec.tokens) == 16 and rec.usage.rounds >= 1


def test_a_session_longer_than_its_kv_stream_is_refused(gateway, target_model):
    async def go():
        t = InProcessTransport(gateway)
        await t.request(OpenSession(prompt_tokens=[256, 70], tokenizer_fingerprint=target_model.tokenizer.fingerprint,
                                    max_new_tokens=600))

    with pytest.raises(RequestTooLargeError, match="512 tokens a session"):
        run(go())


def test_sequences_are_a_pool_given_back_at_close(gateway, target_model):
    fp = target_model.tokenizer.fingerprint

    async def go():
        t = InProcessTransport(gateway)
        opened = [await t.request(OpenSession(prompt_tokens=[256, 70 + i], tokenizer_fingerprint=fp)) for i in range(8)]
        with pytest.raises(RateLimitError):  # every sequence of the context is taken
            await t.request(OpenSession(prompt_tokens=[256, 90], tokenizer_fingerprint=fp))
        for o in opened:
            await t.request(CloseSession(session_id=o.session_id))
        again = await t.request(OpenSession(prompt_tokens=[256, 70], tokenizer_fingerprint=fp))
        r = await t.request(VerifyRequest(session_id=again.session_id, position=again.position, draft_tokens=[], draft_probs=[]))
        await t.request(CloseSession(session_id=again.session_id))
        return r

    r = run(go())
    assert r.tokens == [next(generate_alone(target_model, [256, 70], 1))]


def test_the_prompt_split_is_batched_pieces_aligned_at_zero_then_single_tokens():
    from tandem.local_runtime.backends.llamacpp import split_points

    assert split_points(0, 40, 39, 16) == [(0, 16), (16, 32), (32, 39), (39, 40)]
    assert split_points(16, 39, 39, 16) == [(16, 32), (32, 39)]  # a fill that resumes a prompt
    assert split_points(39, 42, 39, 16) == [(39, 40), (40, 41), (41, 42)]  # verification: a token a call
    assert split_points(0, 1, 0, 16) == [(0, 1)]  # a one-token prompt
    assert split_points(10, 12, 39, 16) == [(10, 12)]


def test_a_long_prompt_fills_batched_and_stays_exact(gateway, target_model):
    """More than one prefill piece: the session's rows after the prompt equal the model alone
    under the same split, and the canonical recomputation agrees with both."""
    target = gateway.backend
    prompt = target_model.tokenizer.prompt_tokens(PROMPTS[-1], chat=False)
    assert len(prompt) > 2 * target.n_batch
    alone = target_model.new_engine()
    rows_alone = [alone.prefill(prompt).numpy()] + [alone.step(t).numpy() for t in (65, 66, 67)]
    s = target.new_engine()
    s.append(prompt)
    for upto in range(target.prefill_chunk, len(prompt) - 1, target.prefill_chunk):
        target.fill(s, upto)
    target.fill(s, len(prompt) - 1)
    assert s.batched_upto == len(prompt) - 1
    s.append([65, 66, 67])
    rows = target.forward([s])[0].numpy()
    np.testing.assert_array_equal(rows, np.stack(rows_alone))
    np.testing.assert_array_equal(s.fresh_logits(len(prompt) + 3).numpy(), rows[-1])
    s.release()
