"""The learned scorers behind the query routers: prompt features in, a score in [0, 1] out.

Every scorer is fitted on a routing table's prompts' features X (n, D), the two models'
correctness (w_i, s_i in {0, 1}) and row weights, and scores new rows; higher means the strong
model's expected gain g = s - w is larger. The families:

    heads  two L2-penalised logistic heads on the top principal directions of X (routing/linear.py),
           P(s = 1 | x) and P(w = 1 | x); score = (1 + p_strong - p_weak) / 2 = (1 + E[g | x]) / 2
    format the same two heads fitted apart for multiple-choice prompts (option lines "A." .. "D.")
           and open questions, the prompt's format choosing which scores it: what makes a
           question hard differs between the two (a domain-free gate, read from the text features)
    mf     RouteLLM's matrix-factorisation router (Ong et al. 2024): a model m's quality on prompt x
           is delta(m, x) = w2 . (v_m * (W1 x + b)) and P(strong beats weak) =
           sigmoid(delta(strong, x) - delta(weak, x)). With two models the difference is
           (w2 * (v_strong - v_weak)) . (W1 x + b), a linear function u . x + c, so the router is a
           logistic head on x (here: on its principal directions), fitted like RouteLLM's on the
           decided pairs only (rows where exactly one model is right; label s)
    knn    the similarity-weighted mean gain of the k training prompts nearest by cosine similarity
           (on the principal directions): score = (1 + sum_j a_j g_j / sum_j a_j) / 2 with
           a_j = exp(sim_j / tau)
    ensemble  the mean of its members' scores, each first mapped through its own cumulative
           distribution on the training rows (Calibration quantiles), so members on different
           scales weigh the same: score = (1 / M) sum_m F_m(score_m(x))

Each spec names its feature set (routing/features.py: "text", "minilm", "text+minilm"); the
hand-made text features are never projected, only the embedding is. kNN reads the embedding only.
Fitting is deterministic given the data. `Scorer.to_arrays` / `scorer_from_arrays` store one in
an `.npz` (float32, float16 for kNN's stored prompts) and rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import Calibration
from .features import blocks, passthrough, take, union
from .linear import LinearHeads, principal_directions


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer family, its feature set and hyperparameters, e.g.
    ScorerSpec("knn", "minilm", (("k", 50), ("tau", 0.05))); an ensemble lists its members (its
    feature set is then their union)."""

    kind: str
    features: str = "text+minilm"
    params: tuple[tuple[str, float], ...] = ()
    members: tuple["ScorerSpec", ...] = ()

    def __post_init__(self) -> None:
        if self.members:
            object.__setattr__(self, "features", union([m.features for m in self.members]))
        blocks(self.features)  # validates the names

    @property
    def name(self) -> str:
        if self.members:
            return f"{self.kind}({' + '.join(m.name for m in self.members)})"
        inner = ",".join([self.features] + [f"{k}={v:g}" for k, v in self.params])
        return f"{self.kind}({inner})"

    def get(self, key: str, default: float | None = None) -> float | None:
        return dict(self.params).get(key, default)


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class HeadsScorer:
    kind = "heads"

    def __init__(self, heads: LinearHeads) -> None:
        self.heads = heads

    @classmethod
    def fit(cls, spec: ScorerSpec, X: np.ndarray, weak: np.ndarray, strong: np.ndarray, weights: np.ndarray) -> "HeadsScorer":
        targets = {"strong": strong.astype(float), "weak": weak.astype(float)}
        comps = int(spec.get("components", 64))
        return cls(LinearHeads.fit(X, targets, l2=float(spec.get("l2", 100.0)), components=comps, weights=weights,
                                   passthrough=passthrough(spec.features)))

    def score(self, X: np.ndarray) -> np.ndarray:
        return self.heads.router_score(X)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return self.heads.to_arrays(prefix)

    @classmethod
    def from_arrays(cls, z: dict, prefix: str) -> "HeadsScorer":
        return cls(LinearHeads.from_arrays(z, prefix))


