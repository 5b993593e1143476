"""Device backends: each one passes the same lossless speculative test, engines agree with the
torch engine, and missing optional backends fail with a one-line error naming the extra. The
model-dependent tests run on both architectures (a tiny Llama, a tiny Qwen2 with q/k/v biases,
tied embeddings and grouped-query attention), each drafting for a target of its own kind."""

import sys

import pytest
import torch

from tandem.local_runtime.backends import (
    DraftingEngine,
    PrefillBackend,
    WithPrefill,
    drafter_engine,
    split_backend,
)
from tandem.local_runtime.engine import Engine
from tandem.local_runtime.models import load_model
from tandem.local_runtime.prefill import calibrate
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import BackendUnavailable
from tandem.protocols.transport import InProcessTransport
from tandem.sdk import Client

from .conftest import assert_speculative_is_target, run

# long enough (>= 16 tokens) that the prefill backends, not the engine, run the prompt
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Once upon a time, in a land far away, there lived a king",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
]


# target -> drafter, one pair per architecture
PAIRS = {"tiny-llama": "tiny-llama-b", "tiny-qwen2": "tiny-qwen2-b"}


@pytest.fixture(scope="module", params=list(PAIRS))
def target_name(request):
    return request.param


@pytest.fixture(scope="module")
def drafter_lm(target_name):
    return load_model(PAIRS[target_name], progress=False)


@pytest.fixture(scope="module")
def target_gateway(target_name, tiny_gateway_of):
    return tiny_gateway_of(target_name)


@pytest.fixture(scope="module")
def act_stats(drafter_lm):
    gen = torch.Generator().manual_seed(0)
    return calibrate(drafter_lm.model, [torch.randint(0, 256, (160,), generator=gen).tolist()])


