"""`tandem bench device`: the JSON contract, on a tiny model (real-model run marked slow)."""

import json
import subprocess
import sys

import pytest

from tandem.sdk.bench.device import bench_device

FIELDS = {"prefill_tok_per_s", "decode_tok_per_s", "greedy_agreement", "max_abs_logit_err"}


def test_bench_device_reports_every_backend(tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [f"Question {i}: what is {i} plus {i}?"]}) for i in range(6)))
    out = bench_device(
        "tiny-llama", 48, decode_tokens=6, prompts_path=str(prompts), limit=4, reps=1, chunk=16, compile=False,
        backends=["reference-fp32", "cpu-int8", "cpu-int8-mixed", "onnx", "torch-int8", "llama.cpp"],
    )
    backends = out["backends"]
    assert {"reference-fp32", "cpu-int8", "cpu-int8-mixed", "torch-int8"} <= set(backends)
    assert "float" in backends["cpu-int8-mixed"]["device"]
    for name, row in backends.items():
        assert FIELDS <= set(row), name
        assert row["greedy_agreement"] is not None and 0 <= row["greedy_agreement"] <= 1
        assert row["resident_mb"] > 0
    ref = backends["reference-fp32"]
    assert ref["greedy_agreement"] == 1.0 and ref["max_abs_logit_err"] == 0.0
    assert ref["prefill_tok_per_s"] > 0 and ref["decode_tok_per_s"] > 0
    assert backends["cpu-int8"]["decode_tok_per_s"] is None  # a prefill-only backend
    assert "llama.cpp" in out["skipped"]  # a tiny torch model has no GGUF file
    assert out["best_prefill"] in ("cpu-int8", "cpu-int8-mixed", "onnx") and out["prompts"] == 4
    accurate = out["most_accurate_prefill"]
    assert all(backends[accurate]["greedy_agreement"] >= backends[n]["greedy_agreement"] for n in ("cpu-int8", "cpu-int8-mixed"))
    gaps = out["reference_top2_gap"]
    assert set(gaps) == {"p01", "p02", "p05", "p10"} and 0 <= gaps["p01"] <= gaps["p10"]
    json.dumps(out)


def test_bench_device_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown device backend.*'npu'"):
        bench_device("tiny-llama", 16, backends=["npu"], reps=1)


@pytest.mark.slow
def test_bench_device_cli_on_the_real_model():
    pytest.importorskip("llama_cpp")
    cmd = [sys.executable, "-m", "tandem.sdk.cli", "bench", "device", "--model", "smollm2-135m", "--tokens", "256",
           "--decode-tokens", "32", "--limit", "20", "--reps", "1", "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1500).stdout)
    assert {"reference-fp32", "cpu-int8", "llama.cpp", "llama.cpp-draft"} <= set(out["backends"])
    assert out["backends"]["cpu-int8"]["greedy_agreement"] >= 0.9
    assert out["backends"]["llama.cpp-draft"]["decode_tok_per_s"] > 0
