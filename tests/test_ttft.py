"""`tandem bench ttft`: the long prompt it builds, and one run end to end on tiny models (the
llama.cpp prefill beside it is measured on the real pair in the slow test)."""

from __future__ import annotations

import pytest

from tandem.local_runtime.models import load_model
from tandem.sdk.bench import ttft


def test_the_long_prompt_has_the_tokens_asked_for():
    tok = load_model("tiny-llama", progress=False).tokenizer
    text, n = ttft.long_prompt(tok, ["What is a hash table?", "Write a poem."], 300)
    assert n == 300 and len(tok.encode(text)) == 300 and "hash table" in text
    with pytest.raises(ValueError, match="no prompt texts"):
        ttft.long_prompt(tok, [], 10)


def test_ttft_per_mode_beside_the_engines_prefill(monkeypatch):
    measured = []
    monkeypatch.setattr(ttft, "llama_cpp_prefill_ms", lambda name, text, cores, reps: measured.append(name) or 50.0)
    out = ttft.bench_ttft(drafter="tiny-llama", target="tiny-llama", texts=["The quick brown fox jumps."],
                          prompt_tokens=120, split=False, reps=1, max_new_tokens=3)
    assert out["prompt_tokens"] == 120 and out["mismatches"] == 0 and out["target_served"] == "tiny-llama"
    assert all(out[f"{m}_ttft_ms"] > 0 for m in ("cloud", "speculative", "local"))
    assert out["cloud_over_target_prefill"] == round(out["cloud_ttft_ms"] / 50.0, 3)
    assert out["device_load_s"] >= 0  # the device model's cold start beside the gateway's
    assert measured == ["tiny-llama", "tiny-llama"]  # the target's engine, then the device's