class FormatScorer:
    """Heads fitted apart for the two prompt formats, multiple choice (lines "A." .. "D.") and open
    questions; a format with too few training rows (or one outcome only) uses heads fitted on all."""

    kind = "format"
    MIN_ROWS = 50

    def __init__(self, heads: dict[str, HeadsScorer], gate: int) -> None:
        self.heads, self.gate = heads, gate

    @staticmethod
    def choice(X: np.ndarray, gate: int) -> np.ndarray:
        return np.atleast_2d(X)[:, gate] > 0

    @classmethod
    def fit(cls, spec: ScorerSpec, X: np.ndarray, weak: np.ndarray, strong: np.ndarray, weights: np.ndarray) -> "FormatScorer":
        if "text" not in blocks(spec.features):
            raise ValueError("the format scorer needs the text features (its gate is option_chars)")
        from .textfeatures import TEXT_FEATURES

        gate = TEXT_FEATURES.index("option_chars")
        choice = cls.choice(X, gate)
        heads, pooled = {}, None
        for name, rows in (("choice", choice), ("open", ~choice)):
            if rows.sum() >= cls.MIN_ROWS and all(len(set(y[rows].tolist())) == 2 for y in (weak, strong)):
                heads[name] = HeadsScorer.fit(spec, X[rows], weak[rows], strong[rows], weights[rows])
            else:  # fitted on every row, once, and only when a format needs it
                pooled = pooled or HeadsScorer.fit(spec, X, weak, strong, weights)
                heads[name] = pooled
        return cls(heads, gate)

    def score(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        rows = self.choice(X, self.gate)
        out = np.empty(len(X))
        for name, m in (("choice", rows), ("open", ~rows)):
            if m.any():
                out[m] = self.heads[name].score(X[m])
        return out

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {prefix + "gate": np.asarray(self.gate)}
        for name, h in self.heads.items():
            out.update(h.to_arrays(f"{prefix}{name}_"))
        return out

    @classmethod
    def from_arrays(cls, z: dict, prefix: str) -> "FormatScorer":
        heads = {name: HeadsScorer.from_arrays(z, f"{prefix}{name}_") for name in ("choice", "open")}
        return cls(heads, int(z[prefix + "gate"]))


class MFScorer(HeadsScorer):
    kind = "mf"

    @classmethod
    def fit(cls, spec: ScorerSpec, X: np.ndarray, weak: np.ndarray, strong: np.ndarray, weights: np.ndarray) -> "MFScorer":
        decided = weak != strong
        if decided.sum() < 2 or len(set(strong[decided].tolist())) < 2:
            raise ValueError("the matrix-factorisation router needs prompts won by each model")
        comps = int(spec.get("components", 64))
        heads = LinearHeads.fit(
            X[decided], {"strong_wins": strong[decided].astype(float)}, l2=float(spec.get("l2", 100.0)),
            components=comps, weights=weights[decided], passthrough=passthrough(spec.features),
        )
        return cls(heads)


class KNNScorer:
    kind = "knn"

    def __init__(self, center: np.ndarray, proj: np.ndarray, keys: np.ndarray, gain: np.ndarray, weights: np.ndarray,
                 k: int, tau: float, skip: int = 0) -> None:
        self.center, self.proj, self.keys, self.gain, self.weights = center, proj, keys, gain, weights
        self.k, self.tau, self.skip = k, tau, skip

    def embed(self, X: np.ndarray) -> np.ndarray:
        """Unit vectors of the embedding columns (those after `skip`) on the principal directions."""
        E = np.atleast_2d(np.asarray(X, dtype=np.float64))[:, self.skip :]
        return _unit((E - self.center) @ self.proj)

    @classmethod
    def fit(cls, spec: ScorerSpec, X: np.ndarray, weak: np.ndarray, strong: np.ndarray, weights: np.ndarray) -> "KNNScorer":
        if "minilm" not in blocks(spec.features):
            raise ValueError("the kNN scorer needs an embedding in its feature set")
        skip = passthrough(spec.features)
        E = np.asarray(X, dtype=np.float64)[:, skip:]
        center, proj = principal_directions(E, int(spec.get("components", 64)))
        keys = _unit((E - center) @ proj).astype(np.float16)
        gain = strong.astype(np.float64) - weak.astype(np.float64)
        return cls(center, proj, keys, gain, np.asarray(weights, dtype=np.float64), int(spec.get("k", 50)),
                   float(spec.get("tau", 0.05)), skip)

    def score(self, X: np.ndarray, chunk: int = 2048) -> np.ndarray:
        Q = self.embed(X)
        keys = self.keys.astype(np.float64)
        k = min(self.k, len(keys))
        out = np.empty(len(Q))
        for start in range(0, len(Q), chunk):
            sim = Q[start : start + chunk] @ keys.T
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(sim, top, axis=1)
            a = np.exp((s - s.max(1, keepdims=True)) / self.tau) * self.weights[top]
            out[start : start + chunk] = (a * self.gain[top]).sum(1) / a.sum(1)
        return (1.0 + out) / 2.0

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            prefix + "center": self.center.astype(np.float32), prefix + "proj": self.proj.astype(np.float32),
            prefix + "keys": self.keys.astype(np.float16), prefix + "gain": self.gain.astype(np.int8),
            prefix + "weights": self.weights.astype(np.float32), prefix + "k": np.asarray(self.k),
            prefix + "tau": np.asarray(self.tau), prefix + "skip": np.asarray(self.skip),
        }

    @classmethod
    def from_arrays(cls, z: dict, prefix: str) -> "KNNScorer":
        f = lambda key: np.asarray(z[prefix + key], np.float64)  # noqa: E731
        return cls(f("center"), f("proj"), np.asarray(z[prefix + "keys"], np.float16), f("gain"), f("weights"),
                   int(z[prefix + "k"]), float(z[prefix + "tau"]), int(z[prefix + "skip"]))


