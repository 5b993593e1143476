"""Cold start: a converted model and measured facts are saved once and read back the same."""

import copy
import logging

import pytest
import torch

from tandem.local_runtime.models import load_model
from tandem.local_runtime.saved import converted_model, remembered


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "weights.gguf"
    source.write_bytes(b"stands for a GGUF file")
    return source


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_a_converted_model_is_read_back_mapped_and_identical(cache, name):
    original = copy.deepcopy(load_model(name, progress=False).model)
    calls = []

    def convert():
        calls.append(1)
        return original

    first = converted_model(cache, "float32", convert)
    second = converted_model(cache, "float32", convert)
    assert calls == [1] and second is not original
    ids = torch.tensor([[5, 17, 99, 3, 250, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(second(input_ids=ids).logits, first(input_ids=ids).logits, rtol=0, atol=0)
    if original.config.tie_word_embeddings:
        assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()
    # another dtype is another conversion
    converted_model(cache, "bfloat16", convert)
    assert calls == [1, 1]


def test_a_damaged_copy_is_converted_again_with_one_warning(cache, caplog):
    model = copy.deepcopy(load_model("tiny-llama", progress=False).model)
    converted_model(cache, "float32", lambda: model)
    (saved,) = (cache.parent / "cache" / "converted").iterdir()
    saved.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="tandem.models"):
        again = converted_model(cache, "float32", lambda: model)
    assert again is model and len(caplog.records) == 1 and "converting again" in caplog.text


def test_a_measured_fact_is_measured_once_per_file_and_question(cache):
    calls = []

    def measure(value):
        calls.append(value)
        return value

    assert remembered("verdict", cache, lambda: measure(True)) is True
    assert remembered("verdict", cache, lambda: measure(False)) is True  # read back, not measured
    assert remembered("verdict", cache, lambda: measure(False), "other samples") is False
    assert remembered("verdict", None, lambda: measure(True)) is True  # a random model: never saved
    assert calls == [True, False, True]
    tensors = [{"q": torch.arange(3.0)}]
    assert torch.equal(remembered("calibration", cache, lambda: tensors)[0]["q"], torch.arange(3.0))
    assert torch.equal(remembered("calibration", cache, lambda: None)[0]["q"], torch.arange(3.0))
