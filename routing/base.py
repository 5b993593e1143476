"""What a router is, how its score becomes a decision, and how a broken router fails safe.

A router answers one question with one number in [0, 1]:

    query router   score(query) -> float            how likely the query needs the cloud (strong)
                                                     model; higher = send it to the cloud
    token router   score(context, token) -> float   how good the device's proposed token is
                                                     (reward / confidence); lower = ask the cloud

The threshold is kept apart from the score (RouteLLM's design): one router serves any cost
target, and `calibrate_threshold` finds the threshold that sends a chosen share of queries to
the cloud. The score-to-decision rules are the pure functions

    query_to_cloud(score, t) = not (0 <= score <= 1) or score >= t
    token_to_cloud(score, t) = not (0 <= score <= 1) or score <  t

so an invalid score (NaN, infinite, out of range) always escalates to the cloud. `FailSafe`
wraps any router: an exception or an invalid score is replaced by the escalating score (1 for a
query router, 0 for a token router) and counted in `stats`.

Routers are found by name in a registry (`get_query_router("embedding")`); registering takes a
factory, so nothing heavy is imported until a router is built.

A router that cannot work at all (its artefact or its encoder is missing) raises, from every
score, a `RouterUnavailable` (`ArtifactMissing`, `EmbeddingUnavailable`: see the error tree in
protocols/errors.py); its FailSafe escalates every query to the cloud.

`FailSafe` logs each distinct failure once (one clear warning, then only the count grows).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..protocols.errors import RouterUnavailable

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the two kinds of router


@runtime_checkable
class QueryRouter(Protocol):
    """score(query) in [0, 1]: higher = more likely to need the cloud model."""

    name: str

    def score(self, query: str) -> float: ...


@dataclass
class TokenContext:
    """What a token router may look at when the device proposes a token.

    logits   the device model's logits row that the token was chosen from (1-D, vocab size);
             a torch tensor or a numpy array
    hidden   optionally, the device model's final hidden state at that step (the input of its
             LM head, 1-D); the reward router needs it (see `HiddenStateTap`)
    tokens   optionally, the token ids so far (prompt and generated)
    """

    logits: Any
    hidden: Any = None
    tokens: Sequence[int] | None = None


@runtime_checkable
class TokenRouter(Protocol):
    """score(context, token) in [0, 1]: higher = the device's token is more likely right."""

    name: str

    def score(self, context: TokenContext, token: int) -> float: ...


# ---------------------------------------------------------------------------------------------
# the score-to-decision rules


def valid_score(score: Any) -> bool:
    """A finite number in [0, 1]."""
    try:
        x = float(score)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and 0.0 <= x <= 1.0


def query_to_cloud(score: float, threshold: float) -> bool:
    """A query goes to the cloud when its score reaches the threshold, or is invalid."""
    return not valid_score(score) or float(score) >= threshold


def token_to_cloud(score: float, threshold: float) -> bool:
    """The cloud supplies the next token when the device token's reward is below the threshold,
    or is invalid."""
    return not valid_score(score) or float(score) < threshold


