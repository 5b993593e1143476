"""Building the query routers' artefacts (`tandem route train`), from ../shared/data/routing only.

    rows        every prompt of ../shared/data/routing (GSM8K and the 38 MMLU domains); routers
                are judged on other prompts in the same format, so nothing here is held back
                beyond the cross-validation folds
    features    the prompt's domain-free text features and its all-MiniLM-L6-v2 embedding
                (routing/features.py)
    candidates  CANDIDATES: each scorer family (routing/scorers.py) with a small grid of
                hyperparameters and feature sets
    selection   grouped 5-fold cross-validation (routing/select.py: MMLU folds by whole domain,
                GSM8K by prompt hash); criterion: the mean over GSM8K and MMLU of the APGR of the
                pooled out-of-fold scores. Each family keeps its best candidate, refitted on every
                row (artefact `<family>_router.npz`); the family of the best candidate overall is
                the default query router (DEFAULT_QUERY_ROUTER in routing/base.py)
    report      nested cross-validation of that whole selection (5 outer folds by domain / hash,
                4 inner folds): the metrics of the outer scores, which the selection never read
    calibration quantiles of the chosen candidate's out-of-fold scores (scores of prompts its
                fitted heads did not see), so a target share of cloud calls carries over
    prefill     the device model's prefill signals (routing/signals.py) for a sample of the rows of
                the train part of routing/data.py's split -> two logistic heads, the penalty
                chosen by the same grouped cross-validation

Outputs in routing/artifacts/: the routers' `.npz` files, train_prompt_hashes.npy (the 64-bit
hashes of every prompt any router was trained on, so `tandem route eval` can tell seen from unseen
prompts) and train_manifest.json (rows, candidates and their criteria, the winner, the nested
cross-validation report). Everything is deterministic given the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import Calibration
from .data import RoutingTable, load_shared, mmlu_domain, prompt_hash, split
from .features import prompt_features, take
from .linear import LinearHeads
from .query import ARTIFACTS
from .scorers import ScorerSpec, fit_scorer, scorer_to_arrays
from .select import balance_weights, criterion, fold_ids, nested_cv, per_set_metrics, select

FEATURES = "text+minilm"
L2_GRID = (1.0, 10.0, 100.0, 1000.0)
# The prefill signals whose relation to the strong model's gain points the same way on both
# training sets (GSM8K and MMLU); the others flip sign between them.
PREFILL_FEATURES = ("log_len", "nll_mean", "entropy_mean")


def _grid(kind: str, features: str, **axes: tuple[float, ...]) -> list[ScorerSpec]:
    """Every combination of the given hyperparameter values."""
    specs = [()]
    for key, values in axes.items():
        specs = [p + ((key, float(v)),) for p in specs for v in values]
    return [ScorerSpec(kind, features, p) for p in specs]


_KNN = ScorerSpec("knn", "minilm", (("components", 32.0), ("k", 200.0), ("tau", 0.1)))
_HEADS = ScorerSpec("heads", FEATURES, (("components", 4.0), ("l2", 100.0)))
_MF = ScorerSpec("mf", FEATURES, (("components", 4.0), ("l2", 100.0)))

# family (registry name) -> its candidates
CANDIDATES: dict[str, list[ScorerSpec]] = {
    "embedding": _grid("heads", "text", l2=(10, 100, 1000))
    + _grid("heads", FEATURES, components=(4, 16, 64), l2=(10, 100, 1000)),
    "format": _grid("format", "text", l2=(100, 1000)) + _grid("format", FEATURES, components=(4, 16), l2=(100, 1000)),
    "mf": _grid("mf", "text", l2=(10, 100, 1000)) + _grid("mf", FEATURES, components=(4, 16, 64), l2=(10, 100, 1000)),
    "knn": _grid("knn", "minilm", components=(32,), k=(50, 200, 800), tau=(0.1, 1.0)),
    "ensemble": [
        ScorerSpec("ensemble", members=(_HEADS, _KNN)),
        ScorerSpec("ensemble", members=(_HEADS, _MF, _KNN)),
        ScorerSpec("ensemble", members=(ScorerSpec("heads", "text", (("l2", 100.0),)), _KNN)),
    ],
}


def all_candidates() -> list[ScorerSpec]:
    return [s for specs in CANDIDATES.values() for s in specs]


def family_of(spec: ScorerSpec) -> str:
    return next(f for f, specs in CANDIDATES.items() if spec in specs)


def cross_validate(
    X: np.ndarray, table: RoutingTable, l2_grid=L2_GRID, log: Callable[[str], None] = print
) -> tuple[float, np.ndarray, dict]:
    """(best l2, its out-of-fold scores, {l2: criterion}) for two plain logistic heads on X, by
    the grouped folds and criterion of routing/select.py."""
    fid = fold_ids(table, 5)
    weights = balance_weights(table)
    targets = {"strong": table.strong.astype(float), "weak": table.weak.astype(float)}
    results, oofs = {}, {}
    for l2 in l2_grid:
        oof = np.empty(len(table))
        for f in np.unique(fid):
            tr, te = fid != f, fid == f
            heads = LinearHeads.fit(X[tr], {k: v[tr] for k, v in targets.items()}, l2=l2, weights=weights[tr])
            oof[te] = heads.router_score(X[te])
        results[l2], oofs[l2] = criterion(oof, table), oof
        log(f"  l2={l2:g}: criterion {results[l2]:.3f}")
    best = max(results, key=lambda k: results[k])
    return best, oofs[best], {str(k): v for k, v in results.items()}


def _save(path: Path, arrays: dict[str, np.ndarray], oof: np.ndarray, meta: dict) -> None:
    arrays = dict(arrays)
    arrays["quantiles"] = np.asarray(Calibration.from_scores(oof).quantiles, dtype=np.float32)
    for k, v in meta.items():
        arrays[f"meta_{k}"] = np.asarray(v)
    np.savez_compressed(path, **arrays)


def _rounded(metrics: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()} for name, m in metrics.items()}


def train_learned_routers(
    table: RoutingTable, out: Path, *, cache_dir: str | Path | None = None, nested: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Select, fit and save every learned family; the manifest's 'learned' section."""
    t0 = time.perf_counter()
    X = prompt_features(table.prompts, FEATURES, cache_dir=cache_dir, use_cache=True)
    log(f"features of {len(table)} prompts in {time.perf_counter() - t0:.0f} s")
    sel = select(all_candidates(), X, table, FEATURES, log=log)
    report: dict = {"criterion": "mean over GSM8K and MMLU of the APGR of pooled out-of-fold scores",
                    "folds": "5; MMLU by whole domain (alphabetical, round robin), GSM8K by sha256('fold:' + prompt) % 5",
                    "candidates": {n: round(v, 4) for n, v in sel.criteria.items()}, "families": {}}
    for family, specs in CANDIDATES.items():
        best = max(specs, key=lambda s: sel.criteria[s.name])
        scorer = fit_scorer(best, take(X, FEATURES, best.features), table.weak, table.strong, balance_weights(table))
        path = out / f"{family}_router.npz"
        _save(path, scorer_to_arrays(scorer), sel.oof[best.name],
              {"spec": best.name, "features": best.features, "criterion": sel.criteria[best.name], "n_train": len(table)})
        report["families"][family] = {"spec": best.name, "criterion": round(sel.criteria[best.name], 4),
                                      "cv": _rounded(per_set_metrics(sel.oof[best.name], table)), "file": path.name,
                                      "bytes": path.stat().st_size}
        log(f"{family}: {best.name} -> {path.name} ({path.stat().st_size / 1024:.0f} KiB)")
    report["winner"] = family_of(sel.best)
    report["winner_spec"] = sel.best.name
    if nested:
        outer, winners = nested_cv(all_candidates(), X, table, FEATURES, log=log)
        report["nested_cv"] = {
            "split": "outer: the 5 folds above; inner: 4 folds of the outer-training rows (MMLU by domain, GSM8K by "
                     "sha256('inner<f>:' + prompt) % 4); each outer fold scored by the inner winner refitted on the "
                     "other 4 outer folds",
            "winners": winners, "metrics": _rounded(per_set_metrics(outer, table)),
        }
    return report


