"""The benchmarks run end to end on tiny models (their figures are not asserted: the machine is
shared; the fields and the lossless columns are)."""

import json
import subprocess
import sys

from tandem.sdk.bench.plots import plot_rtt
from tandem.sdk.bench.speculative import bench_modes, bench_speculative, similarity

from .conftest import run

PROMPTS = ["Hello there, how are", "Count with me: one two"]


def test_similarity():
    assert similarity("abc", "abc") == 1.0
    assert similarity("", "") == 1.0
    assert similarity("abcd", "wxyz") == 0.0
    assert similarity("abcd", "abxy") == 0.5


def test_bench_speculative_through_the_link(tmp_path):
    out = run(bench_speculative(drafter="tiny-llama:int8", target="tiny-llama", prompts=PROMPTS,
                                max_new_tokens=16, draft_len="auto", rtt_ms=20))
    assert out["mismatches"] == 0 and out["rtt_ms"] == 20
    assert out["tokens_per_round"] > 1.0 and out["theory_tokens_per_round"] > 1.0
    # the cost model's prediction from calibration passes, beside the measurement
    assert out["predicted_speedup_vs_cloud"] > 0 and out["efficiency"] > 0
    assert len(out["calibration"]["verify_s"]) >= 4 and "cpu_flags" in out
    # free drafting bounds what the run's own schedule is predicted to reach
    assert out["ceiling_speedup_vs_cloud"] >= out["predicted_speedup_vs_cloud"] - 1e-3
    assert out["predicted_s_per_token"]["ceiling"] <= out["predicted_s_per_token"]["speculative"] + 1e-6
    # time to first token per mode, and what the gateway served (the name it was given here)
    assert set(out["ttft_ms"]) == {"cloud", "local", "speculative"} and all(v > 0 for v in out["ttft_ms"].values())
    assert out["target_served"] == "tiny-llama" and out["target_choice"] is None


def test_bench_verify_cost_predicts_from_a_random_target():
    from tandem.sdk.bench.verify_cost import bench_verify_cost

    out = bench_verify_cost(arch="tiny", device="cpu", dtype="float32", sessions=[1, 2], blocks=[1, 2, 3], context=16)
    assert set(out["verify_ms"]) == {1, 2} and set(out["verify_ms"][1]) == {1, 2, 3}
    for row in out["predicted"].values():
        assert row["sequential"]["speedup_vs_cloud"] > 0 and row["pipelined"]["k"] >= 1


def test_bench_modes_and_rtt_plot(tmp_path):
    results = [
        run(bench_modes(drafter="tiny-llama:int8", target="tiny-llama", prompts=PROMPTS, max_new_tokens=12, rtt_ms=rtt,
                        out_png=str(tmp_path / f"modes-{rtt}.png")))
        for rtt in (0, 40)
    ]
    assert (tmp_path / "modes-40.png").stat().st_size > 10_000
    for r in results:
        assert set(r["modes"]) == {"local", "cloud", "speculative", "assist@0.3", "assist", "assist@0.8", "auto"}
        assert r["modes"]["speculative"]["agreement_with_target"] == 1.0  # lossless
        assert r["modes"]["cloud"]["cloud_passes_per_token"] == 1.0
        assert r["modes"]["local"]["cloud_passes_per_token"] == 0.0
        assert r["auto_vs_best"] > 0 and sum(r["auto_chose"].values()) == len(PROMPTS)
        assert all(r["modes"][m]["predicted_s_per_token"] > 0 for m in r["modes"] if m != "auto")
        passes = [r["modes"][m]["cloud_passes_per_token"] for m in ("assist@0.3", "assist", "assist@0.8")]
        assert passes == sorted(passes)  # a higher threshold asks the cloud more often
    summary = plot_rtt(results, tmp_path / "rtt.png")
    assert (tmp_path / "rtt.png").stat().st_size > 10_000
    assert summary["rtt_ms"] == [0, 40]


def test_cli_bench_modes_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tandem.sdk.cli", "bench", "modes", "--drafter", "tiny-llama:int8", "--target", "tiny-llama",
         "--limit", "1", "--max-new-tokens", "8", "--json", "--shared-cores", "--png", str(tmp_path / "m.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "auto_vs_best" in data and data["modes"]["auto"]["s_per_token"] > 0
