"""The speculative-decoding rule, as pure functions.

Notation (Leviathan et al. 2023; Chen et al. 2023): the drafter proposed tokens x_1..x_k, each
x_i drawn from its distribution q_i; the target's distributions at the same positions are
p_1..p_{k+1} (p_{k+1} follows the last draft).

Greedy (temperature 0): accept x_i while x_i == argmax p_i; the next token is argmax p_{n+1},
where n is the number accepted. The output is the target's own greedy continuation.

Sampling: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)). At the first rejection,
emit a token drawn from the residual r_i = max(0, p_i - q_i) / sum(max(0, p_i - q_i)). If all k
are accepted, emit a bonus token from p_{k+1}. For every position the emitted token is then
distributed exactly as p_i:

    P(y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x q(x) min(1, p(x)/q(x))) r(y)
         = min(q(y), p(y)) + (sum_x max(0, p(x) - q(x))) r(y)
         = min(q(y), p(y)) + max(0, p(y) - q(y))  = p(y).

Randomness is passed in as uniforms in [0, 1), so these functions are deterministic and tested
against exact answers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np


def verify_greedy(draft: Sequence[int], target_choice: Sequence[int]) -> tuple[int, int]:
    """Greedy acceptance: (number of drafts accepted, the target's next token).

    `target_choice[i]` is the target's greedy token at draft position i; it has one entry more
    than `draft` (the token after the last draft).
    """
    if len(target_choice) != len(draft) + 1:
        raise ValueError(f"need {len(draft) + 1} target choices for {len(draft)} drafts, got {len(target_choice)}")
    return verify_greedy_lazy(draft, target_choice.__getitem__)


def verify_greedy_lazy(draft: Sequence[int], choose: Callable[[int], int]) -> tuple[int, int]:
    """`verify_greedy` with the target's choices computed on demand: `choose(i)` is the target's
    greedy token at draft position i (0 <= i <= k). Only positions up to the first rejection are
    asked for, so a choice that costs extra work (a near tie recomputed canonically) is made only
    where it can matter. n = the longest prefix with draft[i] == choose(i); next = choose(n)."""
    n = 0
    while True:
        choice = int(choose(n))
        if n < len(draft) and draft[n] == choice:
            n += 1
            continue
        return n, choice


def cut_at_stop(tokens: Sequence[int], eos: Collection[int], room: int) -> tuple[list[int], str | None]:
    """What of `tokens` may be emitted when `room` more tokens fit the budget: up to and including
    the first end-of-sequence token, and at most `room` of them. The reason is "eos" when an
    end-of-sequence token was kept, "length" when the budget is used up, else None."""
    out: list[int] = []
    for t in tokens:
        if len(out) >= room:
            return out, "length"
        out.append(int(t))
        if t in eos:
            return out, "eos"
    return out, ("length" if len(out) >= room else None)


def accept_probability(p_x: float, q_x: float) -> float:
    """min(1, p(x) / q(x)): the chance of keeping a draft token x that was drawn from q."""
    if q_x <= 0.0:
        # x could not have been drawn from q; keep it only if the target would never reject it.
        return 1.0 if p_x > 0.0 else 0.0
    return min(1.0, p_x / q_x)


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """r = max(0, p - q) / sum(max(0, p - q)): what to resample from after a rejection.

    When p == q everywhere (so nothing can be rejected) the residual is undefined; p is returned,
    which keeps the function total without changing any reachable outcome.
    """
    diff = np.maximum(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64), 0.0)
    total = diff.sum()
    if total <= 0.0:
        return np.asarray(p, dtype=np.float64) / np.sum(p)
    return diff / total


def sample_index(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF sampling: the index i with cdf[i-1] <= u * total < cdf[i]."""
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    # u * total can round to the very top; never return an index past the last positive entry.
    last = int(np.flatnonzero(probs)[-1])
    return min(i, last)


def verify_sampled(
    draft: Sequence[int],
    q: np.ndarray,
    p: np.ndarray,
    accept_u: Sequence[float],
    resample_u: float,
) -> tuple[int, int]:
    """Sampling acceptance: (number of drafts accepted, the next token).

    q has shape (k, V): the distributions the drafts were drawn from. p has shape (k + 1, V): the
    target's. accept_u[i] is the uniform tested against draft i; resample_u draws the token
    emitted after the accepted prefix (from the residual, or from p_{k+1} as a bonus).
    """
    k = len(draft)
    if q.shape[0] != k or p.shape[0] != k + 1 or len(accept_u) < k:
        raise ValueError(f"shapes do not fit k={k}: q {q.shape}, p {p.shape}, {len(accept_u)} uniforms")
    for i, x in enumerate(draft):
        if accept_u[i] >= accept_probability(float(p[i, x]), float(q[i, x])):
            return i, sample_index(residual_distribution(p[i], q[i]), resample_u)
    return k, sample_index(p[k], resample_u)


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """E[tokens emitted per verify round] = (1 - alpha^(k+1)) / (1 - alpha) for i.i.d. acceptance
    with rate alpha and k drafts: the accepted prefix plus the one token the target adds.
    alpha = 1 gives k + 1; k = 0 gives 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def optimal_draft_len(alpha: float, draft_s: float, round_s: float, k_max: int, k_min: int = 1) -> int:
    """The draft length k that maximises expected tokens per second:

        k* = argmax_k  E(alpha, k) / (k * draft_s + round_s),   E = (1 - alpha^(k+1)) / (1 - alpha)

    draft_s is the device's time per drafted token; round_s the fixed cost of a verify round (the
    network round trip plus the gateway's forward pass). A slow link (large round_s) or a good
    drafter (alpha near 1) pushes k up; a poor drafter pushes it down to k_min. Ties go to the
    smaller k (less wasted drafting).
    """
    if k_max < k_min:
        raise ValueError(f"k_max ({k_max}) < k_min ({k_min})")
    best_k, best_rate = k_min, -1.0
    for k in range(k_min, k_max + 1):
        rate = expected_tokens_per_round(alpha, k) / (k * draft_s + round_s)
        if rate > best_rate * (1 + 1e-12):
            best_k, best_rate = k, rate
    return best_k


__all__ = [
    "verify_greedy",
    "verify_greedy_lazy",
    "cut_at_stop",
    "accept_probability",
    "residual_distribution",
    "sample_index",
    "verify_sampled",
    "expected_tokens_per_round",
    "optimal_draft_len",
]
