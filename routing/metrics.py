"""How good a query router is: quality against the share of queries sent to the strong model.

A routing table has, per prompt, whether the weak model and the strong model answered it
correctly (w_i, s_i in {0, 1}). A router gives each prompt a score; routing the top-scored share
to the strong model and the rest to the weak one has accuracy

    acc(k) = (sum over the k top-scored prompts of s_i + sum over the others of w_i) / n
           = weak_acc + (1/n) * sum over the k top-scored of (s_i - w_i)

at a strong-call share k/n. Prompts with equal scores are indistinguishable to the router, so a
tie group is taken in the order of its expected value under random tie-breaking: the curve is
linear across it. Between the n + 1 points the curve is interpolated linearly (a router that
randomises the last prompt reaches every share in between).

The summary numbers follow RouteLLM's evaluation (lm-sys/RouteLLM, routellm/evals/evaluate.py):

    target(p)           = weak_acc + p * (strong_acc - weak_acc)   (p = 0.95: "95% of the strong
                          model's performance", i.e. 95% of the gap recovered)
    strong_calls_at(p)  = the smallest share whose accuracy reaches target(p)
    apgr                = (integral over share in [0, 1] of acc - weak_acc) / (strong_acc - weak_acc)
                          (average performance gap recovered)
    cpt50, cpt80        = strong_calls_at(0.5), strong_calls_at(0.8): RouteLLM's call-performance
                          thresholds CPT(50%) and CPT(80%), the share of strong calls needed to
                          recover half (four fifths) of the gap

Baselines, in closed form:

    random   E[acc(share)] = weak_acc + share * (strong_acc - weak_acc): a straight line, so
             strong_calls_at(p) = p and apgr = 1/2 (cpt50 = 0.5, cpt80 = 0.8)
    oracle   sends exactly the prompts only the strong model gets right (g of them) first:
             acc rises by 1/n per call up to share g/n, stays flat over prompts where both agree,
             and falls over prompts only the weak model gets right (sent last);
             strong_calls_at(p) = p * (strong_acc - weak_acc)

Every function here is pure and works on plain sequences or numpy arrays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

DEFAULT_PCT = 0.95


@dataclass(frozen=True)
class Curve:
    """Accuracy at strong-call shares 0, 1/n, ..., 1 (n + 1 points)."""

    shares: np.ndarray
    accuracy: np.ndarray


@dataclass(frozen=True)
class RouteMetrics:
    n: int
    weak_accuracy: float
    strong_accuracy: float
    strong_calls_at_95pct: float
    random_strong_calls_at_95pct: float
    oracle_strong_calls_at_95pct: float
    apgr: float
    random_apgr: float
    oracle_apgr: float
    cpt50: float
    random_cpt50: float
    oracle_cpt50: float
    cpt80: float
    random_cpt80: float
    oracle_cpt80: float

    def to_dict(self) -> dict:
        return asdict(self)


def _as01(x: Sequence) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        return a.astype(np.float64)
    a = a.astype(np.float64)
    if not np.all((a == 0) | (a == 1)):
        raise ValueError("correctness columns must be 0/1 or booleans")
    return a


def quality_curve(scores: Sequence[float], weak: Sequence, strong: Sequence) -> Curve:
    """acc(k / n) for k = 0..n when the k top-scored prompts go to the strong model (ties averaged)."""
    w, s = _as01(weak), _as01(strong)
    sc = np.asarray(scores, dtype=np.float64)
    n = len(w)
    if not (len(s) == len(sc) == n) or n == 0:
        raise ValueError(f"scores, weak and strong need the same non-zero length ({len(sc)}, {n}, {len(s)})")
    if np.isnan(sc).any():
        raise ValueError("scores contain NaN; score through a fail-safe router first")
    gain = s - w
    order = np.argsort(-sc, kind="stable")
    sc_sorted, gain_sorted = sc[order], gain[order]
    # within a group of equal scores, every prompt contributes the group's mean gain
    _, start, counts = np.unique(-sc_sorted, return_index=True, return_counts=True)
    per = np.empty(n)
    for st, c in zip(start, counts):
        per[st : st + c] = gain_sorted[st : st + c].mean()
    acc = w.mean() + np.concatenate([[0.0], np.cumsum(per)]) / n
    return Curve(shares=np.arange(n + 1) / n, accuracy=acc)


def random_curve(weak: Sequence, strong: Sequence) -> Curve:
    """The expected curve of routing each prompt to the strong model at random."""
    w, s = _as01(weak), _as01(strong)
    n = len(w)
    shares = np.arange(n + 1) / n
    return Curve(shares=shares, accuracy=w.mean() + shares * (s.mean() - w.mean()))


def oracle_curve(weak: Sequence, strong: Sequence) -> Curve:
    """Perfect routing: prompts where only the strong model is right first, ones where only the
    weak model is right last."""
    w, s = _as01(weak), _as01(strong)
    return quality_curve(s - w, w, s)


def strong_calls_at(curve: Curve, weak_acc: float, strong_acc: float, pct: float = DEFAULT_PCT) -> float:
    """The smallest strong-call share at which the (linearly interpolated) curve reaches
    weak_acc + pct * (strong_acc - weak_acc). 0 when the strong model is no better than the weak
    one; 1 when the curve never reaches the target (it always does at share 1 up to rounding)."""
    target = weak_acc + pct * (strong_acc - weak_acc)
    if strong_acc <= weak_acc:
        return 0.0
    x, y = curve.shares, curve.accuracy
    eps = 1e-12
    hit = np.nonzero(y >= target - eps)[0]
    if len(hit) == 0:
        return 1.0
    i = int(hit[0])
    if i == 0:
        return 0.0
    # the first crossing lies on the segment (i - 1, i), where y[i - 1] < target <= y[i]
    return float(x[i - 1] + (target - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))


def apgr(curve: Curve, weak_acc: float, strong_acc: float) -> float:
    """Average performance gap recovered: the area between the curve and the weak model's
    accuracy over the share in [0, 1], divided by the strong-minus-weak gap (trapezoid rule)."""
    gap = strong_acc - weak_acc
    if gap == 0:
        return float("nan")
    y = curve.accuracy - weak_acc
    x = curve.shares
    area = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)
    return area / gap


def route_metrics(scores: Sequence[float], weak: Sequence, strong: Sequence, pct: float = DEFAULT_PCT) -> RouteMetrics:
    """The contract's numbers for one router on one table (router, random and oracle side by side)."""
    w, s = _as01(weak), _as01(strong)
    wa, sa = float(w.mean()), float(s.mean())
    curves = {"": quality_curve(scores, w, s), "random_": random_curve(w, s), "oracle_": oracle_curve(w, s)}
    fields: dict[str, float] = {}
    for prefix, c in curves.items():
        fields[f"{prefix}strong_calls_at_95pct"] = strong_calls_at(c, wa, sa, pct)
        fields[f"{prefix}apgr"] = apgr(c, wa, sa)
        fields[f"{prefix}cpt50"] = strong_calls_at(c, wa, sa, 0.5)
        fields[f"{prefix}cpt80"] = strong_calls_at(c, wa, sa, 0.8)
    return RouteMetrics(n=len(w), weak_accuracy=wa, strong_accuracy=sa, **fields)


def auc(scores: Sequence[float], labels: Sequence) -> float:
    """Area under the ROC curve (the probability that a random positive outscores a random
    negative, ties counting one half). NaN when one class is missing."""
    sc = np.asarray(scores, dtype=np.float64)
    y = _as01(labels).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    # average ranks handle ties exactly
    order = np.argsort(sc, kind="stable")
    ranks = np.empty(len(sc))
    sorted_sc = sc[order]
    _, start, counts = np.unique(sorted_sc, return_index=True, return_counts=True)
    for st, c in zip(start, counts):
        ranks[order[st : st + c]] = st + (c + 1) / 2.0
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


__all__ = [
    "Curve",
    "RouteMetrics",
    "quality_curve",
    "random_curve",
    "oracle_curve",
    "strong_calls_at",
    "apgr",
    "route_metrics",
    "auc",
    "DEFAULT_PCT",
]