@pytest.fixture(scope="module")
def tiny_gguf(drafter_lm, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from tandem.local_runtime.backends.gguf_writer import write_llama_gguf

    return write_llama_gguf(drafter_lm, tmp_path_factory.mktemp("gguf") / f"{drafter_lm.name}.gguf")


def _drafter(kind, lm, stats, gguf):
    if kind == "torch":
        return lm
    if kind == "cpu-int8":
        from tandem.local_runtime.backends.cpu_int8 import CpuInt8Prefill

        return WithPrefill(lm, CpuInt8Prefill(lm, chunk=16, act_absmax=stats, n_outliers=4, compile=False))
    if kind == "onnx":
        pytest.importorskip("onnxruntime")
        from tandem.local_runtime.backends.onnx_rt import OnnxPrefill

        return WithPrefill(lm, OnnxPrefill(lm, chunk=16, act_absmax=stats, n_outliers=4))
    if kind == "torch-int8":
        from tandem.local_runtime.backends.lean import StaticInt8Model

        return StaticInt8Model(lm, capacity=32)  # small: the cache must grow during the test
    if kind == "llama.cpp":
        from tandem.local_runtime.backends.llamacpp import LlamaCppModel

        return LlamaCppModel(lm.name, gguf, lm.tokenizer, n_ctx=512, n_threads=2)
    if kind == "cpu-int8+llama.cpp":
        from tandem.local_runtime.backends.cpu_int8 import CpuInt8Prefill
        from tandem.local_runtime.backends.llamacpp import LlamaCppModel
        from tandem.local_runtime.backends.split_prefill import attach

        model = LlamaCppModel(lm.name, gguf, lm.tokenizer, n_ctx=512, n_threads=2)
        model = attach(model, lm, CpuInt8Prefill(lm, chunk=16, act_absmax=stats, n_outliers=4, compile=False))
        assert model.state_prefill is not None  # the probe passed: prompts are prefilled in int8
        return model
    raise AssertionError(kind)


BACKENDS = ["torch", "cpu-int8", "onnx", "torch-int8", "llama.cpp", "cpu-int8+llama.cpp"]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("draft_len", [1, 4])
def test_greedy_speculative_equals_target_alone_on_every_backend(target_gateway, drafter_lm, act_stats, kind, draft_len, request):
    gguf = request.getfixturevalue("tiny_gguf") if "llama.cpp" in kind else None
    drafter = _drafter(kind, drafter_lm, act_stats, gguf)
    assert_speculative_is_target(target_gateway, drafter, PROMPTS, 24, draft_len, label=kind)


@pytest.mark.parametrize("kind", ["cpu-int8", "onnx", "torch-int8", "llama.cpp", "cpu-int8+llama.cpp"])
def test_engines_follow_the_interface_and_roll_back(drafter_lm, act_stats, kind, request):
    """Draft, roll back, draft again: the same tokens as a fresh engine on the same prefix."""
    gguf = request.getfixturevalue("tiny_gguf") if "llama.cpp" in kind else None
    model = _drafter(kind, drafter_lm, act_stats, gguf)
    engine = drafter_engine(model)
    assert isinstance(engine, DraftingEngine)
    prompt = drafter_lm.tokenizer.prompt_tokens(PROMPTS[1], chat=False)
    engine.prefill(prompt)
    first = engine.draft(8)
    assert len(first.tokens) == 8 and all(0 < q <= 1 for q in first.probs)
    engine.truncate(len(prompt) + 3)
    again = engine.draft(5)
    assert again.tokens == first.tokens[3:8]
    fresh = drafter_engine(model)
    fresh.prefill(prompt + first.tokens[:3])
    assert fresh.draft(5).tokens == again.tokens


@pytest.mark.parametrize("kind", ["torch-int8", "llama.cpp"])
def test_drafting_engines_agree_with_the_torch_engine(drafter_lm, act_stats, kind, request):
    gguf = request.getfixturevalue("tiny_gguf") if "llama.cpp" in kind else None
    """llama.cpp on float32 weights against the float engine; the lean loop against the engine
    over the same int8 weights (`NAME:int8`, per-output-channel scales)."""
    engine = drafter_engine(_drafter(kind, drafter_lm, act_stats, gguf))
    ref = Engine(load_model(drafter_lm.name + (":int8" if kind == "torch-int8" else ""), progress=False))
    prompt = drafter_lm.tokenizer.prompt_tokens(PROMPTS[0], chat=False)
    a, b = engine.prefill(prompt), ref.prefill(prompt)
    assert (a - b).abs().max() < (1e-3 if kind == "torch-int8" else 0.02)
    assert engine.draft(12).tokens == ref.draft(12).tokens


def test_sampled_drafts_from_llama_cpp_are_reproducible(drafter_lm, tiny_gguf):
    engine = drafter_engine(_drafter("llama.cpp", drafter_lm, None, tiny_gguf))
    prompt = drafter_lm.tokenizer.prompt_tokens(PROMPTS[2], chat=False)
    drafts = []
    for _ in range(2):
        engine.prefill(prompt)
        drafts.append(engine.draft(6, temperature=0.8, generator=torch.Generator().manual_seed(3)))
    assert drafts[0].tokens == drafts[1].tokens and drafts[0].dists is not None


def test_engine_prefill_backend_hook_matches_plain_engine(drafter_lm):
    from tandem.local_runtime.backends.cpu_int8 import ReferencePrefill

    backend = ReferencePrefill(drafter_lm)
    assert isinstance(backend, PrefillBackend)
    hooked, plain = Engine(drafter_lm, prefill_backend=backend), Engine(drafter_lm)
    prompt = drafter_lm.tokenizer.prompt_tokens(PROMPTS[0], chat=False)
    torch.testing.assert_close(hooked.prefill(prompt), plain.prefill(prompt), atol=1e-5, rtol=1e-5)
    assert hooked.draft(10).tokens == plain.draft(10).tokens
    hooked.truncate(len(prompt) + 2)
    plain.truncate(len(prompt) + 2)
    assert hooked.draft(4).tokens == plain.draft(4).tokens


def test_onnx_graph_matches_the_torch_chunk_graph(drafter_lm, act_stats):
    pytest.importorskip("onnxruntime")
    from tandem.local_runtime.backends.cpu_int8 import CpuInt8Prefill
    from tandem.local_runtime.backends.onnx_rt import OnnxPrefill

    onnx = OnnxPrefill(drafter_lm, chunk=16, act_absmax=act_stats, n_outliers=4)
    torch_int8 = CpuInt8Prefill(drafter_lm, chunk=16, act_absmax=act_stats, n_outliers=4, compile=False)
    assert "CPUExecutionProvider" in onnx.device or onnx.provider != "CPUExecutionProvider"
    for n in (3, 16, 41):
        ids = list(range(40, 40 + n))
        a, b = onnx.prefill(ids), torch_int8.prefill(ids)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a.keys[-1], b.keys[-1], atol=1e-3, rtol=1e-3)
    assert onnx.resident_bytes() > 0


