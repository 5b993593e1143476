"""Batch invariance (local_runtime/invariant.py): the per-query attention is causal attention, the
probe catches kernels whose rows depend on the row count, and a bfloat16 model made invariant
gives the same logits bits however a sequence is split, so speculative decoding over it is exact
with no near-tie recomputation, batched or not."""

import random

import pytest
import torch
import torch.nn.functional as F

from tandem.local_runtime.draft import BF16_TIE_MARGIN
from tandem.local_runtime.invariant import chunks, invariant_attention_rows, make_batch_invariant, probe_linear
from tandem.local_runtime.models import LoadedModel, byte_tokenizer, load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.batching import SessionEngine, forward_packed, install, token_groups
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client

from .conftest import run
from .test_batching import _tiny_gemma


@pytest.mark.parametrize("window", [None, 5])
def test_per_query_attention_is_causal_attention(window):
    torch.manual_seed(0)
    q_len, cached = 7, 9
    q = torch.randn(1, 4, q_len, 16)
    k, v = torch.randn(1, 2, cached + q_len, 16), torch.randn(1, 2, cached + q_len, 16)
    got = invariant_attention_rows(q, k, v, scaling=0.25, window=window)
    pos = torch.arange(cached, cached + q_len)[:, None]
    kv = torch.arange(cached + q_len)[None, :]
    mask = (kv <= pos) & (kv > pos - window) if window else kv <= pos
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.25)
    assert got.shape == (1, q_len, 4, 16)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_probe_finds_the_row_count_where_a_kernel_changes():
    w = torch.randn(24, 16)

    def switches_at_five(x, weight, bias):  # sums differently from 5 rows on, like a blocked GEMM
        y = (x[..., :, None, :] * weight).sum(-1)  # row by row: the same bits for any row count
        return y + 1e-3 if x.shape[-2] >= 5 else y

    assert probe_linear(w, rows=(1, 2, 3, 4, 8, 16), linear=switches_at_five) == 1  # row 1 vs the 16-row pass
    assert probe_linear(w, rows=(5, 8, 16), linear=switches_at_five) is None


def test_chunks_and_token_groups():
    assert chunks(3, 10, 4) == [(3, 7), (7, 10)]
    assert chunks(0, 4, 4) == [(0, 4)]

    class Pending:
        def __init__(self, n):
            self.n = n

        def pending(self):
            return [0] * self.n

    engines = [Pending(n) for n in (3, 3, 5, 1, 9)]
    assert [[e.n for e in g] for g in token_groups(engines, 6)] == [[3, 3], [5, 1], [9]]


def _bf16(name: str) -> LoadedModel:
    lm = _tiny_gemma() if name == "tiny-gemma" else load_model(name, progress=False)
    model = lm.model.to(torch.bfloat16) if name == "tiny-gemma" else load_model(name + ":bf16", progress=False).model
    return LoadedModel(name + ":bf16", model, lm.tokenizer if name != "tiny-gemma" else byte_tokenizer(320), lm.source)


def _invariant_or_skip(lm: LoadedModel) -> LoadedModel:
    """Batch invariance depends on this machine's GEMM kernels (probed, never assumed): where
    they sum a row differently by row count, the model keeps the near-tie rule instead."""
    if not make_batch_invariant(lm.model):
        assert lm.tie_margin == BF16_TIE_MARGIN  # the near-tie rule stays
        pytest.skip("batch invariance is off on this machine (its bfloat16 GEMM rows depend on the row count): the near-tie rule is used")
    return lm


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-gemma"])
def bf16(request):
    return _invariant_or_skip(_bf16(request.param))


def test_invariant_model_needs_no_tie_margin(bf16):
    assert bf16.batch_invariant and bf16.tie_margin == 0.0


def test_any_split_gives_the_same_bits(bf16):
    rng = random.Random(3)
    tokens = [rng.randrange(300) for _ in range(40)]
    whole = bf16.new_engine()
    whole.append(tokens)
    ref = whole.compute()
    for cuts in ([39], [1, 2, 3], [10, 11, 12, 20, 29, 38], list(range(25, 40))):
        e = bf16.new_engine()
        e.append(tokens)
        rows = [e.compute(c) for c in cuts] + [e.compute()]
        assert torch.equal(torch.cat(rows), ref), cuts
    # the canonical recomputation, too, is the same bits
    assert torch.equal(whole.fresh_logits(30), ref[29])


def test_packed_batch_gives_the_same_bits(bf16):
    assert install(bf16.model)
    rng = random.Random(5)
    prompts = [[rng.randrange(300) for _ in range(rng.randrange(2, 25))] for _ in range(4)]
    packed, alone = [SessionEngine(bf16) for _ in prompts], [SessionEngine(bf16) for _ in prompts]
    for e, p in zip(packed + alone, prompts + prompts):
        e.append(p)
        e.fill_cache(len(p) - 1)
    for _ in range(3):
        for a, b in zip(packed, alone):
            d = [rng.randrange(300) for _ in range(rng.randrange(1, 6))]
            a.append(d)
            b.append(d)
        for got, want in zip(forward_packed(bf16.model, packed), [e.compute() for e in alone]):
            assert torch.equal(got, want)


def test_speculative_equals_the_target_alone_without_recomputation():
    bf16 = _invariant_or_skip(_bf16("tiny-qwen2"))  # the byte-tokenizer drafters draft for Qwen2/Llama
    gateway = Gateway(bf16)
    prompts = ["the invariant target", "1 2 3 4 5"]

    async def go():
        async with Client(drafter="tiny-qwen2-b", gateway=InProcessTransport(gateway), draft_len=4) as c:
            return [await c.generate(p, max_new_tokens=40, chat=False) for p in prompts]

    try:
        for prompt, rec in zip(prompts, run(go())):
            assert rec.tokens == list(generate_alone(bf16, bf16.tokenizer.prompt_tokens(prompt, chat=False), 40))
        assert gateway.verifier.stats["tie_recomputes"] == 0
    finally:
        gateway.close()


def test_a_failed_probe_on_another_device_undoes_the_conversion(monkeypatch):
    from tandem.local_runtime import invariant

    lm = LoadedModel("tiny-gemma:bf16", _tiny_gemma().model.to(torch.bfloat16), byte_tokenizer(320), "random init")
    _invariant_or_skip(lm)
    monkeypatch.setattr(invariant, "_device", lambda model: "another-device")
    monkeypatch.setattr(invariant, "probe_linear", lambda *args, **kwargs: 4)
    assert not make_batch_invariant(lm.model)
    assert not any(isinstance(m, invariant.RowPaddedLinear) for m in lm.model.modules())
    assert lm.model.config._attn_implementation == "sdpa"
    assert not lm.batch_invariant and lm.tie_margin == BF16_TIE_MARGIN
