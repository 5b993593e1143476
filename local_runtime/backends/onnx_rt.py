"""The chunk graph as ONNX, run by ONNX Runtime on an NPU execution provider when there is one.

The graph is the one `prefill.ChunkedPrefill` runs in torch: a fixed chunk of tokens through
every layer, attending to the keys/values of earlier chunks, with each linear layer in W8A8 and
its calibrated outlier channels in float beside it (same weights, same scales, same outlier
channels, from `prefill.quantize_layers`). It is written node by node with `onnx.helper`,
so every operator is a standard one an NPU compiler knows:

    linear       QuantizeLinear(x * keep, s_x, Q + 1)  uint8 activations, static per-tensor scale
                 MatMulInteger(., Wq^T, Q + 1, 0)      int8 weights, int32 accumulation
                 Cast, Mul(s_x * s_w)                 (ORT fuses these into MatMulIntegerToFloat)
                 + MatMul(Gather(x, O), W[:, O]^T)    the shadow outlier channels, in float
    attention    MatMul/Softmax over Concat(past, new) keys, an additive causal mask

Inputs: `input_ids` (chunk,), `cos`/`sin` (chunk, head_dim), `mask` (chunk, past + chunk),
`past_keys`/`past_values` (layers, kv_heads, past, head_dim), `last` (the row whose logits to
return). Outputs: `logits` (vocab,), `new_keys`/`new_values` (layers, kv_heads, chunk, head_dim).

Execution providers are tried in order: QNN (Qualcomm Hexagon NPU), CoreML (Apple Neural Engine),
OpenVINO (Intel NPU/GPU), then CPU; the one the session actually got is reported.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...protocols.errors import BackendUnavailable
from ..prefill import PrefillResult, calibrate, llama_layout, quantize_layers
from ..prefill_calibration import calibration_samples
from ..quant_w8a8 import DEFAULT_SMOOTH
from .base import missing_extra

if TYPE_CHECKING:
    from ..loaded import LoadedModel
    from ..prefill import LlamaLayout
    from ..quant_w8a8 import W8A8Weights

NPU_PROVIDERS = ("QNNExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider")
OPSET = 17
# a protobuf message, so a whole .onnx file, stops at 2 GiB; room is left for the graph itself
MAX_INLINE_WEIGHTS = 2**31 - (64 << 20)


def _onnx():
    try:
        import onnx  # noqa: PLC0415
        import onnxruntime  # noqa: PLC0415
    except ImportError as exc:
        raise missing_extra("onnxruntime", "onnx", "the ONNX Runtime backend") from exc
    return onnx, onnxruntime


def choose_providers(available: list[str], prefer: str | None = None) -> list[str]:
    """The providers to ask for, best first: a requested one, else the first NPU one available,
    always with the CPU provider last as the fallback for anything the NPU does not take."""
    if prefer is not None:
        if prefer not in available:
            raise BackendUnavailable(f"execution provider '{prefer}' is not available (have: {', '.join(available)})")
        chosen = [prefer]
    else:
        chosen = [p for p in NPU_PROVIDERS if p in available][:1]
    return chosen + (["CPUExecutionProvider"] if "CPUExecutionProvider" not in chosen else [])


class _Graph:
    """A small builder over onnx.helper: named values, initializers, nodes."""

    def __init__(self, onnx_mod: Any) -> None:
        self.onnx = onnx_mod
        self.h = onnx_mod.helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0
        self.weight_bytes = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
        array = np.array(array, order="C")
        self.weight_bytes += array.nbytes
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, domain: str = "", **attrs) -> Any:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=outs[0], domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs


def _linear(g: _Graph, x: str, w: "W8A8Weights", hint: str) -> str:
    keep = w.in_mult.numpy().astype(np.float32)
    xm = g.op("Mul", [x, g.const(keep, f"{hint}_keep")])
    # u8 codes zp-Q..zp+Q with zp = Q + 1 = 128 (weights limited where u8s8 saturates; see quant_w8a8)
    zp = g.const(np.array(w.act_qmax + 1, dtype=np.uint8), "zp_u8")
    if w.dynamic:
        # one scale per row, measured here: s = max|row| / Q, codes round(x / s) + zp
        amax = g.op("ReduceMax", [g.op("Abs", [xm])], axes=[-1], keepdims=1)
        row_scale = g.op("Div", [g.op("Max", [amax, g.const(np.array(1e-8, dtype=np.float32), "tiny")]),
                                 g.const(np.array(float(w.act_qmax), dtype=np.float32), "qmax")])
        codes = g.op("Add", [g.op("Round", [g.op("Div", [xm, row_scale])]),
                             g.const(np.array(float(w.act_qmax + 1), dtype=np.float32), "zp_f")])
        xq = g.op("Cast", [codes], to=2)  # uint8
    else:
        # clip to the calibrated range first: QuantizeLinear would saturate to 0..255, not to zp +- Q
        bound = float(w.act_scale) * w.act_qmax
        xm = g.op("Clip", [xm, g.const(np.array(-bound, dtype=np.float32), "lo"), g.const(np.array(bound, dtype=np.float32), "hi")])
        xq = g.op("QuantizeLinear", [xm, g.const(w.act_scale.reshape(()).numpy().astype(np.float32), f"{hint}_sx"), zp])
    wq = g.const(w.weight_q.t().contiguous().numpy(), f"{hint}_wq")  # (in, out) int8
    acc = g.op("MatMulInteger", [xq, wq, zp, g.const(np.array(0, dtype=np.int8), "zp_s8")])
    scale = (w.weight_scale if w.dynamic else w.act_scale * w.weight_scale).float().numpy()
    y = g.op("Mul", [g.op("Cast", [acc], to=1), g.const(scale, f"{hint}_scale")])
    if w.dynamic:
        y = g.op("Mul", [y, row_scale])
    if w.outlier_idx.numel():
        xo = g.op("Gather", [x, g.const(w.outlier_idx.numpy().astype(np.int64), f"{hint}_oidx")], axis=1)
        y = g.op("Add", [y, g.op("MatMul", [xo, g.const(w.outlier_weight.numpy(), f"{hint}_ow")])])
    if w.bias is not None:
        y = g.op("Add", [y, g.const(w.bias.numpy(), f"{hint}_b")])
    return y


def _rms_norm(g: _Graph, x: str, w: torch.Tensor, eps: float) -> str:
    ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(np.array(eps, dtype=np.float32), "eps")])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), g.const(w.float().numpy(), "norm_w")])


def _rope(g: _Graph, x: str, cos: str, sin: str, head_dim: int, split_half: str) -> str:
    """x (rows, heads, d): x * cos + rotate_half(x) * sin; cos/sin are (rows, 1, d)."""
    a, b = g.op("Split", [x, split_half], n_out=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [b]), a], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def build_chunk_graph(lay: "LlamaLayout", quantized: list[dict[str, "W8A8Weights"]], chunk: int) -> Any:
    """The W8A8 chunk graph of a Llama-architecture model as an onnx.ModelProto."""
    onnx, _ = _onnx()
    from onnx import TensorProto

    g = _Graph(onnx)
    h = g.h
    H, KV, d = lay.n_heads, lay.n_kv_heads, lay.head_dim
    G = H // KV
    inputs = [
        h.make_tensor_value_info("input_ids", TensorProto.INT64, [chunk]),
        h.make_tensor_value_info("cos", TensorProto.FLOAT, [chunk, d]),
        h.make_tensor_value_info("sin", TensorProto.FLOAT, [chunk, d]),
        h.make_tensor_value_info("mask", TensorProto.FLOAT, [chunk, "total"]),
        h.make_tensor_value_info("past_keys", TensorProto.FLOAT, [lay.n_layers, KV, "past", d]),
        h.make_tensor_value_info("past_values", TensorProto.FLOAT, [lay.n_layers, KV, "past", d]),
        h.make_tensor_value_info("last", TensorProto.INT64, []),
    ]
    embed = g.const(lay.embed.float().numpy(), "embed")
    x = g.op("Gather", [embed, "input_ids"], axis=0)
    cos = g.op("Unsqueeze", ["cos", g.const(np.array([1], dtype=np.int64), "ax1")])
    sin = g.op("Unsqueeze", ["sin", g.const(np.array([1], dtype=np.int64), "ax1")])
    # the causal mask repeated for the G query heads stacked on each kv head's rows
    mask = g.op("Tile", ["mask", g.const(np.array([G, 1], dtype=np.int64), "tile")])
    split_qkv = g.const(np.array([H * d, KV * d, KV * d], dtype=np.int64), "split_qkv")
    split_half = g.const(np.array([d // 2, d // 2], dtype=np.int64), "split_half")
    shape = lambda *dims: g.const(np.array(dims, dtype=np.int64), "shape")  # noqa: E731
    new_keys, new_values = [], []
    for i, (layer, q8) in enumerate(zip(lay.layers, quantized)):
        hn = _rms_norm(g, x, layer["ln1"], lay.eps)
        qkv = _linear(g, hn, q8["qkv"], f"l{i}_qkv")
        q, k, v = g.op("Split", [qkv, split_qkv], n_out=3, axis=-1)
        q = _rope(g, g.op("Reshape", [q, shape(chunk, H, d)]), cos, sin, d, split_half)
        k = _rope(g, g.op("Reshape", [k, shape(chunk, KV, d)]), cos, sin, d, split_half)
        v = g.op("Reshape", [v, shape(chunk, KV, d)])
        k_t = g.op("Transpose", [k], perm=[1, 0, 2])  # (KV, chunk, d)
        v_t = g.op("Transpose", [v], perm=[1, 0, 2])
        new_keys.append(g.op("Unsqueeze", [k_t, g.const(np.array([0], dtype=np.int64), "ax0")]))
        new_values.append(g.op("Unsqueeze", [v_t, g.const(np.array([0], dtype=np.int64), "ax0")]))
        idx = g.const(np.array(i, dtype=np.int64), "layer")
        keys = g.op("Concat", [g.op("Gather", ["past_keys", idx], axis=0), k_t], axis=1)  # (KV, total, d)
        values = g.op("Concat", [g.op("Gather", ["past_values", idx], axis=0), v_t], axis=1)
        # (chunk, H, d) -> (KV, G * chunk, d): the query heads of one kv head stacked on rows
        qg = g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [q, shape(chunk, KV, G, d)])], perm=[1, 2, 0, 3]),
                              shape(KV, G * chunk, d)])
        scores = g.op("MatMul", [qg, g.op("Transpose", [keys], perm=[0, 2, 1])])
        scores = g.op("Add", [g.op("Mul", [scores, g.const(np.array(1.0 / math.sqrt(d), dtype=np.float32), "scale")]), mask])
        a = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), values])  # (KV, G*chunk, d)
        a = g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [a, shape(KV, G, chunk, d)])], perm=[2, 0, 1, 3]),
                             shape(chunk, H * d)])
        x = g.op("Add", [x, _linear(g, a, q8["o"], f"l{i}_o")])
        hn = _rms_norm(g, x, layer["ln2"], lay.eps)
        gu = _linear(g, hn, q8["gate_up"], f"l{i}_gu")
        half = q8["gate_up"].out_features // 2
        gate, up = g.op("Split", [gu, g.const(np.array([half, half], dtype=np.int64), "split_gu")], n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, _linear(g, act, q8["down"], f"l{i}_down")])
    last = g.op("Gather", [x, "last"], axis=0)  # (hidden,)
    last = _rms_norm(g, g.op("Unsqueeze", [last, g.const(np.array([0], dtype=np.int64), "ax0")]), lay.final_norm, lay.eps)
    head = embed if lay.lm_head.data_ptr() == lay.embed.data_ptr() else g.const(lay.lm_head.float().numpy(), "lm_head")
    logits = g.op("Gemm", [last, head], transB=1)
    g.nodes.append(h.make_node("Reshape", [logits, shape(lay.vocab)], ["logits"]))
    g.nodes.append(h.make_node("Concat", new_keys, ["new_keys"], axis=0))
    g.nodes.append(h.make_node("Concat", new_values, ["new_values"], axis=0))
    outputs = [
        h.make_tensor_value_info("logits", TensorProto.FLOAT, [lay.vocab]),
        h.make_tensor_value_info("new_keys", TensorProto.FLOAT, [lay.n_layers, KV, chunk, d]),
        h.make_tensor_value_info("new_values", TensorProto.FLOAT, [lay.n_layers, KV, chunk, d]),
    ]
    if g.weight_bytes > MAX_INLINE_WEIGHTS:
        # (the 1.5B Qwen2.5 with its untied float embedding and output layer is ~3 GiB)
        raise BackendUnavailable(
            f"the ONNX chunk graph holds {g.weight_bytes / 2**30:.1f} GiB of weights, more than one ONNX file "
            f"can hold (2 GiB); external weight files are not implemented"
        )
    graph = h.make_graph(g.nodes, "tandem_prefill_chunk", inputs, outputs, initializer=g.inits)
    # IR version 8 (onnx 1.10+) is read by every onnxruntime this project supports
    return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="tandem", ir_version=8)


class OnnxPrefill:
    """The W8A8 chunk graph in ONNX Runtime (NPU provider when present, else CPU)."""

    name = "onnx"

    def __init__(
        self,
        lm: "LoadedModel",
        *,
        chunk: int = 128,
        n_outliers: int = 16,
        per_channel: bool = True,
        dynamic: bool = True,
        smooth: float = DEFAULT_SMOOTH,
        provider: str | None = None,
        act_absmax: list[dict[str, torch.Tensor]] | None = None,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        onnx, ort = _onnx()
        self.lm, self.chunk = lm, chunk
        self.layout = lay = llama_layout(lm.model)
        if act_absmax is None:
            act_absmax = calibrate(lm.model, calibration_samples(lm.tokenizer))
        quantized = quantize_layers(lay, act_absmax, n_outliers, per_channel, dynamic, smooth)
        model = build_chunk_graph(lay, quantized, chunk)
        data = model.SerializeToString()
        self.model_bytes = len(data)
        from ..packaged import cache_root

        cache = Path(cache_dir) if cache_dir else cache_root() / "onnx"
        cache.mkdir(parents=True, exist_ok=True)
        self.path = cache / f"prefill-{hashlib.sha256(data).hexdigest()[:16]}.onnx"
        if not self.path.exists():
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        providers = choose_providers(ort.get_available_providers(), provider)
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.device = f"onnxruntime {ort.__version__} {self.provider}, chunk {chunk}, {n_outliers} outlier channels"
        self._rotary = lay.rotary

    def _rope(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = torch.arange(n)[None]
        cos, sin = self._rotary(torch.zeros(1, 1, self.layout.head_dim), pos)
        return cos[0].float().numpy(), sin[0].float().numpy()

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> PrefillResult:
        lay, c = self.layout, self.chunk
        n = len(tokens)
        if n == 0:
            raise ValueError("nothing to prefill")
        padded = -(-n // c) * c
        ids = np.zeros(padded, dtype=np.int64)
        ids[:n] = tokens
        cos, sin = self._rope(padded)
        keys = np.zeros((lay.n_layers, lay.n_kv_heads, padded, lay.head_dim), dtype=np.float32)
        values = np.zeros_like(keys)
        pos = np.arange(padded)
        logits = None
        for p0 in range(0, padded, c):
            end = p0 + c
            mask = np.where(pos[None, :end] <= pos[p0:end, None], 0.0, -np.inf).astype(np.float32)
            last = min(n - 1, end - 1) - p0
            logits, k, v = self.session.run(
                None,
                {
                    "input_ids": ids[p0:end], "cos": cos[p0:end], "sin": sin[p0:end], "mask": mask,
                    "past_keys": keys[:, :, :p0], "past_values": values[:, :, :p0], "last": np.array(last, dtype=np.int64),
                },
            )
            keys[:, :, p0:end] = k
            values[:, :, p0:end] = v
        kt, vt = torch.from_numpy(keys[:, :, :n]), torch.from_numpy(values[:, :, :n])
        return PrefillResult(
            logits=torch.from_numpy(np.asarray(logits)).float(),
            keys=[kt[i][None] for i in range(lay.n_layers)],
            values=[vt[i][None] for i in range(lay.n_layers)],
            n_tokens=n,
        )

    def resident_bytes(self) -> int:
        """The serialised graph's size: its initializers are what the session keeps resident."""
        return self.model_bytes


__all__ = ["OnnxPrefill", "build_chunk_graph", "choose_providers", "NPU_PROVIDERS"]
