"""The accept/reject rule and its companions, against exact answers."""

import numpy as np
import pytest
from scipy import stats

from tandem.local_runtime.speculative import (
    accept_probability,
    expected_tokens_per_round,
    residual_distribution,
    sample_index,
    verify_greedy,
    verify_sampled,
)


def test_greedy_accepts_the_matching_prefix():
    assert verify_greedy([5, 6, 7], [5, 6, 9, 1]) == (2, 9)
    assert verify_greedy([5, 6, 7], [4, 6, 7, 1]) == (0, 4)


def test_greedy_all_accepted_gives_the_bonus_token():
    assert verify_greedy([5, 6, 7], [5, 6, 7, 8]) == (3, 8)
    assert verify_greedy([], [3]) == (0, 3)


def test_greedy_needs_one_more_choice_than_drafts():
    with pytest.raises(ValueError):
        verify_greedy([1, 2], [1, 2])


def test_accept_probability():
    assert accept_probability(0.5, 0.25) == 1.0
    assert accept_probability(0.25, 0.5) == 0.5
    assert accept_probability(0.0, 0.5) == 0.0
    assert accept_probability(0.3, 0.0) == 1.0


def test_residual_is_normalised_positive_part():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.1, 0.6, 0.2, 0.1])
    # max(0, p - q) = [0.4, 0, 0, 0]
    np.testing.assert_allclose(residual_distribution(p, q), [1.0, 0.0, 0.0, 0.0])
    p = np.array([0.4, 0.4, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    np.testing.assert_allclose(residual_distribution(p, q), [0.5, 0.5, 0.0])


def test_residual_when_p_equals_q_is_p():
    p = np.array([0.25, 0.75])
    np.testing.assert_allclose(residual_distribution(p, p), p)


def test_sample_index_inverse_cdf():
    probs = np.array([0.25, 0.0, 0.5, 0.25])
    assert sample_index(probs, 0.0) == 0
    assert sample_index(probs, 0.2499) == 0
    assert sample_index(probs, 0.25) == 2
    assert sample_index(probs, 0.7499) == 2
    assert sample_index(probs, 0.75) == 3
    assert sample_index(probs, 0.999999999) == 3
    # never lands on a zero-probability tail
    assert sample_index(np.array([0.5, 0.5, 0.0]), 1.0 - 1e-17) == 1


def test_verify_sampled_exact_cases():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    q = np.array([[1.0, 0.0]])
    # draft 0 with q=1, p=0.5: accepted iff u < 0.5
    assert verify_sampled([0], q, p, [0.4], 0.95) == (1, 1)  # bonus from p[1]: 0.95 >= 0.9 -> token 1
    assert verify_sampled([0], q, p, [0.4], 0.5) == (1, 0)
    # rejected: residual max(0, [0.5, 0.5] - [1, 0]) = [0, 1] -> token 1 whatever the uniform
    assert verify_sampled([0], q, p, [0.6], 0.0) == (0, 1)


def test_verify_sampled_rejects_at_first_failure():
    p = np.array([[0.1, 0.9], [0.1, 0.9], [0.5, 0.5]])
    q = np.array([[0.0, 1.0], [1.0, 0.0]])
    # draft 1 (p=.9/q=1 -> accept if u<.9), then draft 0 (p=.1/q=1 -> accept if u<.1)
    assert verify_sampled([1, 0], q, p, [0.5, 0.5], 0.3) == (1, 1)  # residual of step 2 = [0, 1]
    assert verify_sampled([1, 0], q, p, [0.5, 0.05], 0.3) == (2, 0)  # bonus from p[2]


def _exact_first_token_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Enumerate every draft token x: P(draw x) * [P(accept) on x + P(reject) * residual]."""
    out = np.zeros_like(p[0])
    for x in range(len(q[0])):
        if q[0, x] == 0:
            continue
        a = accept_probability(p[0, x], q[0, x])
        out[x] += q[0, x] * a
        out += q[0, x] * (1 - a) * residual_distribution(p[0], q[0])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_exact_enumeration_reproduces_target(seed):
    rng = np.random.default_rng(seed)
    V = 8
    p = rng.dirichlet(np.ones(V) * 0.5, size=2)
    q = rng.dirichlet(np.ones(V) * 0.5, size=1)
    np.testing.assert_allclose(_exact_first_token_distribution(p, q), p[0], atol=1e-12)


def test_sampled_rule_matches_target_distribution_chi_square():
    """Draw drafts from q, run the rule with fresh uniforms, and compare the emitted first token
    and the pair (first, second) with p by chi-square."""
    rng = np.random.default_rng(1234)
    V, k, N = 8, 2, 40_000
    p = rng.dirichlet(np.ones(V), size=k + 1)
    q = rng.dirichlet(np.ones(V), size=k)
    first = np.zeros(V)
    for _ in range(N):
        draft = [int(rng.choice(V, p=q[i])) for i in range(k)]
        n, nxt = verify_sampled(draft, q, p, rng.random(k), float(rng.random()))
        emitted = draft[:n] + [nxt]
        first[emitted[0]] += 1
    chi2, pvalue = stats.chisquare(first, p[0] * N)
    assert pvalue > 1e-3, (chi2, first / N, p[0])


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(0.5, 0) == 1.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens_per_round(0.8, 3) == pytest.approx((1 - 0.8**4) / 0.2)
    with pytest.raises(ValueError):
        expected_tokens_per_round(1.5, 2)
