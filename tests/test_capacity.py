"""`tandem bench capacity`: the recorded drafts, the batch cost model, and one real run on tiny
models (a gateway process on loopback)."""

from __future__ import annotations

import pytest

from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.sdk.bench.capacity import bench_capacity, record_drafts
from tandem.sdk.costmodel import PassCosts


def test_recorded_drafts_are_the_drafters_greedy_continuation_of_every_prefix():
    lm = load_model("tiny-llama", progress=False)
    prompt = lm.tokenizer.prompt_tokens("hello there", chat=False)
    target = list(generate_alone(lm, prompt, 10, eos_token_ids=[]))
    table = record_drafts(lm.new_engine(), prompt, target, 3)
    assert len(table) == len(target)
    # the drafter is the target itself here, so each draft is what the target says next,
    # never reaching past the last target token
    for p, draft in enumerate(table):
        assert draft == target[p : p + min(3, len(target) - p - 1)]


def test_pass_cost_interpolates_between_measured_rows_and_extends_beyond():
    costs = PassCosts(rows=(1, 8, 32), seconds=(0.10, 0.12, 0.20), verify_overhead_s=0.01, stream_overhead_s=0.002)
    assert costs.pass_s(1) == pytest.approx(0.10)
    assert costs.pass_s(4.5) == pytest.approx(0.11)
    assert costs.pass_s(64) == pytest.approx(0.20 + (0.08 / 24) * 32)
    tps, itl = costs.cloud(8)
    assert itl == pytest.approx(0.12 + 8 * 0.002) and tps == pytest.approx(8 / itl)
    tps, itl = costs.speculative(4, rows_per_verify=8, tokens_per_round=4)
    assert itl == pytest.approx((0.20 + 4 * 0.01) / 4) and tps == pytest.approx(16 / (0.20 + 0.04))


def test_pass_cost_never_extends_downward():
    costs = PassCosts(rows=(1, 8), seconds=(0.10, 0.09), verify_overhead_s=0.0, stream_overhead_s=0.0)
    assert costs.pass_s(100) == pytest.approx(0.09)


def test_capacity_bench_on_tiny_models_is_exact_and_reports_every_point():
    out = bench_capacity(drafter="tiny-llama", target="tiny-llama", prompts=["one two", "three four five"],
                         devices=[1, 2], max_new_tokens=8, draft_len=3, split=False)
    assert out["mismatches"] == 0
    assert {(p["mode"], p["devices"]) for p in out["points"]} == {(m, n) for m in ("cloud", "speculative") for n in (1, 2)}
    for p in out["points"]:
        assert p["tokens"] == 8 * p["devices"]
        assert p["itl_p99_ms"] >= p["itl_p50_ms"] > 0
        assert p["rows_per_pass"] >= 1 and p["predicted_tokens_per_s"] > 0 and p["efficiency"] > 0
        if p["mode"] == "speculative":  # the drafter is the target: every draft is accepted
            assert p["tokens_per_round"] > 2
    assert set(out["throughput_ratio"]) == {"1", "2"} and set(out["capacity"]) == {"cloud", "speculative"}
    assert out["cpu_flags"] is not None and out["pass_costs"]["pass_ms_by_rows"]
    # the simulation replays this very run (its prompts, acceptance and pass costs)
    from tandem.sdk.bench.plan import validate

    check = validate({**out, "source": "this run"})
    assert len(check["points"]) == 4 and all(p["predicted_tokens_per_s"] > 0 for p in check["points"])


def test_the_pass_cost_table_is_the_pass_cost_rule():
    costs = PassCosts(rows=(1, 8, 32), seconds=(0.10, 0.12, 0.20), verify_overhead_s=0.0, stream_overhead_s=0.0)
    table = costs.table(100)
    assert table[1:] == pytest.approx([costs.pass_s(r) for r in range(1, 101)])
