"""Building the query routers' artefacts (`tandem route train`), from ../shared/data/routing only.

    training rows   the train part of the fixed split in routing/data.py (GSM8K: ~70% of the
                    prompts by a salted hash; MMLU: 25 of the 38 domains); held-out rows are
                    never read here
    embedding       all-MiniLM-L6-v2 embeddings of every training prompt, projected on their top
                    64 principal directions -> two L2-penalised logistic heads (P(strong correct),
                    P(weak correct)), the GSM8K rows weighted up to as much total weight as the
                    MMLU rows (so one data set does not set the direction alone); the penalty is
                    chosen by 5-fold cross-validation on the training rows (folds by MMLU domain,
                    and by hash for GSM8K), maximising the mean APGR within each data set and fold
    prefill         the device model's prefill signals (routing/signals.py) for a sample of the
                    training rows (`gsm8k_sample` GSM8K training prompts, `per_domain` prompts of
                    each MMLU training domain); of them prompt length, mean log-perplexity and
                    mean entropy (PREFILL_FEATURES: the ones whose relation to the gain has the
                    same sign on both training sets) -> the same two heads, same selection
    calibration     quantiles of the out-of-fold scores (scores of prompts the heads did not see),
                    so a target share of cloud calls carries over to new prompts

Outputs in routing/artifacts/: embedding_router.npz, prefill_router.npz, train_prompt_hashes.npy
(the 64-bit hashes of every training prompt, so `tandem route eval` can tell seen from unseen
prompts) and train_manifest.json (what was trained on, the chosen penalties, the CV scores).
Everything is deterministic given the data.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import Calibration
from .data import RoutingTable, load_shared, mmlu_domain, prompt_hash, split
from .linear import LinearHeads
from .metrics import route_metrics
from .query import ARTIFACTS

L2_GRID = (1.0, 10.0, 100.0, 1000.0)
FOLDS = 5
EMBEDDING_COMPONENTS = 64
# The prefill signals whose relation to the strong model's gain points the same way on both
# training sets (GSM8K and MMLU); the others flip sign between them.
PREFILL_FEATURES = ("log_len", "nll_mean", "entropy_mean")


def fold_ids(table: RoutingTable, folds: int = FOLDS) -> np.ndarray:
    """A fold per row: MMLU rows by domain (whole domains per fold), others by prompt hash."""
    out = np.empty(len(table), dtype=np.int64)
    domains = sorted({d for d in (mmlu_domain(s) for s in table.sources) if d is not None})
    dom_fold = {d: i % folds for i, d in enumerate(domains)}
    for i, (p, s) in enumerate(zip(table.prompts, table.sources)):
        d = mmlu_domain(s)
        out[i] = dom_fold[d] if d is not None else prompt_hash("fold:" + p) % folds
    return out


def _targets(table: RoutingTable) -> dict[str, np.ndarray]:
    return {"strong": table.strong.astype(float), "weak": table.weak.astype(float)}


def balance_weights(table: RoutingTable) -> np.ndarray:
    """Row weights giving each data set (GSM8K, MMLU) the same total weight."""
    fam = np.array([mmlu_domain(s) is not None for s in table.sources])
    w = np.ones(len(table))
    for f in (True, False):
        m = fam == f
        if m.any():
            w[m] = len(table) / (2 * m.sum()) if (~m).any() else 1.0
    return w


def cross_validate(
    X: np.ndarray, table: RoutingTable, l2_grid=L2_GRID, folds: int = FOLDS, components: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[float, np.ndarray, dict]:
    """(best l2, out-of-fold scores for it, {l2: mean APGR}) by grouped K-fold; the APGR is taken
    within each data set of each fold (routing ranks prompts of one workload)."""
    fid = fold_ids(table, folds)
    fam = np.array([mmlu_domain(s) is not None for s in table.sources])
    weights = balance_weights(table)
    results: dict[float, float] = {}
    oof_by_l2: dict[float, np.ndarray] = {}
    for l2 in l2_grid:
        oof = np.zeros(len(table))
        apgrs = []
        for f in range(folds):
            tr, te = fid != f, fid == f
            heads = LinearHeads.fit(X[tr], {k: v[tr] for k, v in _targets(table).items()}, l2=l2,
                                    components=components, weights=weights[tr])
            oof[te] = heads.router_score(X[te])
            for m in (te & fam, te & ~fam):
                part = table.subset(m)
                if len(part) > 20 and part.strong.mean() != part.weak.mean():
                    apgrs.append(route_metrics(oof[m], part.weak, part.strong).apgr)
        results[l2] = float(np.mean(apgrs))
        oof_by_l2[l2] = oof
        log(f"  l2={l2:g}: mean out-of-fold APGR {results[l2]:.3f}")
    best = max(results, key=lambda k: results[k])
    return best, oof_by_l2[best], {str(k): v for k, v in results.items()}


def _fit_and_save(
    name: str, X: np.ndarray, table: RoutingTable, out: Path, meta: dict, log: Callable[[str], None],
    components: int | None = None,
) -> dict:
    log(f"{name}: {len(table)} training prompts, {X.shape[1]} features" + (f" -> {components} components" if components else ""))
    l2, oof, cv = cross_validate(X, table, components=components, log=log)
    heads = LinearHeads.fit(X, _targets(table), l2=l2, components=components, weights=balance_weights(table))
    cal = Calibration.from_scores(oof)
    arrays = heads.to_arrays()
    arrays["quantiles"] = np.asarray(cal.quantiles, dtype=np.float32)
    for k, v in {**meta, "l2": l2, "n_train": len(table)}.items():
        arrays[f"meta_{k}"] = np.asarray(v)
    path = out / f"{name}_router.npz"
    np.savez_compressed(path, **arrays)
    log(f"{name}: l2={l2:g}, wrote {path.name} ({path.stat().st_size / 1024:.0f} KiB)")
    return {"l2": l2, "components": components, "cv_mean_apgr": cv, "n_train": len(table), "file": path.name}


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


def train_query_routers(
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    routers: tuple[str, ...] = ("embedding", "prefill"),
    per_domain: int = 5,
    gsm8k_sample: int = 120,
    device_model: str = "smollm2-135m",
    max_tokens: int = 128,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    out = Path(out) if out else ARTIFACTS
    out.mkdir(parents=True, exist_ok=True)
    tables = load_shared(data_dir)
    parts = {name: split(t) for name, t in tables.items()}
    train = RoutingTable.concat([parts["gsm8k"][0], parts["mmlu"][0]])
    heldout_n = {name: len(p[1]) for name, p in parts.items()}
    log(f"training rows: {len(train)} (gsm8k {len(parts['gsm8k'][0])}, mmlu {len(parts['mmlu'][0])}); "
        f"held out and never read: gsm8k {heldout_n['gsm8k']}, mmlu {heldout_n['mmlu']}")
    digest = hashlib.sha256("\n".join(train.prompts).encode("utf-8")).hexdigest()[:16]
    manifest = {
        "split": {
            "gsm8k": "held out when sha256(salt + prompt) falls in the lowest 30% (routing/data.py)",
            "mmlu": "whole domains held out: every third of the 38 domain files in alphabetical order",
            "train_rows": {"gsm8k": len(parts["gsm8k"][0]), "mmlu": len(parts["mmlu"][0])},
            "heldout_rows": heldout_n,
            "train_prompts_sha256": digest,
        },
        "routers": {},
    }
    hashes = np.unique(np.array([prompt_hash(p) for p in train.prompts], dtype=np.uint64))
    np.save(out / "train_prompt_hashes.npy", hashes)

    if "embedding" in routers:
        from .embed import EMBEDDING_MODEL, embed_cached

        t0 = time.perf_counter()
        X = embed_cached(train.prompts, cache_dir=cache_dir)
        log(f"embedding: {len(train)} prompts embedded in {time.perf_counter() - t0:.0f} s")
        manifest["routers"]["embedding"] = _fit_and_save(
            "embedding", X, train, out, {"model": EMBEDDING_MODEL, "train_sha256": digest}, log,
            components=EMBEDDING_COMPONENTS,
        )
    if "prefill" in routers:
        from ..local_runtime.models import load_model
        from .cache import FeatureCache
        from .signals import SIGNAL_NAMES, prefill_signals

        sample = _sample(train, per_domain, gsm8k_sample)
        lm = load_model(device_model, progress=False)
        t0 = time.perf_counter()
        cache = FeatureCache(f"prefill-{device_model}-{max_tokens}", cache_dir)
        X = cache.get_many(sample.prompts, lambda ps: prefill_signals(lm, ps, max_tokens=max_tokens), save_every=128)
        log(f"prefill: signals of {len(sample)} prompts in {time.perf_counter() - t0:.0f} s")
        cols = [SIGNAL_NAMES.index(f) for f in PREFILL_FEATURES]
        manifest["routers"]["prefill"] = _fit_and_save(
            "prefill", X[:, cols], sample, out,
            {"model": device_model, "max_tokens": max_tokens, "features": ",".join(PREFILL_FEATURES), "train_sha256": digest},
            log,
        )
        manifest["routers"]["prefill"].update(per_domain=per_domain, gsm8k_sample=gsm8k_sample)
    path = out / "train_manifest.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old_routers = old.get("routers", {}) if old.get("split", {}).get("train_prompts_sha256") == digest else {}
    manifest["routers"] = {**old_routers, **manifest["routers"]}
    manifest.setdefault("token_router", old.get("token_router"))
    if manifest["token_router"] is None:
        manifest.pop("token_router")
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["train_query_routers", "cross_validate", "fold_ids"]
