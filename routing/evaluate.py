"""`tandem route eval`: judge query routers on a RouteLLM-format table, next to random and oracle.

For each router: score every prompt (through `FailSafe`: a failure counts as "send to the
strong model" and is reported in `escalations`), then the metrics of routing/metrics.py. Rows
whose prompt the trained routers saw in training (routing/artifacts/train_prompt_hashes.npy) are
reported apart as well, under `unseen`: the numbers that say how a router does on new prompts.
A PNG plot shows quality against the share of strong-model calls for every router, with the
random and oracle curves and both models' accuracies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .base import DEFAULT_QUERY_ROUTER, FailSafe, get_query_router
from .data import RoutingTable, prompt_hash
from .metrics import oracle_curve, quality_curve, random_curve, route_metrics
from .query import ARTIFACTS


def training_hashes(path: str | Path | None = None) -> np.ndarray:
    p = Path(path) if path else ARTIFACTS / "train_prompt_hashes.npy"
    return np.load(p) if p.exists() else np.zeros(0, dtype=np.uint64)


def seen_mask(table: RoutingTable, hashes: np.ndarray | None = None) -> np.ndarray:
    h = training_hashes() if hashes is None else hashes
    ids = np.array([prompt_hash(p) for p in table.prompts], dtype=np.uint64)
    return np.isin(ids, h)


def spread_sample(n: int, limit: int | None) -> np.ndarray:
    """`limit` row indices spread evenly over n rows (all rows when limit is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def score_table(router: FailSafe, table: RoutingTable) -> np.ndarray:
    return np.asarray(router.score_many(table.prompts), dtype=np.float64)


def _metrics_dict(scores: np.ndarray, table: RoutingTable) -> dict:
    m = route_metrics(scores, table.weak, table.strong).to_dict()
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in m.items()}


def evaluate(
    table: RoutingTable,
    routers: Sequence[str] | None = None,
    *,
    router_kwargs: dict | None = None,
    hashes: np.ndarray | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """{'routers': {name: metrics + 'escalations' + 'unseen'}, 'scores': {name: array}} on one table."""
    names = list(routers) if routers else [DEFAULT_QUERY_ROUTER]
    seen = seen_mask(table, hashes)
    out: dict = {"routers": {}, "scores": {}, "seen_in_training": int(seen.sum())}
    for name in names:
        router = get_query_router(name, **(router_kwargs or {}).get(name, {}))
        log(f"scoring {len(table)} prompts with '{name}'")
        scores = score_table(router, table)
        res = _metrics_dict(scores, table)
        res["escalations"] = router.stats.escalations
        if seen.any() and (~seen).any():
            unseen = table.subset(~seen)
            res["unseen"] = _metrics_dict(scores[~seen], unseen)
        out["routers"][name] = res
        out["scores"][name] = scores
    return out


def plot(table: RoutingTable, scores: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Quality vs share of strong-model calls for each router, with random and oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, s = table.weak, table.strong
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, sc in scores.items():
        c = quality_curve(sc, w, s)
        ax.plot(c.shares * 100, c.accuracy * 100, label=name, linewidth=1.6)
    r, o = random_curve(w, s), oracle_curve(w, s)
    ax.plot(r.shares * 100, r.accuracy * 100, "--", color="grey", label="random (expected)")
    ax.plot(o.shares * 100, o.accuracy * 100, ":", color="black", label="oracle")
    wa, sa = float(np.mean(w)), float(np.mean(s))
    ax.axhline(wa * 100, color="tab:orange", linewidth=0.8, alpha=0.6)
    ax.axhline(sa * 100, color="tab:red", linewidth=0.8, alpha=0.6)
    ax.axhline((wa + 0.95 * (sa - wa)) * 100, color="tab:red", linewidth=0.8, linestyle="-.", alpha=0.6,
               label="95% of the gap")
    ax.set_xlabel("strong (cloud) model calls, % of queries")
    ax.set_ylabel("accuracy, %")
    ax.set_title(title or f"quality vs cloud calls ({len(table)} prompts)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["evaluate", "plot", "seen_mask", "training_hashes", "spread_sample"]