@dataclass
class EnsembleScorer:
    features: str
    members: list
    member_features: list[str]
    cdfs: list[Calibration] = field(default_factory=list)
    kind: str = "ensemble"

    @classmethod
    def fit(cls, spec: ScorerSpec, X: np.ndarray, weak: np.ndarray, strong: np.ndarray, weights: np.ndarray) -> "EnsembleScorer":
        feats = [m.features for m in spec.members]
        members = [fit_scorer(m, take(X, spec.features, f), weak, strong, weights) for m, f in zip(spec.members, feats)]
        cdfs = [Calibration.from_scores(m.score(take(X, spec.features, f)), points=257) for m, f in zip(members, feats)]
        return cls(spec.features, members, feats, cdfs)

    def score(self, X: np.ndarray) -> np.ndarray:
        parts = [c.cdf(m.score(take(X, self.features, f))) for m, f, c in zip(self.members, self.member_features, self.cdfs)]
        return np.mean(parts, axis=0)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {prefix + "members": np.asarray(len(self.members)), prefix + "features": np.asarray(self.features)}
        for i, (m, f, c) in enumerate(zip(self.members, self.member_features, self.cdfs)):
            p = f"{prefix}m{i}_"
            out.update(m.to_arrays(p))
            out[p + "kind"] = np.asarray(m.kind)
            out[p + "features"] = np.asarray(f)
            out[p + "cdf"] = np.asarray(c.quantiles, dtype=np.float32)
        return out

    @classmethod
    def from_arrays(cls, z: dict, prefix: str) -> "EnsembleScorer":
        members, feats, cdfs = [], [], []
        for i in range(int(z[prefix + "members"])):
            p = f"{prefix}m{i}_"
            members.append(_FAMILIES[str(z[p + "kind"])].from_arrays(z, p))
            feats.append(str(z[p + "features"]))
            cdfs.append(Calibration(tuple(float(q) for q in z[p + "cdf"])))
        return cls(str(z[prefix + "features"]), members, feats, cdfs)


_FAMILIES = {c.kind: c for c in (HeadsScorer, MFScorer, KNNScorer, FormatScorer)}
_FAMILIES["ensemble"] = EnsembleScorer  # type: ignore[assignment]


def fit_scorer(spec: ScorerSpec, X: np.ndarray, weak: np.ndarray, strong: np.ndarray,
               weights: np.ndarray | None = None) -> "HeadsScorer | KNNScorer | EnsembleScorer":
    """Fit the scorer `spec` names on features X and the two models' correctness."""
    if spec.kind not in _FAMILIES:
        raise ValueError(f"unknown scorer kind '{spec.kind}' (known: {', '.join(_FAMILIES)})")
    w = np.ones(len(X)) if weights is None else np.asarray(weights, dtype=np.float64)
    return _FAMILIES[spec.kind].fit(spec, np.asarray(X), np.asarray(weak, bool), np.asarray(strong, bool), w)


def scorer_to_arrays(scorer, prefix: str = "scorer_") -> dict[str, np.ndarray]:
    return {prefix + "kind": np.asarray(scorer.kind), **scorer.to_arrays(prefix)}


def scorer_from_arrays(z: dict, prefix: str = "scorer_"):
    kind = str(z[prefix + "kind"])
    if kind not in _FAMILIES:
        raise ValueError(f"unknown scorer kind '{kind}' in the artefact")
    return _FAMILIES[kind].from_arrays(z, prefix)


__all__ = [
    "ScorerSpec", "HeadsScorer", "MFScorer", "KNNScorer", "FormatScorer", "EnsembleScorer", "fit_scorer", "scorer_to_arrays",
    "scorer_from_arrays",
]
