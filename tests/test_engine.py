"""The engine's cache discipline on tiny random models."""

import pytest
import torch

from tandem.local_runtime.engine import Engine
from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama", progress=False)


def full_logits(lm, tokens):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()


def test_block_forward_equals_cache_free_forward(lm):
    tokens = [256, 72, 101, 108, 108, 111, 32, 119]
    e = Engine(lm)
    e.append(tokens[:3])
    rows_a = e.compute()
    e.append(tokens[3:])
    rows_b = e.compute()
    torch.testing.assert_close(torch.cat([rows_a, rows_b]), full_logits(lm, tokens), atol=1e-4, rtol=1e-4)


def test_last_row_only_equals_the_last_of_every_row(lm):
    """prefill/step compute the output layer on the final position only; same numbers."""
    tokens = [256, 72, 101, 108, 108, 111]
    e = Engine(lm)
    last = e.prefill(tokens)
    assert last.shape == (lm.model.config.vocab_size,) and e.cached == len(tokens)
    torch.testing.assert_close(last, full_logits(lm, tokens)[-1], atol=1e-4, rtol=1e-4)
    e.append([32])
    assert e.compute(last=True).shape == (1, lm.model.config.vocab_size)
    torch.testing.assert_close(e.step(119), full_logits(lm, tokens + [32, 119])[-1], atol=1e-4, rtol=1e-4)


def test_truncate_then_recompute_matches_fresh(lm):
    e = Engine(lm)
    e.prefill([256, 1, 2, 3, 4, 5])
    e.append([6, 7, 8])
    e.compute()
    e.truncate(4)
    assert e.tokens == [256, 1, 2, 3] and e.cached == 4
    e.append([9, 10])
    rows = e.compute()
    torch.testing.assert_close(rows, full_logits(lm, [256, 1, 2, 3, 9, 10])[4:], atol=1e-4, rtol=1e-4)


def test_truncate_rejects_out_of_range(lm):
    e = Engine(lm)
    e.append([1, 2])
    with pytest.raises(ValueError):
        e.truncate(3)


def test_draft_returns_k_tokens_and_their_probabilities(lm):
    e = Engine(lm)
    e.append([256, 10, 20])
    d = e.draft(5)
    assert len(d.tokens) == 5 and len(d.probs) == 5
    assert all(0 < p <= 1 for p in d.probs)
    assert e.tokens[3:] == d.tokens and e.cached == 3 + 4  # the last draft is not computed yet
    # greedy drafting equals greedy decoding alone
    assert d.tokens == list(generate_alone(lm, [256, 10, 20], 5, eos_token_ids=[]))


def test_sampled_draft_carries_its_distribution(lm):
    e = Engine(lm)
    e.append([256, 10, 20])
    d = e.draft(3, temperature=1.0, generator=torch.Generator().manual_seed(0), support=16)
    assert d.dists is not None and len(d.dists) == 3
    for tok, q, (ids, probs) in zip(d.tokens, d.probs, d.dists):
        assert tok in ids and len(ids) <= 16
        assert abs(sum(probs) - 1) < 1e-9
        assert probs[ids.index(tok)] == pytest.approx(q)


def test_near_tie_is_resolved_by_a_canonical_recompute(lm):
    """A row whose two best logits are closer than the tie margin goes through a cache-free
    forward of the prefix, so block and step passes cannot disagree on it."""
    e = Engine(lm, tie_margin=1e9)  # every choice counts as a near-tie
    e.prefill([256, 5, 6])
    row = e.next_logits()
    assert e.greedy_token(row, 3) == int(torch.argmax(full_logits(lm, [256, 5, 6])[-1]))
    assert e.tie_recomputes == 1
    # a deliberately flipped row: the canonical answer wins over what the row says
    flipped = row.clone()
    canonical = int(torch.argmax(full_logits(lm, [256, 5, 6])[-1]))
    other = (canonical + 1) % flipped.numel()
    flipped[other] = flipped[canonical] + 1e-6
    assert int(torch.argmax(flipped)) == other
    assert e.greedy_token(flipped, 3) == canonical


def test_generate_alone_stops_at_eos(lm):
    first = list(generate_alone(lm, [256, 1, 2], 3, eos_token_ids=[]))
    stop = first[1]
    out = list(generate_alone(lm, [256, 1, 2], 10, eos_token_ids=[stop]))
    assert out == first[: first.index(stop) + 1]


def test_int8_variant_is_close_and_smaller(lm):
    q = load_model("tiny-llama:int8", progress=False)
    tokens = [256, 3, 4, 5, 6]
    a, b = full_logits(lm, tokens), full_logits(q, tokens)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert q.param_bytes() < lm.param_bytes()


def test_unknown_model_is_named():
    from tandem.protocols.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match=":int4"):
        load_model("tiny-llama:int4")
