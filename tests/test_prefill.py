"""Chunked prefill: every chunk length and prompt length gives one-shot prefill's answer; W8A8 with
shadow outliers stays close to float, and the outlier channels are what keeps it close. On both
architectures: Llama, and Qwen2 (q/k/v biases, tied embeddings, grouped-query attention)."""

import pytest
import torch

from tandem.local_runtime.models import load_model
from tandem.local_runtime.prefill import ChunkedPrefill, calibrate, llama_layout
from tandem.local_runtime.quant_w8a8 import KERNELS, pack, pick_kernel, quantize_w8a8, w8a8_linear
from tandem.protocols.errors import UnsupportedModel

CHUNKS = [16, 32, 64]
LENGTHS = [1, 5, 15, 16, 17, 40, 64, 100]  # shorter than a chunk, exact multiples, and not


ARCHS = ["tiny-llama", "tiny-qwen2"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return load_model(request.param, progress=False)


@pytest.fixture(scope="module")
def stats(tiny):
    gen = torch.Generator().manual_seed(0)
    return calibrate(tiny.model, [torch.randint(0, 256, (200,), generator=gen).tolist()])


def _prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _one_shot(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    return out.logits[0, -1], cache


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("n", LENGTHS)
def test_float_chunked_prefill_equals_one_shot(tiny, chunk, n):
    ids = _prompt(n)
    logits, cache = _one_shot(tiny.model, ids)
    got = ChunkedPrefill(tiny.model, chunk=chunk).run(ids)
    assert got.n_tokens == n
    torch.testing.assert_close(got.logits, logits, atol=1e-4, rtol=1e-4)
    for layer, (k, v) in enumerate(zip(got.keys, got.values)):
        torch.testing.assert_close(k, cache.layers[layer].keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, cache.layers[layer].values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("n", LENGTHS)
def test_w8a8_chunked_prefill_equals_one_shot_w8a8(tiny, stats, chunk, n, dynamic):
    """Activation scales are per tensor and fixed by calibration, or per row: either way a row's
    int8 codes do not depend on which other rows share its chunk, so chunked prefill equals one
    chunk holding the whole prompt."""
    ids = _prompt(n, seed=2)
    opts = dict(mode="w8a8", act_absmax=stats, n_outliers=4, dynamic=dynamic)
    whole = ChunkedPrefill(tiny.model, chunk=128, **opts).run(ids)
    got = ChunkedPrefill(tiny.model, chunk=chunk, **opts).run(ids)
    torch.testing.assert_close(got.logits, whole.logits, atol=2e-3, rtol=1e-3)


def test_w8a8_prefill_is_close_to_float(tiny, stats):
    ids = _prompt(60, seed=3)
    ref, _ = _one_shot(tiny.model, ids)
    got = ChunkedPrefill(tiny.model, mode="w8a8", chunk=32, act_absmax=stats, n_outliers=4).run(ids)
    assert (got.logits - ref).abs().max() < 0.2 * ref.abs().max()


def _with_outlier_channels(lm, channels=(3, 17, 40), factor=40.0):
    """The same function as `lm`'s model, with a few hidden channels made 40x larger going into
    every attention and MLP block (their norm weights scaled up, the projections' columns scaled
    down): the activation outliers real LLMs have, planted where a tiny model has none."""
    import copy

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, projs in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[list(channels)] *= factor
                owner = layer.self_attn if projs[0] == "q_proj" else layer.mlp
                for p in projs:
                    getattr(owner, p).weight[:, list(channels)] /= factor
    return model


@pytest.mark.parametrize("dynamic", [False, True])
def test_shadow_outliers_reduce_the_error(tiny, dynamic):
    model = _with_outlier_channels(tiny)
    gen = torch.Generator().manual_seed(5)
    stats = calibrate(model, [torch.randint(0, 256, (256,), generator=gen).tolist()])
    errors = {}
    for k in (0, 4):
        runner = ChunkedPrefill(model, mode="w8a8", chunk=32, act_absmax=stats, n_outliers=k, dynamic=dynamic)
        errs = []
        for seed in range(6):  # held-out prompts, not the calibration text
            ids = _prompt(48, seed=100 + seed)
            ref, _ = _one_shot(model, ids)
            errs.append(float((runner.run(ids).logits - ref).abs().mean()))
        errors[k] = sum(errs) / len(errs)
    assert errors[4] < 0.5 * errors[0], errors


@pytest.mark.parametrize("dynamic", [False, True])
def test_smoothing_moves_range_into_the_weights_and_reduces_the_error(dynamic):
    """Input channels spanning two orders of magnitude: per-channel smoothing (SmoothQuant) is
    exact in float and lowers the W8A8 error of the layer."""
    gen = torch.Generator().manual_seed(3)
    spread = torch.logspace(-1, 1, 64)[torch.randperm(64, generator=gen)]
    x = torch.randn(64, 64, generator=gen) * spread
    weight = torch.randn(96, 64, generator=gen) * 0.05
    exact = x @ weight.t()
    absmax = x.abs().amax(0)
    err = {}
    for smooth in (0.0, 0.5):
        w = quantize_w8a8(weight, absmax, n_outliers=0, per_channel=True, dynamic=dynamic, smooth=smooth)
        # the float identity behind it: (x / f) @ (W * f)^T == x @ W^T
        dequant = w.weight_q.float() * w.weight_scale[:, None]
        torch.testing.assert_close((x * w.in_mult) @ dequant.t(), exact, atol=0.2, rtol=0.05)
        err[smooth] = float((w8a8_linear(x, pack(w, "int_mm", rows=64), "int_mm") - exact).abs().mean())
    assert err[0.5] < 0.8 * err[0.0], err


def test_outlier_channels_are_the_calibrated_largest(tiny):
    model = _with_outlier_channels(tiny, channels=(3, 17, 40))
    stats = calibrate(model, [_prompt(128, seed=9)])
    w = quantize_w8a8(model.model.layers[0].self_attn.q_proj.weight, stats[0]["qkv"], n_outliers=3)
    assert w.outlier_idx.tolist() == [3, 17, 40]
    assert (w.weight_q[:, [3, 17, 40]] == 0).all()


def test_int8_kernels_agree():
    """Both GEMM kernels do the same int32 arithmetic: identical outputs."""
    gen = torch.Generator().manual_seed(0)
    w = quantize_w8a8(torch.randn(96, 64, generator=gen), torch.rand(64, generator=gen) * 3, n_outliers=2)
    x = torch.randn(32, 64, generator=gen)
    outs = {}
    for kernel in KERNELS:
        try:
            outs[kernel] = w8a8_linear(x, pack(w, kernel, rows=32), kernel)
        except (RuntimeError, NotImplementedError, AttributeError):
            continue
    assert outs
    first = next(iter(outs.values()))
    for y in outs.values():
        torch.testing.assert_close(y, first, atol=1e-5, rtol=1e-5)
    # and the result is close to the float product
    assert (first - x @ torch.randn(96, 64, generator=torch.Generator().manual_seed(0)).t()).abs().max() < 50
    assert pick_kernel("auto", 32, 64, 96) in KERNELS


def test_compiled_chunk_graph_is_reused(tiny, stats):
    """One compile serves every chunk, layer and prompt length; results equal the eager graph."""
    from torch._dynamo.utils import counters

    eager = ChunkedPrefill(tiny.model, mode="w8a8", chunk=16, act_absmax=stats, n_outliers=4)
    compiled = ChunkedPrefill(tiny.model, mode="w8a8", chunk=16, act_absmax=stats, n_outliers=4, compile=True)
    compiled.run(_prompt(20))
    graphs = counters["stats"]["unique_graphs"]
    for n in (3, 16, 33, 50):
        ids = _prompt(n, seed=n)
        torch.testing.assert_close(compiled.run(ids).logits, eager.run(ids).logits, atol=1e-3, rtol=1e-3)
    assert counters["stats"]["unique_graphs"] == graphs


def test_unsupported_architecture_is_refused():
    class Cfg:
        model_type = "gemma3_text"

    class Fake:
        config = Cfg()

    with pytest.raises(UnsupportedModel, match="gemma3_text"):
        llama_layout(Fake())


def test_chunk_length_is_validated(tiny):
    with pytest.raises(ValueError, match="chunk"):
        ChunkedPrefill(tiny.model, chunk=4)
    with pytest.raises(ValueError, match="calibrated"):
        ChunkedPrefill(tiny.model, mode="w8a8")


def test_mixed_precision_sits_between_w8a8_and_float(tiny, stats):
    """Groups kept in float run the model's own weights: every group in float is the float
    prefill itself, and the down-projections alone in float lower W8A8's error."""
    model = _with_outlier_channels(tiny)
    gen = torch.Generator().manual_seed(7)
    stats = calibrate(model, [torch.randint(0, 256, (256,), generator=gen).tolist()])
    opts = dict(mode="w8a8", chunk=32, act_absmax=stats, n_outliers=0)
    all_float = ChunkedPrefill(model, float_groups=("qkv", "o", "gate_up", "down"), **opts)
    float_mode = ChunkedPrefill(model, chunk=32)
    int8 = ChunkedPrefill(model, **opts)
    mixed = ChunkedPrefill(model, float_groups=("qkv", "gate_up"), **opts)
    float_ends = ChunkedPrefill(model, float_layers=(0, -1), **opts)
    errs: dict[str, list[float]] = {"int8": [], "mixed": [], "ends": []}
    for seed in range(4):
        ids = _prompt(40, seed=200 + seed)
        ref, _ = _one_shot(model, ids)
        torch.testing.assert_close(all_float.run(ids).logits, float_mode.run(ids).logits, atol=1e-5, rtol=1e-5)
        for name, runner in (("int8", int8), ("mixed", mixed), ("ends", float_ends)):
            errs[name].append(float((runner.run(ids).logits - ref).abs().mean()))
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    assert mean["mixed"] < 0.7 * mean["int8"], mean
    assert mean["ends"] < mean["int8"], mean
    assert mixed.weight_bytes > int8.weight_bytes  # float groups keep their float weights


def test_mixed_precision_options_are_validated(tiny, stats):
    with pytest.raises(ValueError, match="unknown linear group.*'mlp'"):
        ChunkedPrefill(tiny.model, mode="w8a8", act_absmax=stats, float_groups=("mlp",))
    n = llama_layout(tiny.model).n_layers
    with pytest.raises(ValueError, match=f"out of range for a model of {n} layers"):
        ChunkedPrefill(tiny.model, mode="w8a8", act_absmax=stats, float_layers=(n,))


def test_tiny_qwen2_has_what_sets_qwen2_apart():
    """q/k/v biases large enough to matter, tied embeddings and grouped-query attention: the parts
    of Qwen2 a Llama-only backend would get wrong, so the tests above would catch it."""
    lm = load_model("tiny-qwen2", progress=False)
    lay = llama_layout(lm.model)
    assert lay.lm_head.data_ptr() == lay.embed.data_ptr()
    assert lay.n_kv_heads < lay.n_heads
    for layer in lay.layers:
        assert all(layer[m].bias is not None and layer[m].bias.abs().mean() > 0.5 for m in ("q", "k", "v"))
        assert layer["o"].bias is None
    ids = _prompt(40)
    ref, _ = _one_shot(lm.model, ids)
    import copy

    unbiased = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer in unbiased.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
    assert (ChunkedPrefill(unbiased, chunk=16).run(ids).logits - ref).abs().max() > 0.1


def test_kernel_report_names_the_kernel_auto_chose_on_that_shape():
    from tandem.local_runtime.quant_w8a8 import KERNELS, kernel_report, pick_kernel

    r = kernel_report(16, 64, 128)
    assert r["chosen"] == pick_kernel("auto", 16, 64, 128) and r["chosen"] in KERNELS
    assert r["shape"] == [16, 64, 128] and "16x64x128" in r["why"] and r["chosen"] in r["why"]
    assert r["ms"][r["chosen"]] is not None and set(r["ms"]) == set(KERNELS)
