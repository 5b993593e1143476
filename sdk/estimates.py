"""One live estimate of the link and both models, and the draft length it calls for.

A client keeps one `LinkEstimate`. Every verify round reports (k drafted, n accepted, seconds
drafting, seconds waiting for the verify) and every generation its timings; from these it keeps
exponentially decayed estimates of

    alpha          acceptance rate over the draft tokens the target actually tested
    local_token_s  device seconds per token (a drafting step, or a decode step in `local` mode)
    round_s        seconds per verify round trip, as the device waits for it
    rtt_s          the network round trip (a light request, GET /v1/info)
    verify_s       the gateway's share of a round: round_s - rtt_s
    cloud_token_s  gateway seconds per token when it streams alone (`cloud` mode)
    escalate_rate  `assist`: the share of tokens the token router sends to the cloud

The same numbers feed the draft-length controller (below: k for the next round) and `auto`'s
predictions (auto.py), so both always see the same link. Until a round has been measured the
controller drafts `k_init`; the defaults are priors for `auto` before anything is measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .costmodel import Timings, best_draft_len


@dataclass
class LinkEstimate:
    rtt_s: float = 0.05
    local_token_s: float = 0.05
    cloud_token_s: float = 0.08
    verify_s: float = 0.10
    round_s: float = 0.15
    prefill_s: float = 0.2  # target prefill of a typical prompt
    alpha: float = 0.7
    escalate_rate: float = 0.2
    k_max: int = 16
    draft_len: int | None = None  # a fixed k, or None for the best k for this link
    rounds: int = 0  # verify rounds observed
    # the gateway's share of a round by block length (k + 1 tokens), as measured: flat where the
    # target is memory-bound, growing where it is compute-bound
    verify_by_len: dict[int, float] = field(default_factory=dict)
    decay: float = 0.8  # weight of the past in each round's update
    # decayed counts behind alpha: the prior counts as 4 tested tokens at alpha 0.7
    _accepted: float = field(default=2.8, repr=False)
    _tested: float = field(default=4.0, repr=False)

    def observe_round(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """One round: k drafted, `accepted` kept, `draft_s` spent drafting, `verify_s` waiting
        for the reply (network included)."""
        d = self.decay
        tested = accepted + (1 if accepted < k else 0)
        self._accepted = d * self._accepted + accepted
        self._tested = d * self._tested + tested
        if self._tested > 0:
            self.alpha = min(1.0, self._accepted / self._tested)
        first = self.rounds == 0
        if k > 0 and draft_s > 0:
            per_token = draft_s / k
            self.local_token_s = per_token if first else d * self.local_token_s + (1 - d) * per_token
        if verify_s > 0:
            self.round_s = verify_s if first else d * self.round_s + (1 - d) * verify_s
            self.verify_s = max(1e-4, self.round_s - self.rtt_s)
            block, gateway_s = k + 1, max(1e-4, verify_s - self.rtt_s)
            old = self.verify_by_len.get(block)
            self.verify_by_len[block] = gateway_s if old is None else d * old + (1 - d) * gateway_s
        self.rounds += 1

    def verify_curve(self) -> tuple[float, ...]:
        """The gateway's time for a block of 1, 2, ... tokens: measured lengths, interpolated
        between them, flat outside; just `verify_s` before any round."""
        if not self.verify_by_len:
            return (self.verify_s,)
        lens = sorted(self.verify_by_len)
        return tuple(float(v) for v in np.interp(range(1, lens[-1] + 1), lens, [self.verify_by_len[j] for j in lens]))

    def timings(self) -> Timings:
        """The cost model's inputs (costmodel.py), as this estimate has measured them."""
        return Timings(draft_s=self.local_token_s, step_s=self.cloud_token_s, verify_s=self.verify_curve(),
                       rtt_s=self.rtt_s, prefill_s=self.prefill_s)

    def observe_rtt(self, rtt_s: float, first: bool = False) -> None:
        self.rtt_s = rtt_s if first else 0.5 * self.rtt_s + 0.5 * rtt_s

    def observe(self, name: str, value: float) -> None:
        """A whole generation's figure for one of the fields (mixed half and half)."""
        setattr(self, name, 0.5 * getattr(self, name) + 0.5 * value)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


class DraftLengthController:
    """k for the next round: the cost model's best draft length (`costmodel.best_draft_len`) for
    the estimate's acceptance, drafting speed, verify times and RTT, with or without pipelining;
    `k_init` until a round has been measured."""

    def __init__(self, estimate: LinkEstimate | None = None, *, k_init: int = 4, k_max: int = 16, k_min: int = 1,
                 pipeline: bool = False) -> None:
        if not 1 <= k_min <= k_init <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_init <= k_max, got {k_min}, {k_init}, {k_max}")
        self.estimate = estimate if estimate is not None else LinkEstimate()
        self.k_init, self.k_max, self.k_min = k_init, k_max, k_min
        self.pipeline = pipeline

    def observe(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.estimate.observe_round(k, accepted, draft_s, verify_s)

    def next_k(self) -> int:
        e = self.estimate
        if e.rounds == 0:
            return self.k_init
        return max(self.k_min, best_draft_len(e.timings(), e.alpha, self.pipeline, self.k_max))


class FixedDraftLength(DraftLengthController):
    """The same k every round (benchmarks that compare against a fixed-k expectation); rounds
    still feed the estimate."""

    def __init__(self, k: int, estimate: LinkEstimate | None = None) -> None:
        self.estimate = estimate if estimate is not None else LinkEstimate()
        self.k = k

    def next_k(self) -> int:
        return self.k


__all__ = ["LinkEstimate", "DraftLengthController", "FixedDraftLength"]
