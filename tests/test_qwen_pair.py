"""The Qwen2.5-Coder pair from its part packages (slow: assembles and loads the real models).

The 0.5B model drafts on llama.cpp and the 1.5B model verifies in torch; both GGUF files come out
of the cache with their published checksums, speak one tokenizer, and answer under their chat
template."""

import hashlib

import pytest

from tandem.local_runtime.models import load_model, load_tokenizer, resolve_gguf
from tandem.local_runtime.packaged import PARTED
from tandem.local_runtime.sequence import generate_alone

pytestmark = pytest.mark.slow

DRAFTER, TARGET = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
CODE_PROMPT = "Write a Python function that returns the square of a number."


@pytest.mark.parametrize("name", list(PARTED))
def test_the_assembled_file_has_the_published_checksum(name):
    spec = PARTED[name]
    path = resolve_gguf(name, progress=False)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    assert path.stat().st_size == spec.size and h.hexdigest() == spec.sha256


def test_the_pair_shares_one_tokenizer():
    drafter, target = load_tokenizer(DRAFTER, progress=False), load_tokenizer(TARGET, progress=False)
    assert drafter.fingerprint == target.fingerprint
    assert max(drafter.vocab.values()) + 1 <= 151_936
    assert drafter.eot_token_id == drafter.vocab["<|im_end|>"]
    text = drafter.decode(drafter.prompt_tokens("Hi"))
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def drafter_cpp():
    pytest.importorskip("llama_cpp")
    from tandem.local_runtime.backends import load_drafter

    return load_drafter(DRAFTER, "llama.cpp", progress=False)


def test_the_drafter_on_llama_cpp_answers_under_its_chat_template(drafter_cpp):
    tok = drafter_cpp.tokenizer
    engine = drafter_cpp.new_engine()
    engine.prefill(tok.prompt_tokens(CODE_PROMPT))
    text = tok.text(engine.draft(40).tokens)
    assert "```python" in text and "def square" in text, text


def test_llama_cpp_and_transformers_agree_on_the_drafters_greedy_start(drafter_cpp):
    """The same Q4_K_M weights: dequantised to fp32 in torch, int8 dot products in llama.cpp, so
    the two drift apart eventually, but not in the first tokens of a well-determined answer."""
    lm = load_model(DRAFTER, progress=False)
    assert lm.tokenizer.fingerprint == drafter_cpp.tokenizer.fingerprint
    prompt = lm.tokenizer.prompt_tokens(CODE_PROMPT)
    engine = drafter_cpp.new_engine()
    engine.prefill(prompt)
    assert engine.draft(8).tokens == list(generate_alone(lm, prompt, 8))


def test_the_target_explains_the_blue_sky():
    lm = load_model(TARGET, progress=False)
    out = list(generate_alone(lm, lm.tokenizer.prompt_tokens("Why is the sky blue?"), 24))
    assert "scatter" in lm.tokenizer.text(out).lower()


def test_the_cached_tokenizer_is_the_converted_one(tmp_path, monkeypatch):
    """A GGUF's tokenizer is converted once and then loaded from the cache: the same ids, template
    and special tokens either way."""
    from tandem.local_runtime import models
    from tandem.local_runtime.saved import hf_tokenizer

    path = resolve_gguf(DRAFTER, progress=False)
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    converted = hf_tokenizer(path)
    assert len(list((tmp_path / "models" / "tokenizers").iterdir())) == 1
    cached = hf_tokenizer(path)
    a, b = models._wrap_hf_tokenizer(converted, None), models._wrap_hf_tokenizer(cached, None)
    assert a.fingerprint == b.fingerprint and a.eot_token_id == b.eot_token_id and a.special_ids == b.special_ids
    for text in ("Why is the sky blue?", "def f(x):\n    return x ** 2  # Übersetzung, 空"):
        assert a.prompt_tokens(text) == b.prompt_tokens(text) and a.encode(text) == b.encode(text)


def test_the_w8a8_target_is_lossless_under_the_llamacpp_drafter(tmp_path, monkeypatch):
    """The exact int8 target the default chooses on VNNI/AMX CPUs: speculative output is the
    W8A8 model's own, token for token, and its saved copy computes the same."""
    from .conftest import assert_speculative_is_target

    from tandem.local_runtime import models
    from tandem.remote_gateway.service import Gateway

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    models._cache.pop(TARGET, None)  # quantised in place, not beside a float copy
    try:
        lm = load_model(TARGET + ":w8a8", progress=False)
    except models.ModelLoadError as exc:
        pytest.skip(f"no exact W8A8 target on this CPU: {exc}")
    assert lm.batch_invariant and lm.tie_margin == 0.0
    out = list(generate_alone(lm, lm.tokenizer.prompt_tokens("Why is the sky blue?"), 24))
    assert "scatter" in lm.tokenizer.text(out).lower()
    assert_speculative_is_target(Gateway(lm), DRAFTER + "@llama.cpp", [CODE_PROMPT, "Why is the sky blue?"], 24, 4)
    models._cache.pop(TARGET + ":w8a8")
    again = load_model(TARGET + ":w8a8", progress=False)  # from the saved copy
    assert list(generate_alone(again, again.tokenizer.prompt_tokens("Why is the sky blue?"), 24)) == out
    models._cache.pop(TARGET + ":w8a8")


def test_llama_cpps_own_prefill_is_timed_on_the_real_file():
    from tandem.sdk.bench.ttft import llama_cpp_prefill_ms, long_prompt

    text, n = long_prompt(load_tokenizer(DRAFTER, progress=False), [CODE_PROMPT], 64)
    assert n == 64 and llama_cpp_prefill_ms(DRAFTER + "@llama.cpp", text, None, 1) > 0
