"""What a drafting step produces, and the constants every engine shares (a leaf: imports nothing
of tandem, so engines and their backends can all import it)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Logit gap under which a greedy choice is recomputed canonically (see sequence.py); each model
# carries the margin for how it computes (`model.tie_margin`), which every engine over it uses.
# float32 (torch): block-vs-step differences on the bundled models are ~5e-5 (logits of
# magnitude ~30), two orders of magnitude below the margin.
DEFAULT_TIE_MARGIN = 5e-3
# bfloat16 (torch): 8 bits of mantissa, so block and step logits differ far more than in float32.
BF16_TIE_MARGIN = 0.5

# Prompts shorter than this prefill in the engine itself: a padded fixed-shape chunk would cost more.
MIN_BACKEND_PREFILL = 16

# How many of the drafter's likeliest tokens a sampled draft distribution keeps.
DEFAULT_DRAFT_SUPPORT = 64


@dataclass
class Draft:
    """k proposed tokens, the drafter's probability of each, and (under sampling) the sparse
    distribution (ids, probs) each was drawn from; `seconds` spent drafting them. `forced[i]`
    says that token i was the only one a grammar admitted (drafted without the model)."""

    tokens: list[int]
    probs: list[float]
    dists: list[tuple[list[int], list[float]]] | None = None
    seconds: float = 0.0
    forced: list[bool] = field(default_factory=list)

    @classmethod
    def empty(cls, sampled: bool) -> "Draft":
        return cls([], [], [] if sampled else None)

    def __len__(self) -> int:
        return len(self.tokens)

    def _flags(self) -> list[bool]:
        return self.forced + [False] * (len(self.tokens) - len(self.forced))

    def __add__(self, other: "Draft") -> "Draft":
        dists = None if self.dists is None else self.dists + (other.dists or [])
        return Draft(self.tokens + other.tokens, self.probs + other.probs, dists, self.seconds + other.seconds,
                     self._flags() + other._flags())

    def head(self, n: int) -> "Draft":
        """The first n tokens."""
        return Draft(self.tokens[:n], self.probs[:n], None if self.dists is None else self.dists[:n],
                     forced=self._flags()[:n])

    def tail(self, start: int) -> "Draft":
        """The tokens from index `start` on."""
        return Draft(self.tokens[start:], self.probs[start:], None if self.dists is None else self.dists[start:],
                     forced=self._flags()[start:])

    @property
    def n_forced(self) -> int:
        return sum(self.forced)


__all__ = ["Draft", "DEFAULT_TIE_MARGIN", "BF16_TIE_MARGIN", "DEFAULT_DRAFT_SUPPORT", "MIN_BACKEND_PREFILL"]
