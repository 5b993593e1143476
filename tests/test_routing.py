"""Routers: registry, fail-safe escalation, token routers, the hidden-state tap, the data split,
and `tandem route eval` on small tables (no trained model needed)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tandem.routing.base import (
    FailSafe,
    TokenContext,
    get_query_router,
    get_token_router,
    query_router_names,
    register_query_router,
    token_router_names,
)
from tandem.routing.data import (
    HELDOUT_MMLU_DOMAINS,
    default_data_dir,
    is_heldout,
    load_table,
    read_csv,
    split,
)
from tandem.sdk.cli import app

runner = CliRunner()
SHARED = default_data_dir()
needs_shared = pytest.mark.skipif(not (SHARED / "gsm8k.csv").exists(), reason="../shared/data/routing is absent")


# ---------------------------------------------------------------------------------------------
# registry and fail-safe


class Broken:
    name = "broken"
    calibration = None

    def __init__(self, value):
        self.value = value

    def score(self, *args):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_registry_names():
    assert {"random", "length", "embedding", "prefill"} <= set(query_router_names())
    assert {"confidence", "entropy", "reward"} <= set(token_router_names())
    with pytest.raises(KeyError, match="unknown query router 'nope'"):
        get_query_router("nope")
    with pytest.raises(KeyError, match="unknown token router"):
        get_token_router("nope")


def test_register_a_router():
    register_query_router("test-const", lambda: Broken(0.25), "a constant, for this test")
    r = get_query_router("test-const")
    assert isinstance(r, FailSafe) and r.score("anything") == 0.25


@pytest.mark.parametrize("value", [RuntimeError("boom"), float("nan"), float("inf"), -0.5, 1.01, None, "high"])
def test_query_router_failures_escalate_and_are_counted(value):
    r = FailSafe(Broken(value))
    assert r.score("q") == 1.0
    assert r.stats.escalations == 1 and r.stats.calls == 1
    assert (r.stats.errors, r.stats.invalid) == ((1, 0) if isinstance(value, Exception) else (0, 1))
    assert r.score_many(["a", "b"]).tolist() == [1.0, 1.0]
    assert r.stats.escalations == 3


@pytest.mark.parametrize("value", [RuntimeError("boom"), float("nan"), 2.0])
def test_token_router_failures_escalate(value):
    r = FailSafe(Broken(value), kind="token")
    assert r.score(TokenContext(logits=np.zeros(4)), 1) == 0.0
    assert r.stats.escalations == 1


def test_valid_scores_pass_untouched():
    r = FailSafe(Broken(0.3))
    assert r.score("q") == 0.3 and r.stats.escalations == 0


def test_batched_scoring_guards_each_value():
    class Many(Broken):
        def score_many(self, qs):
            return [0.2, float("nan"), 0.9]

    r = FailSafe(Many(0.0))
    assert r.score_many(["a", "b", "c"]).tolist() == [0.2, 1.0, 0.9]
    assert r.stats.invalid == 1


def test_random_router_is_reproducible_and_uniform():
    r = get_query_router("random")
    qs = [f"question {i}" for i in range(4000)]
    s = r.score_many(qs)
    assert s.tolist() == r.score_many(qs).tolist()
    assert 0.0 <= s.min() and s.max() < 1.0
    assert abs(s.mean() - 0.5) < 0.02
    t = r.router.threshold_for_share(0.3)
    assert np.mean(s >= t) == pytest.approx(0.3, abs=0.02)


def test_length_router():
    r = get_query_router("length")
    assert r.score("x" * 500) == pytest.approx(0.5)
    assert r.score("") == 0.0


# ---------------------------------------------------------------------------------------------
# token routers


def test_confidence_and_entropy_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    ctx = TokenContext(logits=logits)
    assert get_token_router("confidence").score(ctx, 0) == pytest.approx(0.5)
    assert get_token_router("confidence").score(ctx, 2) == pytest.approx(0.125)
    h = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
    assert get_token_router("entropy").score(ctx, 0) == pytest.approx(1 - h / math.log(4))
    assert get_token_router("entropy").score(TokenContext(np.zeros(8)), 3) == pytest.approx(0.0, abs=1e-12)
    # a numpy row works the same
    assert get_token_router("confidence").score(TokenContext(logits.numpy()), 1) == pytest.approx(0.25)


def test_token_router_bad_input_escalates():
    r = get_token_router("confidence")
    assert r.score(TokenContext(logits=np.zeros((2, 3))), 0) == 0.0
    assert r.score(TokenContext(logits=np.zeros(3)), 7) == 0.0  # token outside the vocabulary
    assert r.stats.errors == 2


def test_hidden_state_tap_is_the_lm_head_input(tiny_target):
    from tandem.local_runtime.engine import Engine
    from tandem.routing.token import HiddenStateTap

    engine = Engine(tiny_target)
    with HiddenStateTap(tiny_target) as tap, torch.inference_mode():
        logits = engine.prefill([256, 5, 6, 7])
        h = tap.last_row()
        head = tiny_target.model.get_output_embeddings()
        assert torch.allclose(head(h[None])[0].float(), logits, atol=1e-4)
        logits = engine.step(9)
        assert torch.allclose(head(tap.last_row()[None])[0].float(), logits, atol=1e-4)
    # the hook is gone after the block
    engine.step(10)
    assert tap.last.shape[0] == 1


def test_reward_router_needs_the_hidden_state():
    pytest.importorskip("tandem.routing.token")
    from tandem.routing.query import ARTIFACTS

    assert (ARTIFACTS / "reward_head.npz").exists(), "the trained reward head ships with the package"
    r = get_token_router("reward")
    logits = torch.zeros(49152)
    assert r.score(TokenContext(logits), 1) == 0.0  # no hidden state: escalates
    assert r.score(TokenContext(logits, hidden=torch.zeros(7)), 1) == 0.0  # wrong size: escalates
    assert r.stats.errors == 2
    size = r.router.hidden_size
    s = r.score(TokenContext(logits, hidden=torch.zeros(size)), 1)
    assert 0.0 <= s <= 1.0 and r.stats.errors == 2


# ---------------------------------------------------------------------------------------------
# data and the split


def _write(path, rows, header=("prompt", "weak-model", "strong-model")):
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_read_csv_and_folder(tmp_path):
    a = _write(tmp_path / "a.csv", [["p1", "True", "True"], ["p2", "False", "True"]])
    _write(tmp_path / "b.csv", [["p3", "False", "False"]])
    t = read_csv(a)
    assert t.prompts == ["p1", "p2"] and t.weak.tolist() == [True, False] and t.strong.tolist() == [True, True]
    assert (t.weak_model, t.strong_model) == ("weak-model", "strong-model")
    folder = load_table(tmp_path)
    assert folder.prompts == ["p1", "p2", "p3"] and folder.sources == ["a", "a", "b"]
    swapped = read_csv(a, weak="strong-model", strong="weak-model")
    assert swapped.weak.tolist() == [True, True]


def test_read_csv_errors(tmp_path):
    with pytest.raises(ValueError, match="prompt"):
        read_csv(_write(tmp_path / "x.csv", [["a", "True"]], header=("text", "m")))
    with pytest.raises(ValueError, match="two True/False"):
        read_csv(_write(tmp_path / "y.csv", [["a", "True"]], header=("prompt", "m")))
    with pytest.raises(FileNotFoundError):
        load_table(tmp_path / "missing.csv")


def test_split_rule_is_fixed():
    assert is_heldout("anything", "mmlu_virology") and not is_heldout("anything", "mmlu_anatomy")
    prompts = [f"What is {i} + {i}?" for i in range(5000)]
    share = np.mean([is_heldout(p, "gsm8k") for p in prompts])
    assert share == pytest.approx(0.3, abs=0.02)
    assert len(HELDOUT_MMLU_DOMAINS) == 13


@needs_shared
def test_split_of_the_shared_data():
    t = load_table(SHARED / "gsm8k.csv")
    train, held = split(t)
    assert len(train) + len(held) == len(t) and 0.25 < len(held) / len(t) < 0.35
    assert not set(train.prompts) & set(held.prompts)
    m = load_table(SHARED / "mmlu")
    mtrain, mheld = split(m)
    assert {s[5:] for s in mheld.sources} == HELDOUT_MMLU_DOMAINS
    assert not {s[5:] for s in mtrain.sources} & HELDOUT_MMLU_DOMAINS


@needs_shared
def test_calibration_carries_over_to_held_out_prompts():
    """A threshold calibrated on training prompts sends about the target share of held-out
    prompts to the cloud (the length router on GSM8K: no model needed; the trained routers are
    checked the same way in test_routing_trained.py)."""
    from tandem.routing.base import Calibration

    train, held = split(load_table(SHARED / "gsm8k.csv"))
    r = get_query_router("length")
    cal = Calibration.from_scores(r.score_many(train.prompts))
    s = r.score_many(held.prompts)
    for share in (0.2, 0.5):
        assert np.mean(s >= cal.threshold_for_share(share)) == pytest.approx(share, abs=0.05)


# ---------------------------------------------------------------------------------------------
# route eval


def _table(tmp_path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(5, 400))
        hard = length > 200
        weak = bool(rng.random() < (0.3 if hard else 0.9))
        strong = bool(rng.random() < 0.95)
        rows.append(["x" * length + f" #{i}", str(weak), str(strong)])
    return _write(tmp_path / "t.csv", rows)


def test_route_eval_json_contract(tmp_path):
    path = _table(tmp_path)
    plot = tmp_path / "p.png"
    r = runner.invoke(app, ["route", "eval", "--data", str(path), "--router", "length,random", "--json", "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("n", "strong_calls_at_95pct", "random_strong_calls_at_95pct", "oracle_strong_calls_at_95pct", "apgr",
                "cpt50", "cpt80", "random_apgr", "oracle_apgr", "random_cpt50", "oracle_cpt50", "random_cpt80", "oracle_cpt80"):
        assert key in out
    assert (out["random_cpt50"], out["random_cpt80"]) == (pytest.approx(0.5), pytest.approx(0.8))
    assert out["n"] == 60 and out["router"] == "length"
    assert out["random_strong_calls_at_95pct"] == pytest.approx(0.95)
    assert out["oracle_strong_calls_at_95pct"] <= out["strong_calls_at_95pct"]
    # length predicts difficulty in this table: fewer strong calls than random
    assert out["strong_calls_at_95pct"] < 0.95 and out["apgr"] > 0.5
    assert set(out["routers"]) == {"length", "random"}
    assert plot.exists() and plot.read_bytes()[:4] == b"\x89PNG"


def test_route_eval_table_output_and_errors(tmp_path):
    path = _table(tmp_path)
    r = runner.invoke(app, ["route", "eval", "--data", str(path), "--router", "random", "--no-plot"])
    assert r.exit_code == 0, r.output
    assert "oracle" in r.stdout
    r = runner.invoke(app, ["route", "eval", "--data", str(tmp_path / "nope.csv"), "--json"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["route", "eval", "--data", str(path), "--router", "nope", "--json"])
    assert r.exit_code == 2


def test_importing_routing_stays_light():
    code = (
        "import sys, tandem.routing, tandem.routing.policy, tandem.routing.base, tandem.sdk.cli.route;"
        "print(sorted(m for m in ('torch','sklearn','sentence_transformers','transformers','matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# training helpers


def test_token_labels_compare_text_across_tokenizers():
    from tandem.routing.train_token import label_tokens

    # same split; the cloud wanted " there" instead of " world"
    assert label_tokens(["Hello", " world"], ["Hello", " there"], ["Hello", " world"], [True, False]) == [1, 0]
    # the device splits finer than the cloud: both halves agree with the cloud's "Hello"
    assert label_tokens(["Hel", "lo"], ["Hello"], ["Hello"], [True]) == [1, 1]
    # the cloud splits finer: walk through its agreeing tokens
    assert label_tokens(["Hello"], ["Hel", "lo"], ["Hel", "lo"], [True, True]) == [1]
    # the cloud agrees on "Hel" then wants "p": the device's "Hello" and "!" are both wrong
    assert label_tokens(["Hello", "!"], ["Hel", "p"], ["Hel", "lo!"], [True, False]) == [0, 0]
    # an empty piece (half a character) has no label
    assert label_tokens(["", "a"], ["a"], ["a"], [True]) == [None, 1]


def test_logistic_fit_recovers_a_known_model():
    from tandem.routing.linear import LinearHeads, sigmoid

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20000, 2))
    y = (rng.random(20000) < sigmoid(2.0 * X[:, 0] - 1.0 * X[:, 1] + 0.5)).astype(float)
    h = LinearHeads.fit(X, {"p": y}, l2=1e-6, standardize=False)
    assert h.W[0] == pytest.approx([2.0, -1.0], abs=0.1) and h.b[0] == pytest.approx(0.5, abs=0.1)
    two = LinearHeads.fit(X, {"strong": y, "weak": 1 - y}, l2=1.0)
    s = two.router_score(X)
    assert (0 <= s).all() and (s <= 1).all()
    back = LinearHeads.from_arrays(two.to_arrays())
    assert np.allclose(back.router_score(X[:5]), s[:5], atol=1e-5)


def test_assist_tradeoff_by_hand():
    from tandem.routing.train_token import assist_tradeoff

    y = np.array([1, 0, 1, 0])
    # the two lowest scores are the two bad tokens: sending half to the cloud fixes both
    assert assist_tradeoff(np.array([0.9, 0.1, 0.8, 0.2]), y, shares=(0.5, 0.25))["0.50"] == 1.0
    assert assist_tradeoff(np.array([0.9, 0.1, 0.8, 0.2]), y, shares=(0.25,))["0.25"] == 0.75