def calibrate_threshold(scores: Sequence[float], cloud_share: float) -> float:
    """The threshold that sends `cloud_share` of these scores to the cloud under
    `query_to_cloud` (score >= threshold).

    With the valid scores sorted in decreasing order s_1 >= ... >= s_n and k = round(share * n):
    k = 0 gives a threshold above s_1, k = n gives s_n, and otherwise the midpoint between s_k and
    s_(k+1), so that exactly the top k go to the cloud when there are no ties at the boundary."""
    if not 0.0 <= cloud_share <= 1.0:
        raise ValueError(f"cloud_share must be within [0, 1], got {cloud_share}")
    s = np.sort(np.asarray([x for x in scores if valid_score(x)], dtype=np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("no valid scores to calibrate on")
    k = int(round(cloud_share * len(s)))
    if k == 0:
        return float(min(1.0, s[0] + max(1e-9, (1.0 - s[0]) / 2))) if s[0] < 1.0 else 1.0
    if k == len(s):
        return float(s[-1])
    return float((s[k - 1] + s[k]) / 2.0)


@dataclass(frozen=True)
class Calibration:
    """Quantiles of a router's scores on its training prompts: enough to turn a target share of
    cloud calls into a threshold without the data. `quantiles[i]` is the score below which a
    fraction i / (len - 1) of the training scores lie."""

    quantiles: tuple[float, ...]

    @classmethod
    def from_scores(cls, scores: Sequence[float], points: int = 1001) -> "Calibration":
        s = np.asarray([x for x in scores if valid_score(x)], dtype=np.float64)
        if len(s) == 0:
            raise ValueError("no valid scores to calibrate on")
        return cls(tuple(float(q) for q in np.quantile(s, np.linspace(0.0, 1.0, points))))

    def threshold_for_share(self, cloud_share: float) -> float:
        """The score at quantile 1 - cloud_share: about that share of queries scores at or above it."""
        if not 0.0 <= cloud_share <= 1.0:
            raise ValueError(f"cloud_share must be within [0, 1], got {cloud_share}")
        q = np.asarray(self.quantiles)
        return float(np.interp(1.0 - cloud_share, np.linspace(0.0, 1.0, len(q)), q))

    def cdf(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """The fraction of training scores below each score (linear between quantiles): the
        inverse of `threshold_for_share`, cdf(threshold_for_share(s)) = 1 - s."""
        q = np.asarray(self.quantiles)
        return np.interp(np.asarray(scores, dtype=np.float64), q, np.linspace(0.0, 1.0, len(q)))


class RollingCalibration:
    """A threshold for a target share of cloud calls from the scores of recent queries (no labels
    needed): the quantile 1 - share of the last `window` valid scores, or the `prior` calibration
    (e.g. the router's, from its training prompts) until `min_scores` have been seen.

    A router's score distribution moves with the traffic (a math-heavy stream scores higher than
    a trivia stream); the share of cloud calls is only held where the threshold follows the
    traffic it is applied to. `observe` every score, ask `threshold_for_share` per decision."""

    def __init__(self, prior: "Calibration | None" = None, *, window: int = 1000, min_scores: int = 100) -> None:
        from collections import deque

        if window < 1 or min_scores < 1:
            raise ValueError("window and min_scores must be positive")
        self.prior = prior
        self.min_scores = min_scores
        self._scores: "deque[float]" = deque(maxlen=window)

    def observe(self, score: float) -> None:
        if valid_score(score):
            self._scores.append(float(score))

    def __len__(self) -> int:
        return len(self._scores)

    def threshold_for_share(self, cloud_share: float) -> float:
        if len(self._scores) >= self.min_scores:
            return calibrate_threshold(list(self._scores), cloud_share)
        if self.prior is not None:
            return self.prior.threshold_for_share(cloud_share)
        return 0.5


# ---------------------------------------------------------------------------------------------
# fail-safe


@dataclass
class FailSafeStats:
    calls: int = 0
    errors: int = 0  # the router raised
    invalid: int = 0  # the router returned NaN, an infinity, or a number outside [0, 1]
    last_error: str | None = None

    @property
    def escalations(self) -> int:
        return self.errors + self.invalid

    def to_dict(self) -> dict:
        return {"calls": self.calls, "errors": self.errors, "invalid": self.invalid, "escalations": self.escalations}


class FailSafe:
    """Wraps a query or token router: any exception or invalid score becomes the escalating score
    (the cloud decides) and is counted. Thread-safe counting; the wrapped router is untouched."""

    def __init__(self, router: Any, *, kind: str | None = None) -> None:
        """kind: 'query' (the default; escalating score 1) or 'token' (escalating score 0)."""
        self.router = router
        self.name = getattr(router, "name", type(router).__name__)
        if kind not in (None, "query", "token"):
            raise ValueError(f"kind must be 'query' or 'token', got {kind!r}")
        self.kind = kind or "query"
        self.escalate_score = 1.0 if self.kind == "query" else 0.0
        self.stats = FailSafeStats()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.calibration = getattr(router, "calibration", None)

    def _warn_once(self, message: str) -> None:
        """Log a failure the first time it is seen; repeats are only counted."""
        with self._lock:
            first = message not in self._warned
            self._warned.add(message)
        (log.warning if first else log.debug)("router %s: %s; escalating to the cloud", self.name, message)

    def _escalate_error(self, exc: Exception, count: int = 1) -> float:
        with self._lock:
            self.stats.calls += count - 1
            self.stats.errors += count
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self._warn_once(self.stats.last_error)
        return self.escalate_score

    def _guard(self, fn: Callable[[], Any]) -> float:
        with self._lock:
            self.stats.calls += 1
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - any failure of a router escalates
            return self._escalate_error(exc)
        if not valid_score(value):
            with self._lock:
                self.stats.invalid += 1
                self.stats.last_error = f"invalid score {value!r}"
            self._warn_once("returned an invalid score")
            return self.escalate_score
        return float(value)

    def score(self, *args: Any) -> float:
        return self._guard(lambda: self.router.score(*args))

    def score_many(self, queries: Sequence[str]) -> np.ndarray:
        """Scores for many queries (batched when the router can), each one guarded."""
        many = getattr(self.router, "score_many", None)
        if many is not None:
            try:
                raw = np.asarray(many(list(queries)), dtype=np.float64)
                if raw.shape != (len(queries),):
                    raise ValueError(f"score_many returned shape {raw.shape} for {len(queries)} queries")
            except RouterUnavailable as exc:  # no query can be scored: all escalate, one warning
                with self._lock:
                    self.stats.calls += 1
                self._escalate_error(exc, count=len(queries))
                return np.full(len(queries), self.escalate_score)
            except Exception as exc:  # noqa: BLE001 - fall back to one at a time
                self._warn_once(f"batched scoring failed ({exc}), scoring one by one")
            else:
                out = np.empty(len(queries))
                for i, v in enumerate(raw):
                    out[i] = self._guard(lambda v=v: v)
                return out
        return np.array([self.score(q) for q in queries], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# registry


@dataclass
class _Entry:
    factory: Callable[..., Any]
    about: str
    instance: Any = None


_QUERY: dict[str, _Entry] = {}
_TOKEN: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}
_registry_lock = threading.Lock()


def _lazy(path: str, **fixed: Any) -> Callable[..., Any]:
    """A factory 'module:attr' (relative to this package) imported on first use, called with
    `fixed` and the caller's keyword arguments."""
    module, _, attr = path.partition(":")

    def build(**kwargs: Any) -> Any:
        from importlib import import_module

        return getattr(import_module(module, __package__), attr)(**fixed, **kwargs)

    return build


def register_query_router(name: str, factory: Callable[..., Any] | str, about: str = "", **fixed: Any) -> None:
    """Add a query router; `factory` is a callable returning a router, or 'module:Class' (called
    with the keyword arguments `fixed` on top of the caller's)."""
    _QUERY[name] = _Entry(_lazy(factory, **fixed) if isinstance(factory, str) else factory, about)


def register_token_router(name: str, factory: Callable[..., Any] | str, about: str = "") -> None:
    _TOKEN[name] = _Entry(_lazy(factory) if isinstance(factory, str) else factory, about)


def router_alias(name: str) -> str:
    """The registered name an alias stands for (a name that is no alias stands for itself)."""
    return _ALIASES.get(name, name)


def query_router_names() -> dict[str, str]:
    """Registered query routers and what they are."""
    return {n: e.about for n, e in _QUERY.items()}


def token_router_names() -> dict[str, str]:
    return {n: e.about for n, e in _TOKEN.items()}


def _get(table: dict[str, _Entry], kind: str, name: str, fail_safe: bool, **kwargs: Any) -> Any:
    name = router_alias(name)
    if name not in table:
        raise KeyError(f"unknown {kind} router '{name}' (known: {', '.join(table)})")
    entry = table[name]
    if kwargs:
        router = entry.factory(**kwargs)
    else:
        with _registry_lock:
            if entry.instance is None:
                entry.instance = entry.factory()
            router = entry.instance
    return FailSafe(router, kind=kind) if fail_safe else router


def get_query_router(name: str | None = None, *, fail_safe: bool = True, **kwargs: Any) -> Any:
    """A query router by name (the default one when name is None), wrapped in `FailSafe` unless
    asked otherwise. Without kwargs the router is built once per process and shared."""
    return _get(_QUERY, "query", name or DEFAULT_QUERY_ROUTER, fail_safe, **kwargs)


def get_token_router(name: str, *, fail_safe: bool = True, **kwargs: Any) -> Any:
    return _get(_TOKEN, "token", name, fail_safe, **kwargs)


# The query router `auto` mode and `tandem route eval` use when none is named.
DEFAULT_QUERY_ROUTER = "format"

register_query_router("random", ".query:RandomRouter", "uniform score from a hash of the query (the baseline)")
register_query_router("length", ".query:LengthRouter", "longer prompts score higher (a free heuristic)")
# the scorer families `tandem route train` fits: one LearnedRouter each, named by its family
for family, about in {
    "embedding": "two logistic heads on text features + all-MiniLM-L6-v2 embedding (trained on ../shared/data/routing)",
    "format": "the embedding router's heads fitted apart for multiple-choice prompts and open questions",
    "mf": "RouteLLM's matrix-factorisation router on the same features",
    "knn": "similarity-weighted mean gain of the nearest training prompts",
    "ensemble": "mean of its members' calibrated scores (heads, MF, kNN: the combination cross-validation chose)",
}.items():
    register_query_router(family, ".query:LearnedRouter", about, family=family)
del family, about
register_query_router(
    "prefill", ".query:PrefillRouter",
    "the device model's own prefill signals (prompt perplexity, entropy, length) + logistic regression",
)
register_token_router("confidence", ".token:ConfidenceRouter", "the device model's probability of its token")
register_token_router("entropy", ".token:EntropyRouter", "1 - normalised entropy of the device model's distribution")
register_token_router(
    "reward", ".token:RewardRouter",
    "a small head on the device model's hidden state predicting agreement with the cloud model",
)
_ALIASES.update({"minilm": "embedding", "perplexity": "prefill", "prob": "confidence"})


__all__ = [
    "QueryRouter",
    "TokenRouter",
    "TokenContext",
    "valid_score",
    "query_to_cloud",
    "token_to_cloud",
    "calibrate_threshold",
    "Calibration",
    "RollingCalibration",
    "FailSafe",
    "FailSafeStats",
    "register_query_router",
    "register_token_router",
    "query_router_names",
    "token_router_names",
    "get_query_router",
    "get_token_router",
    "DEFAULT_QUERY_ROUTER",
]
