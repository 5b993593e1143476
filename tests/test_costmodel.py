"""The cost model against exact answers, in both regimes."""

import pytest

from tandem.local_runtime.speculative import expected_tokens_per_round
from tandem.sdk.costmodel import (
    Timings,
    best_draft_len,
    ceiling_s_per_token,
    predict,
    predict_rounds,
    round_seconds,
    speedup_vs_cloud,
)

# the figures of a memory-bound target: a verify of any block costs about one step
FLAT = Timings(draft_s=0.043, step_s=0.444, verify_s=(0.444, 0.45, 0.46, 0.47, 0.475, 0.48, 0.48, 0.481, 0.481), rtt_s=0.005)
# a compute-bound one: a block of j tokens costs about j steps
STEEP = Timings(draft_s=0.043, step_s=0.056, verify_s=tuple(0.056 * j for j in range(1, 10)), rtt_s=0.005)


def test_verify_times_extend_linearly_past_what_was_measured():
    assert STEEP.verify(3) == pytest.approx(0.168)
    assert STEEP.verify(12) == pytest.approx(0.056 * 12)
    assert Timings(0.01, 0.05, (0.2,)).verify(7) == 0.2  # one length measured: flat
    with pytest.raises(ValueError):
        Timings(0.01, 0.05, ())


def test_rounds_exact():
    a, k = 0.79, 8
    assert round_seconds(FLAT, a, k, pipeline=False) == pytest.approx(8 * 0.043 + 0.481 + 0.005)
    # pipelining: the 11 tokens drafted during the wait cover the next round's 8 when the block survives
    survive = a ** 9
    assert round_seconds(FLAT, a, k, pipeline=True) == pytest.approx(0.486 + (8 - survive * 8) * 0.043)
    p = predict("speculative", FLAT, a, k=k, n_tokens=100)
    e = expected_tokens_per_round(a, k)
    assert p.s_per_token == pytest.approx((8 * 0.043 + 0.486) / e + 0.005 / 100)
    assert p.cloud_passes_per_token == pytest.approx(1 / e) and p.tokens_per_round == pytest.approx(e)


def test_other_modes_exact():
    assert predict("cloud", FLAT, 0.8, n_tokens=100).s_per_token == pytest.approx(0.444 + 0.005 / 100)
    assert predict("local", FLAT, 0.8).s_per_token == 0.043
    a = predict("assist", FLAT, 0.8, escalate_rate=0.25, n_tokens=100)
    assert a.s_per_token == pytest.approx(0.043 + 0.25 * (0.005 + 0.444) + 0.005 / 100) and a.cloud_passes_per_token == 0.25
    with pytest.raises(ValueError):
        predict("teleport", FLAT, 0.5)


def test_both_regimes():
    """Memory-bound: speculation pays, more with pipelining; compute-bound: it cannot."""
    assert speedup_vs_cloud(FLAT, 0.79) > 2.0
    assert speedup_vs_cloud(FLAT, 0.79, pipeline=True) > speedup_vs_cloud(FLAT, 0.79)
    assert speedup_vs_cloud(STEEP, 0.79) < 1.0


def test_best_draft_len_is_the_argmin():
    for t in (FLAT, STEEP):
        for pipeline in (False, True):
            k = best_draft_len(t, 0.79, pipeline, k_max=12)
            costs = {j: round_seconds(t, 0.79, j, pipeline) / expected_tokens_per_round(0.79, j) for j in range(1, 13)}
            assert costs[k] == min(costs.values())
    # steep verify costs keep drafts short; flat ones make longer drafts pay
    assert best_draft_len(STEEP, 0.79, False) < best_draft_len(FLAT, 0.79, False)


def test_predicted_rounds_add_up():
    seconds, tokens = predict_rounds(FLAT, [0.8, 0.5], [4, 2], pipeline=False)
    assert seconds == pytest.approx(round_seconds(FLAT, 0.8, 4, False) + round_seconds(FLAT, 0.5, 2, False))
    assert tokens == pytest.approx(expected_tokens_per_round(0.8, 4) + expected_tokens_per_round(0.5, 2))


def test_ceiling_is_free_drafting_and_bounds_every_schedule():
    a = 0.73
    s, k = ceiling_s_per_token(FLAT, a)
    # the best k by hand: the verify of k + 1 tokens and the RTT over E(a, k)
    by_hand = min((FLAT.verify(j + 1) + 0.005) / expected_tokens_per_round(a, j) for j in range(1, 17))
    assert s == pytest.approx(by_hand)
    assert s == pytest.approx((FLAT.verify(k + 1) + 0.005) / expected_tokens_per_round(a, k))
    for t in (FLAT, STEEP):
        bound = ceiling_s_per_token(t, a)[0]
        for pipeline in (False, True):
            assert predict("speculative", t, a, pipeline=pipeline, n_tokens=10**9).s_per_token >= bound - 1e-12
    # a compute-bound target: even free drafting does not beat one step per token by much
    assert ceiling_s_per_token(STEEP, a)[0] > 0.056 * 0.9