def _sample(table: RoutingTable, per_domain: int, others: int) -> RoutingTable:
    """The first `per_domain` rows (in prompt-hash order) of each MMLU domain and the first
    `others` of the remaining rows."""
    keep = np.zeros(len(table), dtype=bool)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(table.sources):
        d = mmlu_domain(s)
        groups.setdefault("mmlu:" + d if d is not None else "other", []).append(i)
    for key, rows in groups.items():
        rows.sort(key=lambda i: prompt_hash("sample:" + table.prompts[i]))
        keep[rows[: (others if key == "other" else per_domain)]] = True
    return table.subset(keep)


def _train_prefill(train: RoutingTable, out: Path, *, per_domain: int, gsm8k_sample: int, device_model: str,
                   max_tokens: int, cache_dir, log: Callable[[str], None]) -> dict:
    from ..local_runtime.models import load_model
    from .cache import FeatureCache
    from .signals import SIGNAL_NAMES, prefill_signals

    sample = _sample(train, per_domain, gsm8k_sample)
    lm = load_model(device_model, progress=False)
    t0 = time.perf_counter()
    cache = FeatureCache(f"prefill-{device_model}-{max_tokens}", cache_dir)
    X = cache.get_many(sample.prompts, lambda ps: prefill_signals(lm, ps, max_tokens=max_tokens), save_every=128)
    log(f"prefill: signals of {len(sample)} prompts in {time.perf_counter() - t0:.0f} s")
    X = X[:, [SIGNAL_NAMES.index(f) for f in PREFILL_FEATURES]]
    l2, oof, cv = cross_validate(X, sample, log=log)
    targets = {"strong": sample.strong.astype(float), "weak": sample.weak.astype(float)}
    heads = LinearHeads.fit(X, targets, l2=l2, weights=balance_weights(sample))
    path = out / "prefill_router.npz"
    _save(path, heads.to_arrays(), oof, {"model": device_model, "max_tokens": max_tokens,
                                         "features": ",".join(PREFILL_FEATURES), "l2": l2, "n_train": len(sample)})
    return {"l2": l2, "cv_criterion": cv, "n_train": len(sample), "file": path.name, "per_domain": per_domain,
            "gsm8k_sample": gsm8k_sample, "rows": "a sample of the train part of routing/data.py's split"}


