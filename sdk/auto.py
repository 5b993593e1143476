"""Predicted seconds per token and cloud cost of each mode, and `auto`'s choice among them.

The model, per generated token (all times in seconds):

    local        t_local                                         (the device model alone)
    cloud        t_cloud + (rtt + t_prefill) / n                 (streamed: one round trip, then the
                                                                  gateway's decode speed)
    speculative  (k t_local + t_verify + rtt) / E(alpha, k) + rtt / n
                 with E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha) and k chosen by
                 `optimal_draft_len` for this link
    assist       t_local + p (rtt + t_cloud) + rtt / n           (p: share of tokens the token
                                                                  router sends to the cloud)

Cloud forward passes per token: local 0, cloud 1, speculative 1 / E(alpha, k), assist p.

`choose_mode` ranks the modes a policy allows by its objective: latency (seconds per token),
cost (cloud passes per token), or a weighted mix `s_per_token + cost_weight * passes_per_token`.
The estimates are the client's one `LinkEstimate` (estimates.py), so the choice follows the network:
at small RTT speculation can beat streaming the cloud model; every round trip it adds pushes it
back, and past some RTT streaming wins (or the device alone, if the policy allows it).
"""

from __future__ import annotations

from typing import Literal

from ..local_runtime.speculative import expected_tokens_per_round, optimal_draft_len
from .estimates import LinkEstimate

Objective = Literal["latency", "cost", "weighted"]
ALL_MODES = ("local", "cloud", "speculative", "assist")


def speculative_k(e: LinkEstimate) -> int:
    if e.draft_len is not None:
        return e.draft_len
    return optimal_draft_len(e.alpha, e.local_token_s, e.verify_s + e.rtt_s, e.k_max)


def predict_s_per_token(mode: str, e: LinkEstimate, n_tokens: int = 128) -> float:
    n = max(1, n_tokens)
    if mode == "local":
        return e.local_token_s
    if mode == "cloud":
        return e.cloud_token_s + (e.rtt_s + e.prefill_s) / n
    if mode == "speculative":
        k = speculative_k(e)
        per_round = k * e.local_token_s + e.verify_s + e.rtt_s
        return per_round / expected_tokens_per_round(e.alpha, k) + (e.rtt_s + e.prefill_s) / n
    if mode == "assist":
        return e.local_token_s + e.escalate_rate * (e.rtt_s + e.cloud_token_s) + (e.rtt_s + e.prefill_s) / n
    raise ValueError(f"unknown mode '{mode}'")


def predict_cloud_passes_per_token(mode: str, e: LinkEstimate) -> float:
    if mode == "local":
        return 0.0
    if mode == "cloud":
        return 1.0
    if mode == "speculative":
        return 1.0 / expected_tokens_per_round(e.alpha, speculative_k(e))
    if mode == "assist":
        return e.escalate_rate
    raise ValueError(f"unknown mode '{mode}'")


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
