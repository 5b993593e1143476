"""Query routers: score(query) in [0, 1], higher = more likely to need the cloud (strong) model.

    random     a uniform number from a hash of the query: the baseline every router must beat
               (reproducible: the same query always gets the same score)
    length     n / (n + 500) for a prompt of n characters: a free heuristic
    embedding  two logistic heads predicting whether the strong and the weak model answer
               correctly, on the prompt's text features and its all-MiniLM-L6-v2 embedding;
               score = (1 + p_strong - p_weak) / 2, the expected gain of asking the strong model
    format     the same heads fitted apart for multiple-choice prompts and open questions
    mf         RouteLLM's matrix-factorisation router on the same features
    knn        the similarity-weighted mean gain of the nearest training prompts (MiniLM)
    ensemble   the mean of its members' calibrated scores
               (the four learned routers: routing/scorers.py; which hyperparameters and
               features each uses is chosen by grouped cross-validation, routing/train.py)
    prefill    the device model's own prefill signals (routing/signals.py: prompt length, mean
               log-perplexity, mean entropy) -> the same two heads;
               costs nothing extra where the device prefills the prompt anyway
               (`score_prefill(logits_rows, token_ids)`)

Trained routers load their weights and their score calibration from routing/artifacts/ (built
by `tandem route train`, from ../shared/data/routing only); `threshold_for_share(s)` gives the
threshold that sends about a share s of queries to the cloud.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..protocols.errors import ArtifactMissing
from .base import Calibration

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


class RandomRouter:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.calibration = Calibration(tuple(np.linspace(0.0, 1.0, 101)))

    def score(self, query: str) -> float:
        digest = hashlib.sha256(f"{self.seed}:{query}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def score_many(self, queries: Sequence[str]) -> np.ndarray:
        return np.array([self.score(q) for q in queries])

    def threshold_for_share(self, cloud_share: float) -> float:
        return self.calibration.threshold_for_share(cloud_share)


class LengthRouter:
    name = "length"

    def __init__(self, half_at: int = 500) -> None:
        self.half_at = half_at
        self.calibration = None

    def score(self, query: str) -> float:
        return len(query) / (len(query) + self.half_at)

    def score_many(self, queries: Sequence[str]) -> np.ndarray:
        return np.array([self.score(q) for q in queries])


class _TrainedRouter:
    """Shared by the routers whose weights and score calibration live in an artefact file. A
    missing file does not stop the router being built: every score then raises `ArtifactMissing`,
    which `FailSafe` turns into "send it to the cloud" with one warning."""

    name = "trained"
    artifact = ""

    def __init__(self, path: str | Path | None = None) -> None:
        from .linear import load_npz

        self.path = Path(path) if path else ARTIFACTS / self.artifact
        self.missing: ArtifactMissing | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.calibration: Calibration | None = None
        if not self.path.exists():
            self.missing = ArtifactMissing(
                f"router '{self.name}' has no trained weights at {self.path}; build them with `tandem route train`"
            )
        else:
            self.arrays = load_npz(self.path)
            self.calibration = Calibration(tuple(float(q) for q in self.arrays["quantiles"]))
        self.meta = {k: (v.item() if v.ndim == 0 else v) for k, v in self.arrays.items() if k.startswith("meta_")}

    def require(self) -> None:
        if self.missing is not None:
            raise self.missing

    def threshold_for_share(self, cloud_share: float) -> float:
        """The threshold sending about `cloud_share` of queries to the cloud (calibrated on the
        out-of-fold scores of the training prompts)."""
        self.require()
        return self.calibration.threshold_for_share(cloud_share)

    def score_many(self, queries: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def score(self, query: str) -> float:
        return float(self.score_many([query])[0])


class LearnedRouter(_TrainedRouter):
    """One scorer family of routing/scorers.py (`embedding`, `format`, `mf`, `knn`, `ensemble`),
    fitted by `tandem route train` into `<family>_router.npz`, on the prompt features its
    artefact names (routing/features.py). The family is also the router's registered name."""

    def __init__(
        self, family: str, path: str | Path | None = None, *, cache_dir: str | Path | None = None, use_cache: bool = False
    ) -> None:
        self.name = family
        self.artifact = f"{family}_router.npz"
        super().__init__(path)
        self.cache_dir = cache_dir
        self.use_cache = use_cache or cache_dir is not None
        self.scorer = None
        self.feature_set = str(self.meta.get("meta_features", ""))
        if self.missing is None:
            from .scorers import scorer_from_arrays

            self.scorer = scorer_from_arrays(self.arrays)

    def features(self, queries: Sequence[str]) -> np.ndarray:
        from .features import prompt_features

        return prompt_features(list(queries), self.feature_set, cache_dir=self.cache_dir, use_cache=self.use_cache)

    def score_many(self, queries: Sequence[str]) -> np.ndarray:
        self.require()
        return self.scorer.score(self.features(queries))


class PrefillRouter(_TrainedRouter):
    name = "prefill"
    artifact = "prefill_router.npz"

    def __init__(
        self, path: str | Path | None = None, *, model=None, cache_dir: str | Path | None = None, use_cache: bool = False
    ) -> None:
        super().__init__(path)
        from .linear import LinearHeads
        from .signals import SIGNAL_NAMES

        self.heads = LinearHeads.from_arrays(self.arrays) if self.missing is None else None

        self.model_name = str(self.meta.get("meta_model", "smollm2-135m"))
        self.max_tokens = int(self.meta.get("meta_max_tokens", 256))
        names = str(self.meta.get("meta_features", ",".join(SIGNAL_NAMES))).split(",")
        self.columns = [SIGNAL_NAMES.index(n) for n in names]
        self._lm = model
        self.cache_dir = cache_dir
        self.use_cache = use_cache or cache_dir is not None

    @property
    def lm(self):
        if self._lm is None:
            from ..local_runtime.models import load_model

            self._lm = load_model(self.model_name, progress=False)
        return self._lm

    def score_many(self, queries: Sequence[str]) -> np.ndarray:
        self.require()
        return self.heads.router_score(self.features(queries))

    def features(self, queries: Sequence[str]) -> np.ndarray:
        from .signals import prefill_signals

        compute = lambda qs: prefill_signals(self.lm, qs, max_tokens=self.max_tokens)  # noqa: E731
        if not self.use_cache:
            return compute(queries)[:, self.columns]
        from .cache import FeatureCache

        return FeatureCache(f"prefill-{self.model_name}-{self.max_tokens}", self.cache_dir).get_many(
            queries, compute, save_every=64
        )[:, self.columns]

    def score_prefill(self, logits_rows, token_ids: Sequence[int]) -> float:
        """The score from a prefill the device has already run: its logits rows (one per prompt
        token, as `Engine.compute()` returns them) and the prompt's token ids (chat template
        applied). Only the first `max_tokens` rows are read, as in training."""
        from .signals import signals_from_logits

        self.require()
        ids = list(token_ids)
        k = min(len(ids), self.max_tokens)
        feats = signals_from_logits(logits_rows[:k], ids[:k], len(ids))[self.columns]
        return float(self.heads.router_score(feats[None])[0])


__all__ = [
    "RandomRouter", "LengthRouter", "LearnedRouter",
    "PrefillRouter", "ARTIFACTS",
]
