"""Live estimates of the link and the drafter, and the draft length they call for.

Every verify round reports (k drafted, n accepted, seconds drafting, seconds waiting for the
verify). From these the controller keeps exponentially decayed estimates of

    alpha     acceptance rate over the draft tokens the target actually tested
    draft_s   device seconds per drafted token
    round_s   seconds per verify round trip (network RTT + the gateway's forward pass)

and picks the next k with `optimal_draft_len` (local_runtime/speculative.py). Estimates start
from a prior (alpha 0.7, nothing measured) and are re-estimated as the generation goes, so a
link that slows down mid-generation lengthens the drafts within a few rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..local_runtime.speculative import optimal_draft_len


@dataclass
class LinkEstimate:
    alpha: float = 0.7
    draft_s: float | None = None
    round_s: float | None = None
    rounds: int = 0


class DraftLengthController:
    def __init__(self, k_init: int = 4, k_max: int = 16, k_min: int = 1, decay: float = 0.8, prior_weight: float = 4.0):
        if not 1 <= k_min <= k_init <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_init <= k_max, got {k_min}, {k_init}, {k_max}")
        self.k_init, self.k_max, self.k_min = k_init, k_max, k_min
        self.decay = decay
        # decayed counts: the prior counts as `prior_weight` tested tokens at alpha 0.7
        self._accepted = 0.7 * prior_weight
        self._tested = prior_weight
        self.estimate = LinkEstimate()

    def observe(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """One round: k drafted, `accepted` kept, `draft_s` spent drafting, `verify_s` waiting."""
        tested = accepted + (1 if accepted < k else 0)
        d = self.decay
        self._accepted = d * self._accepted + accepted
        self._tested = d * self._tested + tested
        e = self.estimate
        e.alpha = min(1.0, self._accepted / self._tested) if self._tested > 0 else e.alpha
        if k > 0 and draft_s > 0:
            per_token = draft_s / k
            e.draft_s = per_token if e.draft_s is None else d * e.draft_s + (1 - d) * per_token
        if verify_s > 0:
            e.round_s = verify_s if e.round_s is None else d * e.round_s + (1 - d) * verify_s
        e.rounds += 1

    def next_k(self) -> int:
        e = self.estimate
        if e.draft_s is None or e.round_s is None:
            return self.k_init
        return optimal_draft_len(e.alpha, e.draft_s, e.round_s, self.k_max, self.k_min)


class FixedDraftLength:
    """The same k every round (benchmarks that compare against a fixed-k expectation)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.estimate = LinkEstimate()

    def observe(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.estimate.rounds += 1

    def next_k(self) -> int:
        return self.k


__all__ = ["DraftLengthController", "FixedDraftLength", "LinkEstimate"]