def _one_blas_thread():
    """BLAS limited to one thread while training, where threadpoolctl is installed: the many
    small fits here run tens of times faster so on a machine whose cores are shared."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def train_query_routers(
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    routers: tuple[str, ...] = ("learned",),
    per_domain: int = 5,
    gsm8k_sample: int = 120,
    device_model: str = "smollm2-135m",
    max_tokens: int = 128,
    cache_dir: str | Path | None = None,
    nested: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the named groups ('learned': every family in CANDIDATES; 'prefill') and update the
    manifest; returns it."""
    unknown = set(routers) - {"learned", "prefill"}
    if unknown:
        raise ValueError(f"unknown router group(s) {', '.join(sorted(unknown))} (known: learned, prefill)")
    out = Path(out) if out else ARTIFACTS
    out.mkdir(parents=True, exist_ok=True)
    tables = load_shared(data_dir)
    table = RoutingTable.concat([tables["gsm8k"], tables["mmlu"]])
    digest = hashlib.sha256("\n".join(table.prompts).encode("utf-8")).hexdigest()[:16]
    path = out / "train_manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest["data"] = {"rows": {name: len(t) for name, t in tables.items()}, "prompts_sha256": digest}
    manifest.pop("split", None)
    log(f"rows: gsm8k {len(tables['gsm8k'])}, mmlu {len(tables['mmlu'])} ({len(set(tables['mmlu'].sources))} domains)")
    hashes = np.unique(np.array([prompt_hash(p) for p in table.prompts], dtype=np.uint64))
    np.save(out / "train_prompt_hashes.npy", hashes)
    if "learned" in routers:
        with _one_blas_thread():
            manifest["learned"] = train_learned_routers(table, out, cache_dir=cache_dir, nested=nested, log=log)
        manifest.get("routers", {}).pop("embedding", None)  # now one of the learned families
    if "prefill" in routers:
        train = RoutingTable.concat([split(tables["gsm8k"])[0], split(tables["mmlu"])[0]])
        manifest.setdefault("routers", {})["prefill"] = _train_prefill(
            train, out, per_domain=per_domain, gsm8k_sample=gsm8k_sample, device_model=device_model,
            max_tokens=max_tokens, cache_dir=cache_dir, log=log)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["train_query_routers", "train_learned_routers", "cross_validate", "CANDIDATES", "all_candidates", "FEATURES"]
