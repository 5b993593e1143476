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


def test_bench_modes_and_rtt_plot(tmp_path):
    results = [
        run(bench_modes(drafter="tiny-llama:int8", target="tiny-llama", prompts=PROMPTS, max_new_tokens=12, rtt_ms=rtt))
        for rtt in (0, 40)
    ]
    for r in results:
        assert set(r["modes"]) == {"local", "cloud", "speculative", "assist@0.3", "assist", "assist@0.8", "auto"}
        assert r["modes"]["speculative"]["agreement_with_target"] == 1.0  # lossless
        assert r["modes"]["cloud"]["cloud_passes_per_token"] == 1.0
        assert r["modes"]["local"]["cloud_passes_per_token"] == 0.0
        assert r["auto_vs_best"] > 0 and sum(r["auto_chose"].values()) == len(PROMPTS)
        passes = [r["modes"][m]["cloud_passes_per_token"] for m in ("assist@0.3", "assist", "assist@0.8")]
        assert passes == sorted(passes)  # a higher threshold asks the cloud more often
    summary = plot_rtt(results, tmp_path / "rtt.png")
    assert (tmp_path / "rtt.png").stat().st_size > 10_000
    assert summary["rtt_ms"] == [0, 40]


def test_cli_bench_modes_json():
    out = subprocess.run(
        [sys.executable, "-m", "tandem.sdk.cli", "bench", "modes", "--drafter", "tiny-llama:int8", "--target", "tiny-llama",
         "--limit", "1", "--max-new-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "auto_vs_best" in data and data["modes"]["auto"]["s_per_token"] > 0
