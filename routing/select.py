"""Choosing a query router by grouped cross-validation, and measuring the choice honestly.

Folds (`fold_ids`): MMLU rows go by whole domain (the domains in alphabetical order, dealt round
robin), other rows (GSM8K) by a salted hash of the prompt; so a score is always that of a model
that never saw the prompt's domain.

Selection criterion: the out-of-fold scores of every row are pooled per data set (GSM8K, MMLU)
and each set's APGR is taken (routing/metrics.py); a candidate's criterion is the mean of the
two. The candidate with the highest criterion wins (the first listed on a tie).

Nested cross-validation (`nested_cv`) reports what the selection itself is worth on unseen
domains: for each outer fold f, the selection runs on the other outer folds alone (inner folds
made from them with another salt), the winner is refitted on them and scores fold f. The
reported metrics are those of these outer scores, pooled per data set; no outer-fold label is
ever read by the selection that scored it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .data import RoutingTable, mmlu_domain, prompt_hash
from .features import take
from .metrics import route_metrics
from .scorers import ScorerSpec, fit_scorer

OUTER_FOLDS = 5
INNER_FOLDS = 4


def fold_ids(table: RoutingTable, folds: int, salt: str = "fold:") -> np.ndarray:
    """A fold per row: MMLU rows by domain (domains in alphabetical order, round robin), the others
    by sha256(salt + prompt) modulo `folds`."""
    domains = sorted({d for d in (mmlu_domain(s) for s in table.sources) if d is not None})
    dom_fold = {d: i % folds for i, d in enumerate(domains)}
    return np.array(
        [dom_fold[d] if (d := mmlu_domain(s)) is not None else prompt_hash(salt + p) % folds
         for p, s in zip(table.prompts, table.sources)],
        dtype=np.int64,
    )


def data_sets(table: RoutingTable) -> dict[str, np.ndarray]:
    """Row masks of the two workloads a router is judged on: {'gsm8k': ..., 'mmlu': ...}."""
    is_mmlu = np.array([mmlu_domain(s) is not None for s in table.sources], dtype=bool)
    return {name: m for name, m in (("gsm8k", ~is_mmlu), ("mmlu", is_mmlu)) if m.any()}


def balance_weights(table: RoutingTable) -> np.ndarray:
    """Row weights giving each data set the same total weight (n / (2 n_set) per row), so the
    larger one (MMLU) does not set the direction alone."""
    sets = data_sets(table)
    w = np.ones(len(table))
    if len(sets) == 2:
        for m in sets.values():
            w[m] = len(table) / (2 * m.sum())
    return w


def per_set_metrics(scores: np.ndarray, table: RoutingTable) -> dict[str, dict]:
    """route_metrics of `scores` within each data set."""
    return {name: route_metrics(scores[m], table.weak[m], table.strong[m]).to_dict() for name, m in data_sets(table).items()}


def criterion(scores: np.ndarray, table: RoutingTable) -> float:
    """The mean over data sets of the APGR of the pooled scores (the selection criterion)."""
    return float(np.mean([m["apgr"] for m in per_set_metrics(scores, table).values()]))


def oof_scores(spec: ScorerSpec, X: np.ndarray, table: RoutingTable, folds: np.ndarray, layout: str) -> np.ndarray:
    """Out-of-fold scores: each fold scored by the scorer fitted on the other folds (X is laid
    out as the feature set `layout`; the spec reads its own columns)."""
    out = np.empty(len(table))
    weights = balance_weights(table)
    X = take(X, layout, spec.features)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        scorer = fit_scorer(spec, X[tr], table.weak[tr], table.strong[tr], weights[tr])
        out[te] = scorer.score(X[te])
    return out


@dataclass
class Selection:
    best: ScorerSpec
    criteria: dict[str, float]  # candidate name -> criterion
    oof: dict[str, np.ndarray]  # candidate name -> out-of-fold scores


def select(
    specs: Sequence[ScorerSpec], X: np.ndarray, table: RoutingTable, layout: str, folds: int = OUTER_FOLDS,
    salt: str = "fold:", log: Callable[[str], None] = lambda s: None,
) -> Selection:
    """The candidate with the best grouped cross-validated criterion on `table`."""
    fid = fold_ids(table, folds, salt)
    criteria, oof = {}, {}
    for spec in specs:
        oof[spec.name] = oof_scores(spec, X, table, fid, layout)
        criteria[spec.name] = criterion(oof[spec.name], table)
        log(f"  {spec.name}: {criteria[spec.name]:.4f}")
    best = max(specs, key=lambda s: criteria[s.name])
    return Selection(best, criteria, oof)


def nested_cv(
    specs: Sequence[ScorerSpec], X: np.ndarray, table: RoutingTable, layout: str, outer: int = OUTER_FOLDS,
    inner: int = INNER_FOLDS, log: Callable[[str], None] = lambda s: None,
) -> tuple[np.ndarray, list[str]]:
    """(outer scores of the selection procedure, the winner of each outer fold's selection)."""
    fid = fold_ids(table, outer)
    out = np.empty(len(table))
    winners = []
    weights = balance_weights(table)
    for f in range(outer):
        tr, te = fid != f, fid == f
        part = table.subset(tr)
        log(f"outer fold {f}: selecting on {tr.sum()} rows, scoring {te.sum()}")
        best = select(specs, X[tr], part, layout, inner, salt=f"inner{f}:", log=log).best
        winners.append(best.name)
        Xb = take(X, layout, best.features)
        out[te] = fit_scorer(best, Xb[tr], part.weak, part.strong, weights[tr]).score(Xb[te])
    return out, winners


__all__ = [
    "fold_ids", "data_sets", "balance_weights", "per_set_metrics", "criterion", "oof_scores", "select", "nested_cv",
    "Selection", "OUTER_FOLDS", "INNER_FOLDS",
]