def test_execution_provider_choice():
    from tandem.local_runtime.backends.onnx_rt import choose_providers

    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["QNNExecutionProvider", "CPUExecutionProvider"]) == ["QNNExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["OpenVINOExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"])[0] == "CoreMLExecutionProvider"
    with pytest.raises(BackendUnavailable, match="not available"):
        choose_providers(["CPUExecutionProvider"], prefer="QNNExecutionProvider")


def test_backend_names():
    assert split_backend("smollm2-135m@llama.cpp") == ("smollm2-135m", "llama.cpp")
    assert split_backend("smollm2-135m", "llamacpp") == ("smollm2-135m", "llama.cpp")
    assert split_backend("tiny-llama@smollm2-135m") == ("tiny-llama@smollm2-135m", None)
    assert split_backend("tiny-llama@smollm2-135m@cpu-int8") == ("tiny-llama@smollm2-135m", "cpu-int8")
    assert split_backend("smollm2-135m:int8@torch-int8") == ("smollm2-135m:int8", "torch-int8")
    with pytest.raises(BackendUnavailable, match="unknown device backend"):
        split_backend("x", "tpu")
    with pytest.raises(BackendUnavailable, match="names backend"):
        split_backend("x@llama.cpp", "onnx")


def test_client_picks_the_backend_from_the_name(tiny_gateway):
    async def go():
        async with Client(drafter="tiny-llama-b@torch-int8", gateway=InProcessTransport(tiny_gateway), draft_len=3) as c:
            assert (c.drafter_name, c.drafter_backend) == ("tiny-llama-b", "torch-int8")
            engine = c.new_drafter_engine()
            return type(engine).__name__, await c.generate(PROMPTS[0], max_new_tokens=8, chat=False)

    name, rec = run(go())
    assert name == "StaticInt8Engine" and len(rec.tokens) == 8


def test_local_mode_runs_on_a_backend_engine(drafter_lm):
    from tandem.local_runtime.backends.lean import StaticInt8Model

    model = StaticInt8Model(drafter_lm)
    prompt = drafter_lm.tokenizer.prompt_tokens(PROMPTS[0], chat=False)
    assert len(list(generate_alone(model, prompt, 10))) == 10


def test_missing_optional_backends_name_their_extra(monkeypatch, drafter_lm):
    from tandem.local_runtime.backends import llamacpp, mlc

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'tandem\[llamacpp\]'"):
        llamacpp.LlamaCppModel("x", "x.gguf", drafter_lm.tokenizer)
    monkeypatch.setitem(sys.modules, "mlc_llm", None)
    with pytest.raises(BackendUnavailable, match="not on PyPI"):
        mlc.MlcModel("x", drafter_lm.tokenizer)
    from tandem.local_runtime.backends import onnx_rt

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailable, match=r"tandem\[onnx\]"):
        onnx_rt.OnnxPrefill(drafter_lm)


def test_import_stays_light():
    import subprocess

    code = "import sys, tandem.sdk, tandem.local_runtime.backends; print(sorted(m for m in ('torch', 'onnxruntime', 'llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_onnx_graph_too_large_for_one_file_is_refused_clearly(monkeypatch, drafter_lm, act_stats):
    pytest.importorskip("onnxruntime")
    from tandem.local_runtime.backends import onnx_rt

    monkeypatch.setattr(onnx_rt, "MAX_INLINE_WEIGHTS", 1 << 16)  # what 2 GiB is to a real model
    with pytest.raises(BackendUnavailable, match=r"more than one ONNX file can hold"):
        onnx_rt.OnnxPrefill(drafter_lm, chunk=16, act_absmax=act_stats, n_outliers=4)


def test_llama_cpp_own_loop_generates_greedily_to_the_length_and_compares_with_tandem(drafter_lm, tiny_gguf):
    from tandem.local_runtime.backends.llamacpp import LlamaCppModel, native_generate
    from tandem.sdk.bench.baseline import compare

    llm = LlamaCppModel("tiny", tiny_gguf, drafter_lm.tokenizer, n_threads=1)
    try:
        prompt = drafter_lm.tokenizer.prompt_tokens("hello there", chat=False)
        run_a = native_generate(llm, prompt, 6, eos=[])
        run_b = native_generate(llm, prompt, 6, eos=[])
        assert len(run_a["tokens"]) == 6 and run_a["tokens"] == run_b["tokens"]  # greedy, a fresh context each time
        assert 0 < run_a["first_s"] <= run_a["total_s"]
        stop = native_generate(llm, prompt, 6, eos=[run_a["tokens"][2]])
        assert stop["tokens"] == run_a["tokens"][: run_a["tokens"].index(run_a["tokens"][2]) + 1]
    finally:
        llm.close()
    base = {"engine": "llama.cpp", "outputs": [run_a["tokens"]], "s_per_token": 0.1, "decode_s_per_token": 0.05, "first_piece_s": 0.3}
    out = {"s_per_token": {"speculative": 0.05, "cloud": 0.12}, "decode_s_per_token": {"speculative": 0.025, "cloud": 0.06}}
    c = compare(out, base, [run_a["tokens"]])
    assert c["speedup_vs_baseline"] == 2.0 and c["cloud_vs_engine"] == 1.2 and c["baseline_mismatches"] == 0
