"""The device's int8 prefill feeding llama.cpp (`cpu-int8+llama.cpp`): llama.cpp's sequence-state
layout read and written byte for byte, the probe that checks it against the loaded build, and the
fallback to llama.cpp's own prefill with one warning when anything does not match."""

import logging

import numpy as np
import pytest

from tandem.local_runtime.backends import split_backend
from tandem.local_runtime.backends.llamacpp_state import KVState, read_state, rope_to_llama_cpp, write_state
from tandem.local_runtime.models import load_model
from tandem.protocols.errors import BackendUnavailable

PROMPT = "The quick brown fox jumps over the lazy dog, again and again and again."


def _state(v_trans: bool, cells: int = 5, layers: int = 3) -> KVState:
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((cells, 8)).astype("<f2") for _ in range(layers)]
    values = [rng.standard_normal((cells, 12)).astype("<f2") for _ in range(layers)]
    return KVState(0xAF143CD8, 2, 1, v_trans, 1, 1, np.arange(cells, dtype="<i4"), keys, values)


@pytest.mark.parametrize("v_trans", [False, True])
def test_the_state_layout_round_trips(v_trans):
    state = _state(v_trans)
    data = write_state(state)
    back = read_state(data)
    assert (back.tag, back.n_stream, back.stream, back.v_trans, back.n_layers) == (0xAF143CD8, 2, 1, v_trans, 3)
    assert list(back.positions) == list(range(5))
    for a, b in zip(state.keys + state.values, back.keys + back.values):
        np.testing.assert_array_equal(a, b)
    assert write_state(back) == data


def test_a_state_in_another_layout_is_refused_naming_what_differs():
    data = write_state(_state(False))
    with pytest.raises(BackendUnavailable, match="expected more"):
        read_state(data[:-3])
    with pytest.raises(BackendUnavailable, match="bytes after its last layer"):
        read_state(data + b"\0")
    # the first key type sits after the tag, n_stream, two cell counts, 5 cells x 12 bytes,
    # v_trans and n_layer
    quantised = bytearray(data)
    quantised[88:92] = np.int32(8).tobytes()  # GGML_TYPE_Q8_0
    with pytest.raises(BackendUnavailable, match="ggml type 8"):
        read_state(bytes(quantised))
    with pytest.raises(BackendUnavailable, match="holds no cells"):
        read_state(np.array([0, 0, 1, 0], dtype="<u4").tobytes())


def test_keys_go_to_llama_cpps_rope_order():
    head_dim, rows = 8, np.arange(2 * 16, dtype=np.float32).reshape(2, 16)  # 2 cells, 2 heads
    assert rope_to_llama_cpp(rows, head_dim, neox=True) is rows
    out = rope_to_llama_cpp(rows, head_dim, neox=False)
    # transformers rotates (i, i + d/2) together; llama.cpp's Llama graph (2i, 2i + 1)
    assert out[0, :8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7] and out[1, 8:].tolist() == [24, 28, 25, 29, 26, 30, 27, 31]


def test_the_backend_is_named_like_the_others():
    assert split_backend("qwen2.5-coder-0.5b@cpu-int8+llama.cpp") == ("qwen2.5-coder-0.5b", "cpu-int8+llama.cpp")


# -- against llama.cpp, on a tiny model of each architecture ----------------------------------------


@pytest.fixture(scope="module", params=["tiny-llama-b", "tiny-qwen2-b"])
def lm(request):
    return load_model(request.param, progress=False)


@pytest.fixture(scope="module")
def gguf(lm, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from tandem.local_runtime.backends.gguf_writer import write_llama_gguf

    return write_llama_gguf(lm, tmp_path_factory.mktemp("gguf") / f"{lm.name}.gguf")


def _llama(lm, gguf):
    from tandem.local_runtime.backends.llamacpp import LlamaCppModel

    return LlamaCppModel(lm.name, gguf, lm.tokenizer, n_ctx=512, n_threads=2)


def _reference(lm):
    from tandem.local_runtime.backends.cpu_int8 import ReferencePrefill

    return ReferencePrefill(lm)


def test_float_keys_written_into_llama_cpp_give_its_own_rows(lm, gguf):
    """With the float reference as the prefill backend, the state written is llama.cpp's own up to
    f16 rounding: the rows after it, and the greedy drafts, are llama.cpp's."""
    from tandem.local_runtime.backends.split_prefill import attach

    plain = _llama(lm, gguf).new_engine()
    split_model = attach(_llama(lm, gguf), lm, _reference(lm))
    assert split_model.state_prefill is not None and split_model.state_prefill.agreement > 0.999
    split = split_model.new_engine()
    prompt = lm.tokenizer.prompt_tokens(PROMPT, chat=False)
    a = split.prefill(prompt).clone()
    b = plain.prefill(prompt).clone()
    assert (a - b).abs().max() < 0.02
    assert split.draft(12).tokens == plain.draft(12).tokens


def test_a_layout_this_build_does_not_write_is_refused_with_one_warning(lm, gguf, monkeypatch, caplog):
    from tandem.local_runtime.backends import split_prefill

    def foreign(_data):
        raise BackendUnavailable("llama.cpp sequence state: v_trans 7, 3 layers is not this layout")

    monkeypatch.setattr(split_prefill, "read_state", foreign)
    with caplog.at_level(logging.WARNING, logger="tandem.backends"):
        model = split_prefill.attach(_llama(lm, gguf), lm, _reference(lm))
    assert model.state_prefill is None
    assert len(caplog.records) == 1 and "prefill on llama.cpp itself" in caplog.text and "v_trans 7" in caplog.text
    engine = model.new_engine()
    engine.prefill(lm.tokenizer.prompt_tokens(PROMPT, chat=False))
    assert len(engine.draft(4).tokens) == 4


def test_the_probe_catches_keys_in_the_wrong_rope_order(tmp_path, monkeypatch, caplog):
    """Were the keys written in transformers' order for a Llama graph (the one arch whose order
    differs), the probe's agreement falls and the split is not used."""
    pytest.importorskip("llama_cpp")
    from tandem.local_runtime.backends import split_prefill
    from tandem.local_runtime.backends.gguf_writer import write_llama_gguf

    llama = load_model("tiny-llama-b", progress=False)
    gguf = write_llama_gguf(llama, tmp_path / "tiny-llama-b.gguf")
    monkeypatch.setattr(split_prefill, "rope_to_llama_cpp", lambda rows, head_dim, neox: rows)
    with caplog.at_level(logging.WARNING, logger="tandem.backends"):
        model = split_prefill.attach(_llama(llama, gguf), llama, _reference(llama))
    assert model.state_prefill is None and "agree with llama.cpp's own only" in caplog.text


def test_a_write_that_fails_falls_back_to_llama_cpp_once(lm, gguf, monkeypatch, caplog):
    from tandem.local_runtime.backends.split_prefill import attach

    model = attach(_llama(lm, gguf), lm, _reference(lm))
    assert model.state_prefill is not None

    def refuse(ctx, tokens):
        raise BackendUnavailable("llama.cpp did not take the prefilled sequence state")

    monkeypatch.setattr(model.state_prefill, "write", refuse)
    plain = _llama(lm, gguf).new_engine()
    prompt = lm.tokenizer.prompt_tokens(PROMPT, chat=False)
    with caplog.at_level(logging.WARNING, logger="tandem.backends"):
        engine = model.new_engine()
        a = engine.prefill(prompt).clone()
        engine.reset()
        engine.prefill(prompt)
    assert model.state_prefill is None and len(caplog.records) == 1
    assert (a - plain.prefill(prompt)).abs().max() < 1e-4
