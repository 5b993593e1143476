"""The W8A8 gateway target (`NAME:w8a8`): exact int8 rows whatever the batch, and its saved copy."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tandem.local_runtime.invariant import probe_linear
from tandem.local_runtime.models import load_model
from tandem.local_runtime.quant_w8a8 import W8A8Linear, pick_kernel, w8a8_rule
from tandem.local_runtime.w8a8_model import cache_file, load_w8a8


@pytest.mark.parametrize("kernel", ["int_mm", "onednn"])
def test_rows_are_exact_integer_sums_whatever_the_row_count(kernel):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    w = W8A8Linear.quantize(linear)
    try:
        layer = W8A8Linear(w, kernel)
        layer(torch.randn(2, 96))
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"{kernel} is not in this torch build: {exc}")
    assert probe_linear(torch.empty(40, 96), None, linear=lambda x, _w, _b: w8a8_rule(x, layer)) is None
    x = torch.randn(5, 96)
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = torch.round(x / scale).to(torch.int64)
    exact = (q @ w.weight_q.to(torch.int64).t()).double() * w.weight_scale.double() * scale.double() + w.bias.double()
    torch.testing.assert_close(layer(x).double(), exact, rtol=1e-6, atol=1e-5)
    assert layer(x[None]).shape == (1, 5, 40)  # leading dimensions kept


def test_a_w8a8_target_is_batch_invariant_and_needs_no_near_tie_rule():
    lm = load_model("tiny-qwen2:w8a8", progress=False)
    assert lm.batch_invariant and lm.tie_margin == 0.0
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 61]])
    with torch.inference_mode():
        whole = lm.model(input_ids=ids).logits[0]
        engine = lm.new_engine()
        rows = [engine.prefill(ids[0, :3].tolist())] + [engine.step(int(t)) for t in ids[0, 3:]]
    assert torch.equal(torch.stack(rows), whole[2:])  # one pass or one token at a time: the same bits


def test_the_saved_copy_loads_without_the_float_model_and_computes_the_same(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    source = tmp_path / "weights.gguf"
    source.write_bytes(b"stands in for the weights file the key is taken from")
    tiny = load_model("tiny-llama", progress=False)
    calls = []

    def load_float():
        calls.append(1)
        fresh = copy.copy(tiny)
        fresh.model = copy.deepcopy(tiny.model)
        return fresh, True

    def load():
        return load_w8a8("tiny-llama:w8a8", source=source, load_float=load_float, tokenizer_for=lambda _m: tiny.tokenizer,
                         status=lambda _msg: __import__("contextlib").nullcontext())

    ids = torch.tensor([[1, 2, 3, 40, 50]])
    first = load()
    assert cache_file(source).exists() and len(calls) == 1
    second = load()
    assert len(calls) == 1, "the second start must not load the float model"
    assert second.batch_invariant
    with torch.inference_mode():
        assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    cache_file(source).write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="tandem.models"):
        third = load()
    assert len(calls) == 2 and "ignoring the saved W8A8 model" in caplog.text
    with torch.inference_mode():
        assert torch.equal(third.model(input_ids=ids).logits, first.model(input_ids=ids).logits)


def test_the_kernel_is_chosen_per_shape():
    assert pick_kernel("auto", 8, 64, 128) in ("int_mm", "onednn")
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        pick_kernel("fastest")
