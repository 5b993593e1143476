"""`auto`'s choice: the mode a policy allows with the best predicted objective.

Predictions come from the one cost model (costmodel.py) fed with the client's live link
estimate (estimates.py): its drafting speed, the target's decode step and verify times, the RTT,
acceptance and escalation rate. So the choice follows the network: at small RTT speculation can
beat streaming the cloud model; every round trip it adds pushes it back, and past some RTT
streaming wins (or the device alone, if the policy allows it). The objective is latency (seconds
per token), cost (cloud passes per token), or `s_per_token + cost_weight * passes_per_token`.
"""

from __future__ import annotations

from typing import Literal

from .costmodel import predict
from .estimates import LinkEstimate

Objective = Literal["latency", "cost", "weighted"]
ALL_MODES = ("local", "cloud", "speculative", "assist")


def _predict(mode: str, e: LinkEstimate, n_tokens: int, pipeline: bool = False):
    return predict(mode, e.timings(), e.alpha, k=e.draft_len, pipeline=pipeline, n_tokens=n_tokens,
                   escalate_rate=e.escalate_rate, k_max=e.k_max)


def speculative_k(e: LinkEstimate) -> int:
    return _predict("speculative", e, 128).k


def predict_s_per_token(mode: str, e: LinkEstimate, n_tokens: int = 128, pipeline: bool = False) -> float:
    return _predict(mode, e, n_tokens, pipeline).s_per_token


def predict_cloud_passes_per_token(mode: str, e: LinkEstimate) -> float:
    return _predict(mode, e, 128).cloud_passes_per_token


def break_even_rtt_s(e: LinkEstimate, n_tokens: int = 128, max_rtt_s: float = 2.0) -> float | None:
    """The round-trip time past which streaming the cloud model beats speculation, predicted from
    these estimates (k re-chosen for every RTT): 0.0 if speculation loses even on a zero-latency
    link, None if it still wins at `max_rtt_s`. Speculation pays one round trip per round and
    streaming one per query, so the gap can only close as the RTT grows; bisection finds where."""
    from dataclasses import replace

    def gap(rtt: float) -> float:
        at = replace(e, rtt_s=rtt)
        return predict_s_per_token("speculative", at, n_tokens) - predict_s_per_token("cloud", at, n_tokens)

    if gap(0.0) >= 0:
        return 0.0
    if gap(max_rtt_s) < 0:
        return None
    lo, hi = 0.0, max_rtt_s
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return hi


def choose_mode(
    allowed: tuple[str, ...] | list[str],
    e: LinkEstimate,
    objective: Objective = "latency",
    cost_weight: float = 0.0,
    n_tokens: int = 128,
) -> tuple[str, dict[str, dict[str, float]]]:
    """The allowed mode with the best predicted objective, and every mode's predictions."""
    if not allowed:
        raise ValueError("no mode allowed")
    table = {
        m: {"s_per_token": predict_s_per_token(m, e, n_tokens), "cloud_passes_per_token": predict_cloud_passes_per_token(m, e)}
        for m in allowed
    }

    def score(m: str) -> tuple[float, float]:
        s, c = table[m]["s_per_token"], table[m]["cloud_passes_per_token"]
        if objective == "latency":
            return (s, c)
        if objective == "cost":
            return (c, s)
        return (s + cost_weight * c, s)

    return min(allowed, key=score), table


__all__ = [
    "ALL_MODES",
    "predict_s_per_token",
    "predict_cloud_passes_per_token",
    "choose_mode",
    "break_even_rtt_s",
    "speculative_k",
]
