"""From logits to the distributions both sides sample from.

The target's distribution p is softmax(logits / T) restricted to the top-p nucleus and
renormalised. The drafter's proposal q is the same transform of its own logits, further cut to
its `support` likeliest tokens: q is then small enough to travel with each draft token, and
because the drafter samples from exactly that q, the gateway's accept/reject rule stays lossless.
"""

from __future__ import annotations

import torch

from .draft import DEFAULT_DRAFT_SUPPORT


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) over the top-p nucleus, renormalised; float64 so that the
    accept rule sees the same numbers on every platform. temperature must be > 0."""
    if temperature <= 0.0:
        raise ValueError("logits_to_probs needs temperature > 0; temperature 0 is greedy")
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep a token while the mass before it is < top_p: the smallest set reaching top_p
        drop = (cumulative - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def truncate_support(probs: torch.Tensor, support: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `support` likeliest entries of a 1-D distribution, renormalised: (ids, probs)."""
    support = min(support, int((probs > 0).sum()))
    top_probs, top_ids = torch.topk(probs, support)
    return top_ids, top_probs / top_probs.sum()


def sample_sparse(ids: torch.Tensor, probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(ids[torch.multinomial(probs.float(), 1, generator=generator)])


def top2_margin(logits: torch.Tensor) -> float:
    """Difference between the largest and second-largest logit (how near a greedy tie is)."""
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


__all__ = ["DEFAULT_DRAFT_SUPPORT", "logits_to_probs", "truncate_support", "sample_sparse", "top2_margin"]
