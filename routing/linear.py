"""Logistic regression in plain numpy: the classifiers behind the trained routers.

    p(y = 1 | x) = sigmoid(w . z + b),   z = (x - mean) / scale

fitted by Newton's method on the L2-penalised log-loss

    L(w, b) = - sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] + (l2 / 2) |w|^2

(the bias is not penalised). The problems here are small (hundreds of features, thousands of
rows), where Newton converges in a handful of steps and the result is deterministic.

Features may first be centred and projected on their top principal components
(x -> (x - center) @ proj, fitted on the training rows): with hundreds of embedding dimensions
and a few dozen training domains, the heads otherwise learn directions that only name a domain.
The first `passthrough` columns (a few hand-made features in front of an embedding) can be kept
as they are: proj is then block-diagonal, [[I, 0], [0, V]] with V the embedding's directions.

A `LinearHeads` holds one or more such heads on the same features. With two heads named
`strong` and `weak` (each model's chance of answering correctly), a query router's score is the
expected gain of the strong model, mapped into [0, 1]: (1 + p_strong - p_weak) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def principal_directions(X: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, V): the column means of X and its top `components` principal directions (D, c),
    the leading eigenvectors of the covariance (X - mean)^T (X - mean), each signed so that its
    largest-magnitude entry is positive (the same data always gives the same directions)."""
    X = np.asarray(X, dtype=np.float64)
    center = X.mean(0)
    Xc = X - center
    vals, vecs = np.linalg.eigh(Xc.T @ Xc)
    V = vecs[:, np.argsort(-vals, kind="stable")[:components]]
    signs = np.sign(V[np.abs(V).argmax(0), np.arange(V.shape[1])])
    return center, V * np.where(signs == 0, 1.0, signs)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def fit_logistic(
    X: np.ndarray, y: np.ndarray, *, l2: "float | np.ndarray" = 1.0, weights: np.ndarray | None = None, steps: int = 50, tol: float = 1e-8
) -> tuple[np.ndarray, float]:
    """(w, b) minimising the penalised log-loss above on already standardised X."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = X.shape
    sw = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    A = np.hstack([X, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.zeros(d + 1)
    reg[:-1] = l2  # a number, or one penalty per feature
    for _ in range(steps):
        p = sigmoid(A @ theta)
        grad = A.T @ (sw * (p - y)) + reg * theta
        h = sw * p * (1 - p)
        H = (A * h[:, None]).T @ A + np.diag(reg + 1e-9)
        delta = np.linalg.solve(H, grad)
        theta -= delta
        if np.max(np.abs(delta)) < tol:
            break
    return theta[:-1], float(theta[-1])


@dataclass
class LinearHeads:
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    W: np.ndarray  # (heads, d)
    b: np.ndarray  # (heads,)
    names: tuple[str, ...]
    center: np.ndarray | None = None  # (D,) subtracted before the projection
    proj: np.ndarray | None = None  # (D, d) principal directions

    def project(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        return X if self.proj is None else (X - self.center) @ self.proj

    def probs(self, X: np.ndarray) -> np.ndarray:
        """(n, heads) probabilities."""
        Z = (self.project(X) - self.mean) / self.scale
        return sigmoid(Z @ self.W.T + self.b)

    def router_score(self, X: np.ndarray) -> np.ndarray:
        """(n,) scores in [0, 1]: the expected gain (1 + p_strong - p_weak) / 2 with heads
        strong/weak, or the single head's probability."""
        P = self.probs(X)
        if self.names == ("strong", "weak"):
            return (1.0 + P[:, 0] - P[:, 1]) / 2.0
        return P[:, 0]

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        targets: dict[str, np.ndarray],
        *,
        l2: "float | np.ndarray" = 1.0,
        standardize: bool = True,
        components: int | None = None,
        weights: np.ndarray | None = None,
        passthrough: int = 0,
    ) -> "LinearHeads":
        """Fit every head on X; `components` projects the columns after the first `passthrough`
        on that many principal directions first, `weights` weighs the rows of the log-loss."""
        X = np.asarray(X, dtype=np.float64)
        center = proj = None
        rest = X.shape[1] - passthrough
        if components is not None and components < rest:
            c_rest, V = principal_directions(X[:, passthrough:], components)
            center = np.concatenate([np.zeros(passthrough), c_rest])
            proj = np.zeros((X.shape[1], passthrough + components))
            proj[:passthrough, :passthrough] = np.eye(passthrough)
            proj[passthrough:, passthrough:] = V
            X = (X - center) @ proj
        mean = X.mean(0) if standardize else np.zeros(X.shape[1])
        scale = X.std(0) if standardize else np.ones(X.shape[1])
        scale = np.where(scale > 1e-12, scale, 1.0)
        Z = (X - mean) / scale
        W, b = [], []
        for name in targets:
            w, c = fit_logistic(Z, targets[name], l2=l2, weights=weights)
            W.append(w)
            b.append(c)
        return cls(mean=mean, scale=scale, W=np.array(W), b=np.array(b), names=tuple(targets), center=center, proj=proj)

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = {
            prefix + "mean": self.mean.astype(np.float32),
            prefix + "scale": self.scale.astype(np.float32),
            prefix + "W": self.W.astype(np.float32),
            prefix + "b": self.b.astype(np.float32),
            prefix + "names": np.array(self.names),
        }
        if self.proj is not None:
            out[prefix + "center"] = self.center.astype(np.float32)
            out[prefix + "proj"] = self.proj.astype(np.float32)
        return out

    @classmethod
    def from_arrays(cls, z, prefix: str = "") -> "LinearHeads":
        return cls(
            mean=np.asarray(z[prefix + "mean"], np.float64),
            scale=np.asarray(z[prefix + "scale"], np.float64),
            W=np.asarray(z[prefix + "W"], np.float64),
            b=np.asarray(z[prefix + "b"], np.float64),
            names=tuple(str(s) for s in z[prefix + "names"]),
            center=np.asarray(z[prefix + "center"], np.float64) if prefix + "center" in z else None,
            proj=np.asarray(z[prefix + "proj"], np.float64) if prefix + "proj" in z else None,
        )


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


__all__ = ["principal_directions", "sigmoid", "fit_logistic", "LinearHeads", "load_npz"]
