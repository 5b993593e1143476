"""`tandem bench simulate`: the replica simulation against hand-computed cases, placement, the
workload inputs, replica sizing, and the check against a measured capacity run."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.sdk.bench.plan import plan, validate
from tandem.sdk.bench.simulate import (
    GatewayRules,
    Histogram,
    Requests,
    fewest_replicas,
    holds,
    place,
    requests,
    simulate,
    simulate_replica,
)
from tandem.sdk.bench.workload import SAMPLE_TRACE, load_trace, parse_classes, poisson, rtt_sampler
from tandem.sdk.costmodel import PassCosts

COSTS = PassCosts(rows=(1, 8, 64), seconds=(0.1, 0.11, 0.3), verify_overhead_s=0.002, stream_overhead_s=0.001)


def _req(n, *, hybrid=False, alpha=0.0, prompt=10, answer=20, rtt=0.0, draft_s=0.0, t=None) -> Requests:
    t = np.zeros(n) if t is None else np.asarray(t, float)
    return Requests(t=t, gate=t + rtt / 2, prompt=np.full(n, prompt), answer=np.full(n, answer), hybrid=np.full(n, hybrid),
                    alpha=np.full(n, alpha), draft_s=np.full(n, draft_s), rtt=np.full(n, rtt))


def test_histogram_quantiles_are_within_a_bin():
    h = Histogram()
    h.add(np.array([0.01] * 98 + [1.0, 1.0]))
    assert h.quantile(0.5) == pytest.approx(0.01, rel=0.02)
    assert h.quantile(0.995) == pytest.approx(1.0, rel=0.02)
    w = Histogram()
    w.add(np.array([0.01, 1.0]), np.array([1.0, 99.0]))  # weights count as samples
    assert w.quantile(0.5) == pytest.approx(1.0, rel=0.02)


def test_one_cloud_stream_steps_once_a_pass():
    st = simulate_replica(_req(1, rtt=0.02), COSTS, GatewayRules(), k=4, rng=np.random.default_rng(0))
    assert st.n["tokens"] == 20 and st.n["served"] == 1 and st.n["rejections"] == 0
    # the prompt but its last token (9 rows) fills in a job of its own; then one token a pass
    assert st.n["passes"] == 1 + 20
    assert st.itl.quantile(0.5) == pytest.approx(0.1 + 0.001, rel=0.02)
    assert st.ttft.quantile(0.5) == pytest.approx(0.01 + COSTS.pass_s(9) + 0.1 + 0.001 + 0.01, rel=0.02)
    # with a measured prefill rate the fill takes that instead
    fast = PassCosts(COSTS.rows, COSTS.seconds, 0.002, 0.001, prefill_s_per_token=0.001)
    st = simulate_replica(_req(1, rtt=0.02), fast, GatewayRules(), k=4, rng=np.random.default_rng(0))
    assert st.ttft.quantile(0.5) == pytest.approx(0.01 + 0.009 + 0.1 + 0.001 + 0.01, rel=0.02)


def test_streams_share_a_pass():
    st = simulate_replica(_req(8), COSTS, GatewayRules(), k=4, rng=np.random.default_rng(0))
    # 8 fills; the first stream's batch is formed as its fill ends (before the others are filled, as the
    # gateway's batcher does), then the 20 passes of all 8 streams but the first one's last
    assert st.n["tokens"] == 160 and st.n["passes"] == 8 + 1 + 20
    assert st.itl.quantile(0.5) == pytest.approx(COSTS.pass_s(8) + 8 * 0.001, rel=0.02)


def test_a_long_prompts_later_chunk_delays_only_the_pass_already_formed():
    # the model worker runs jobs in the order they were handed over (the gateway's one-thread
    # executor): 7 short prompts and one of 2 chunks (all at t=0); the first stream's batch is formed
    # before the long prompt's second chunk is handed over, the other six steps only after that
    # pass, so one stream waits out the chunk and six start after it
    costs = PassCosts(COSTS.rows, COSTS.seconds, 0.0, 0.0, prefill_s_per_token=0.002)
    req = _req(8, prompt=10)
    req.prompt[-1] = 1000  # 999 rows to fill: 512 + 487
    st = simulate_replica(req, costs, GatewayRules(), k=4, rng=np.random.default_rng(0))
    # 9 fills; the first stream alone; the other six short ones with it; 19 with the long one; its last alone
    assert st.n["tokens"] == 160 and st.n["passes"] == 9 + 1 + 1 + 19 + 1
    chunk = 487 * 0.002
    stalled = 1 / (7 * 20)  # the one gap of one stream among the 7 x 20 + 19 gaps after first tokens
    assert st.itl.quantile(1 - stalled / 2) > chunk  # that gap is there ...
    assert st.itl.quantile(0.99) == pytest.approx(COSTS.pass_s(8), rel=0.02)  # ... and only that one


def test_a_verify_at_full_acceptance_brings_k_plus_one_tokens_and_waits_an_rtt_and_the_drafting():
    rng = np.random.default_rng(0)
    st = simulate_replica(_req(1, hybrid=True, alpha=0.999999, rtt=0.05, draft_s=0.01), COSTS, GatewayRules(), k=4, rng=rng)
    assert st.n["tokens"] == 20 and st.n["passes"] == 1 + 4  # the prompt, then 4 verifies of 5 tokens
    cycle = COSTS.pass_s(5) + 0.002 + 0.05 + 4 * 0.01
    assert st.itl.quantile(0.5) == pytest.approx(cycle / 5, rel=0.02)


def test_no_acceptance_gives_one_token_a_verify():
    st = simulate_replica(_req(1, hybrid=True, alpha=0.0), COSTS, GatewayRules(), k=4, rng=np.random.default_rng(0))
    assert st.n["passes"] == 1 + 20


def test_over_the_session_cap_requests_are_rejected_and_idle_sessions_evicted():
    st = simulate_replica(_req(3), COSTS, GatewayRules.of(max_sessions=2), k=4, rng=np.random.default_rng(0))
    assert (st.n["served"], st.n["rejections"], st.n["evictions"]) == (2, 1, 0)
    # a session whose device is away (drafting, or its reply on the way) is idle: it makes room,
    # and its device re-opens it with every token it holds; both answers still complete
    slow = _req(2, hybrid=True, alpha=0.5, rtt=100.0, t=[0.0, 60.0])
    st = simulate_replica(slow, COSTS, GatewayRules.of(max_sessions=1), k=2, rng=np.random.default_rng(0))
    assert st.n["evictions"] >= 1 and st.n["rejections"] == 0 and st.n["served"] == 2 and st.n["tokens"] == 40


def test_placement_is_balanced_and_consistent():
    a, b = place(20_000, 8), place(20_000, 9)
    counts = np.bincount(a, minlength=8)
    assert counts.min() > 0.75 * counts.mean() and counts.max() < 1.25 * counts.mean()
    moved = (a != b).mean()
    assert moved < 2.0 / 9  # adding a replica moves about 1/9 of the sessions, not all
    assert (place(20_000, 8) == a).all()


def test_workload_inputs(tmp_path):
    arr = load_trace(SAMPLE_TRACE)
    assert len(arr) > 1000 and arr.t[0] == 0 and (np.diff(arr.t) >= 0).all()
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    assert list(load_trace(azure).answer_tokens) == [44, 109]
    bad = tmp_path / "bad.csv"
    bad.write_text("when,prompt\n1,2\n")
    with pytest.raises(ValueError, match="no column for timestamp"):
        load_trace(bad)
    classes = parse_classes("phone:3:45,laptop:1:20:0.8", 0.7)
    assert [c.share for c in classes] == [0.75, 0.25] and classes[0].alpha == 0.7 and classes[1].draft_s == 0.02
    with pytest.raises(ValueError, match="NAME:SHARE:DRAFT_MS"):
        parse_classes("phone", 0.7)
    rng = np.random.default_rng(0)
    assert rtt_sampler("20")(rng, 3).tolist() == [0.02] * 3
    assert np.median(rtt_sampler("lognormal:80:0.5")(rng, 20_000)) == pytest.approx(0.08, rel=0.05)
    with pytest.raises(ValueError, match="--rtt"):
        rtt_sampler("sometimes")
    p = poisson(10_000, 100.0, rng)
    assert len(p) == 10_000 and p.t[-1] == pytest.approx(100.0, rel=0.05)


def test_routed_mode_keeps_the_rest_on_the_device():
    arr = poisson(2000, 600.0, np.random.default_rng(1))
    req, local = requests(arr, "routed", parse_classes("laptop:1:20", 0.7), rtt_sampler("20"), 0.3, np.random.default_rng(1))
    assert local.mean() == pytest.approx(0.7, abs=0.05)
    fleet, _ = simulate(req, local, 8, COSTS, GatewayRules(), 4)
    assert fleet.n["served"] == 2000 and fleet.n["tokens"] == int(arr.answer_tokens.sum())


def test_the_fewest_replicas_hold_the_slo_and_one_fewer_does_not():
    arr = poisson(3000, 600.0, np.random.default_rng(2), answer_median=60)
    req, local = requests(arr, "cloud", parse_classes("laptop:1:20", 0.7), rtt_sampler("20"), 1.0, np.random.default_rng(2))
    slo = 0.14
    r, fleet = fewest_replicas(req, local, COSTS, GatewayRules(), 4, slo)
    assert r is not None and r > 1 and holds(fleet, slo)
    assert holds(simulate(req, local, r, COSTS, GatewayRules(), 4)[0], slo)
    # one fewer fails, on its busiest replica or over the fleet
    fewer = simulate(req, local, r - 1, COSTS, GatewayRules(), 4)
    assert not (holds(fewer[0], slo) and holds(fewer[1], slo))
    # an SLO below one stream's ITL cannot be held by any number of replicas
    assert fewest_replicas(req, local, COSTS, GatewayRules(), 4, 0.05, max_replicas=64) == (None, None)


def test_plan_reports_every_mode_and_the_replica_ratio():
    curves = {"source": "test", "draft_len": 4, "pass_costs": COSTS.to_dict()}
    arr = poisson(1500, 300.0, np.random.default_rng(3), answer_median=60)
    out = plan(arr, curves, classes=parse_classes("laptop:1:20:0.8", 0.7), rtt="20", cloud_share=0.35, replicas=None,
               find=True, itl_slo_ms=250, rules=GatewayRules())
    assert set(out["modes"]) == {"cloud", "hybrid", "routed"}
    for entry in out["modes"].values():
        assert entry["replicas"] >= 1 and entry["rejections"] == 0 and entry["itl_p99_ms"] <= 250 * 1.03
    assert out["replicas_ratio"] == pytest.approx(out["replicas"]["cloud"] / out["replicas"]["hybrid"], abs=1e-3)


def test_validate_replays_a_capacity_run():
    curves = {"source": "test", "draft_len": 4, "max_new_tokens": 20, "prompt_tokens": [10, 12], "pass_costs": COSTS.to_dict(),
              "points": [{"mode": "cloud", "devices": 2, "tokens_per_s": 17.0, "itl_p99_ms": 102.0},
                         {"mode": "speculative", "devices": 2, "tokens_per_round": 3.0, "tokens_per_s": 40.0, "itl_p99_ms": 40.0}]}
    out = validate(curves)
    assert [p["devices"] for p in out["points"]] == [2, 2]
    cloud = out["points"][0]
    assert cloud["predicted_itl_p99_ms"] == pytest.approx((COSTS.pass_s(2) + 0.002) * 1000, rel=0.03)
    assert out["tokens_per_s_ratio_range"][0] > 0
    with pytest.raises(ValueError, match="prompt_tokens"):
        validate({**curves, "prompt_tokens": None})
