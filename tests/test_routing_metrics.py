"""Router metrics and the score-to-decision rules against exact, hand-computed answers."""

import math

import numpy as np
import pytest

from tandem.routing.base import (
    Calibration,
    RollingCalibration,
    calibrate_threshold,
    query_to_cloud,
    token_to_cloud,
    valid_score,
)
from tandem.routing.metrics import (
    apgr,
    auc,
    oracle_curve,
    quality_curve,
    random_curve,
    route_metrics,
    strong_calls_at,
)

# weak right on row 2 only, strong right on rows 0-2: weak 0.25, strong 0.75
WEAK = [0, 0, 1, 0]
STRONG = [1, 1, 1, 0]


def test_quality_curve_by_hand():
    # order by score: row 0 (gain 1), row 2 (gain 0), row 1 (gain 1), row 3 (gain 0)
    c = quality_curve([0.9, 0.2, 0.5, 0.1], WEAK, STRONG)
    assert c.shares.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert c.accuracy.tolist() == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75])


def test_strong_calls_and_apgr_by_hand():
    m = route_metrics([0.9, 0.2, 0.5, 0.1], WEAK, STRONG)
    # target 0.25 + 0.95 * 0.5 = 0.725, crossed on the segment 0.5 -> 0.75 at 0.5 + 0.9 * 0.25
    assert m.strong_calls_at_95pct == pytest.approx(0.725)
    # area above weak: 0.25 * [(0+.25)/2 + (.25+.25)/2 + (.25+.5)/2 + (.5+.5)/2] = 0.3125; / 0.5
    assert m.apgr == pytest.approx(0.625)
    assert m.random_strong_calls_at_95pct == pytest.approx(0.95)
    assert m.random_apgr == pytest.approx(0.5)
    # oracle: the two strong-only rows first: 0.25, 0.5, 0.75, 0.75, 0.75
    assert m.oracle_strong_calls_at_95pct == pytest.approx(0.475)
    assert m.oracle_apgr == pytest.approx(0.75)
    assert (m.n, m.weak_accuracy, m.strong_accuracy) == (4, 0.25, 0.75)


def test_cpt50_and_cpt80_by_hand():
    m = route_metrics([0.9, 0.2, 0.5, 0.1], WEAK, STRONG)
    # CPT(50%): target 0.25 + 0.5 * 0.5 = 0.5, reached at the first call (share 0.25)
    # CPT(80%): target 0.65, crossed on the segment 0.5 -> 0.75 at 0.5 + 0.6 * 0.25
    assert (m.cpt50, m.cpt80) == pytest.approx((0.25, 0.65))
    assert (m.random_cpt50, m.random_cpt80) == pytest.approx((0.5, 0.8))
    # oracle: p * (strong - weak)
    assert (m.oracle_cpt50, m.oracle_cpt80) == pytest.approx((0.25, 0.4))


def test_ties_are_averaged_so_a_constant_router_is_random():
    c = quality_curve([0.3] * 4, WEAK, STRONG)
    assert c.accuracy.tolist() == pytest.approx(random_curve(WEAK, STRONG).accuracy.tolist())
    m = route_metrics([0.3] * 4, WEAK, STRONG)
    assert m.strong_calls_at_95pct == pytest.approx(0.95)
    assert m.apgr == pytest.approx(0.5)


def test_oracle_sends_weak_only_rows_last():
    # row 0 only weak right, row 1 only strong right
    c = oracle_curve([1, 0, 1], [0, 1, 1])
    assert c.accuracy.tolist() == pytest.approx([2 / 3, 1.0, 1.0, 2 / 3])


def test_strong_no_better_than_weak():
    w, s = [1, 0], [0, 1]
    m = route_metrics([0.1, 0.9], w, s)
    assert m.strong_calls_at_95pct == 0.0
    assert math.isnan(m.apgr)


def test_strong_calls_at_other_fractions():
    c = quality_curve([0.9, 0.2, 0.5, 0.1], WEAK, STRONG)
    # target 0.25 + 0.5 * 0.5 = 0.5 is reached exactly at share 0.25
    assert strong_calls_at(c, 0.25, 0.75, 0.5) == pytest.approx(0.25)
    assert strong_calls_at(c, 0.25, 0.75, 0.0) == 0.0
    assert apgr(c, 0.25, 0.75) == pytest.approx(0.625)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError):
        quality_curve([0.1, 0.2], [1, 0, 1], [1, 1, 1])
    with pytest.raises(ValueError):
        quality_curve([0.1, float("nan")], [1, 0], [1, 1])
    with pytest.raises(ValueError):
        quality_curve([0.1, 0.2], [1, 2], [1, 1])


def test_auc_by_hand():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def test_decision_rules_fail_safe():
    assert query_to_cloud(0.7, 0.5) and not query_to_cloud(0.3, 0.5) and query_to_cloud(0.5, 0.5)
    assert not token_to_cloud(0.7, 0.5) and token_to_cloud(0.3, 0.5) and not token_to_cloud(0.5, 0.5)
    for bad in (float("nan"), float("inf"), -0.1, 1.5, None, "x"):
        assert not valid_score(bad)
        assert query_to_cloud(bad, 0.5)
        assert token_to_cloud(bad, 0.5)


def test_calibrate_threshold_by_hand():
    s = [0.1, 0.4, 0.2, 0.3]
    assert calibrate_threshold(s, 0.5) == pytest.approx(0.25)
    assert calibrate_threshold(s, 1.0) == pytest.approx(0.1)
    assert calibrate_threshold(s, 0.25) == pytest.approx(0.35)
    t0 = calibrate_threshold(s, 0.0)
    assert 0.4 < t0 <= 1.0
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        t = calibrate_threshold(s, share)
        assert np.mean([query_to_cloud(x, t) for x in s]) == pytest.approx(share)
    with pytest.raises(ValueError):
        calibrate_threshold(s, 1.5)


def test_calibration_quantiles_hit_the_share_on_fresh_scores():
    rng = np.random.default_rng(0)
    cal = Calibration.from_scores(rng.beta(2, 5, 20000))
    fresh = rng.beta(2, 5, 20000)
    for share in (0.1, 0.3, 0.5, 0.8):
        t = cal.threshold_for_share(share)
        assert np.mean(fresh >= t) == pytest.approx(share, abs=0.01)


def test_rolling_calibration_follows_the_traffic():
    rng = np.random.default_rng(1)
    prior = Calibration(tuple(np.linspace(0.0, 1.0, 101)))  # uniform scores expected
    roll = RollingCalibration(prior, window=2000, min_scores=200)
    assert roll.threshold_for_share(0.3) == pytest.approx(0.7)  # the prior, until enough scores
    for x in rng.beta(5, 2, 2000):  # the traffic scores much higher than the prior thought
        roll.observe(x)
    roll.observe(float("nan"))  # ignored
    assert len(roll) == 2000
    fresh = rng.beta(5, 2, 20000)
    assert np.mean(fresh >= roll.threshold_for_share(0.3)) == pytest.approx(0.3, abs=0.03)
    assert np.mean(fresh >= prior.threshold_for_share(0.3)) > 0.5  # the stale prior would not
