"""W8A8: int8 weights *and* int8 activations, the form NPUs run, with "shadow" outlier channels.

One linear layer y = x W^T becomes

    y = (s_x * s_w) * (q(x_main) @ Wq^T)  +  x[:, O] @ W[:, O]^T
        `-------- int8 GEMM, int32 acc ---'    `-- float, |O| columns ---'

    O        the input channels whose activations are outliers, found by calibration on sample text
    x_main   x with the channels O zeroed
    q(v)     clamp(round(v / s_x), -127, 127); s_x = max|x_main| over the calibration text / 127,
             one scale per tensor, fixed ahead of time (an NPU graph has no room for a dynamic one),
             or (`dynamic`) one per row, max|row| / 127, measured as the row arrives
    Wq       round(W / s_w) in -Qw..Qw with W[:, O] zeroed; s_w per tensor (or per output
             channel); Qw = 127, or 63 on x86 CPUs without VNNI (below)

A handful of channels in an LLM's hidden states carry values 10-100x larger than the rest; with one
per-tensor scale they would flatten every other channel to a few int8 levels. Taking them out of
the int8 product and computing them in float beside it (mllm-NPU's "shadow outlier execution",
ASPLOS'25) keeps per-tensor scales accurate; it costs a |O|-column float matmul, a few percent.
Because s_x is fixed, a row's result never depends on the other rows: chunked prefill gives the
same numbers as one-shot prefill.

The int8 GEMM has two kernels with the same int32 arithmetic, so they give the same results:

    int_mm   torch._int_mm (int8 x int8 -> int32): fast on CUDA and on CPUs with VNNI/AMX; on an
             AVX2-only CPU torch falls back to a reference loop (~50x slower than fp32 here)
    onednn   oneDNN's u8s8 GEMM (torch.ops.onednn.qlinear_pointwise; activations offset by 128),
             which has AVX2 code: ~2x faster than fp32 on this kind of machine

`pick_kernel("auto")` times both once on a representative shape and keeps the faster.

Why Qw = 63 without VNNI: AVX2's u8 x s8 instruction (vpmaddubsw) adds pairs of products into
int16 and saturates, so u8 codes up to 255 times int8 weights up to 127 can overflow (255*127*2 >
32767) and silently give a wrong sum. With 7-bit weights (255*63*2 < 32767) no pair can overflow
and the GEMM is exact; ONNX Runtime's u8s8 kernels have the same limit. The bit is taken from the
weights rather than the activations because a row of weights is far better behaved than a row of
activations. VNNI, AMX and GPUs accumulate in int32 and keep the full 8 bits.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

KERNELS = ("int_mm", "onednn")
# SmoothQuant strength the prefill backends use by default (see quantize_w8a8). Off: on SmolLM2
# with shadow outliers and per-row activation scales, a = 0.5 lowered the median logit error a
# little but not the next-token agreement with fp32 (0.89 vs 0.93 over 120 Spec-Bench prompts).
DEFAULT_SMOOTH = 0.0


def activation_qmax() -> int:
    """Activation codes lie in -127..127 (u8 1..255 after the offset)."""
    return 127


@functools.cache
def weight_qmax() -> int:
    """127, or 63 on an x86 CPU whose int8 dot product saturates (no VNNI/AMX; see above)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 127
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return 63
    return 127 if any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8")) else 63


# ---------------------------------------------------------------------------------------------
# calibration and quantisation (pure functions of tensors)


def outlier_channels(absmax: torch.Tensor, k: int) -> torch.Tensor:
    """The k input channels with the largest calibrated max|x| (sorted ids; empty when k == 0)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    k = min(k, absmax.numel())
    return torch.sort(torch.topk(absmax.float(), k).indices).values


def symmetric_scale(absmax: float | torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """The step for values within +-absmax on integer levels -qmax..qmax (never zero)."""
    return torch.as_tensor(absmax, dtype=torch.float32).clamp(min=1e-8) / float(qmax)


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """round(x / scale) clamped to [-qmax, qmax], as int8 (scale broadcasts)."""
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8)


@dataclass
class W8A8Weights:
    """One linear layer in W8A8 form (see the module docstring for the maths)."""

    weight_q: torch.Tensor  # (out, in) int8, outlier columns zeroed
    weight_scale: torch.Tensor  # (out,) float: s_w per output channel (all equal when per tensor)
    act_scale: torch.Tensor  # () float: s_x
    act_qmax: int  # activation codes lie in -act_qmax..act_qmax
    outlier_idx: torch.Tensor  # (k,) long
    outlier_weight: torch.Tensor  # (k, out) float: W[:, O]^T
    bias: torch.Tensor | None
    # (in,) what x is multiplied by before quantisation: 0 on the outlier channels, 1 / smoothing
    # factor elsewhere (1 without smoothing)
    in_mult: torch.Tensor
    dynamic: bool = False  # per-row activation scales measured on the fly instead of s_x

    @property
    def in_features(self) -> int:
        return int(self.weight_q.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight_q.shape[0])

    def nbytes(self) -> int:
        tensors = [self.weight_q, self.weight_scale, self.act_scale, self.outlier_idx, self.outlier_weight]
        return sum(t.numel() * t.element_size() for t in tensors + ([self.bias] if self.bias is not None else []))


def quantize_w8a8(
    weight: torch.Tensor,
    act_absmax: torch.Tensor,
    *,
    n_outliers: int,
    bias: torch.Tensor | None = None,
    per_channel: bool = False,
    act_qmax: int | None = None,
    dynamic: bool = False,
    smooth: float = 0.0,
) -> W8A8Weights:
    """Quantise `weight` (out, in) for inputs whose calibrated per-channel max|x| is `act_absmax`.

    `smooth` > 0 migrates range from activations to weights channel by channel (SmoothQuant,
    Xiao et al. 2023): x_j / f_j and W[:, j] * f_j with f_j = max|x_j|^a / max|W[:, j]|^(1 - a),
    exact in float; the division folds into the multiply that already zeroes the outlier channels,
    so it costs nothing at run time."""
    act_qmax = activation_qmax() if act_qmax is None else act_qmax
    w = weight.detach().float()
    idx = outlier_channels(act_absmax, n_outliers)
    keep = torch.ones(w.shape[1], dtype=torch.bool)
    keep[idx] = False
    factor = torch.ones(w.shape[1])
    if smooth > 0:
        a = act_absmax.detach().float().clamp(min=1e-5)
        wmax = w.abs().amax(0).clamp(min=1e-5)
        factor = (a.pow(smooth) / wmax.pow(1.0 - smooth)).clamp(min=1e-3, max=1e3)
        factor[idx] = 1.0
    act_absmax = act_absmax.detach().float() / factor
    w_main = w * keep * factor
    w_qmax = weight_qmax()
    if per_channel:
        w_scale = symmetric_scale(w_main.abs().amax(dim=1), w_qmax)
    else:
        w_scale = symmetric_scale(w_main.abs().max(), w_qmax).expand(w.shape[0]).clone()
    return W8A8Weights(
        weight_q=quantize_symmetric(w_main, w_scale[:, None], w_qmax),
        weight_scale=w_scale,
        act_scale=symmetric_scale(act_absmax[keep].max() if keep.any() else torch.tensor(1.0), act_qmax),
        act_qmax=act_qmax,
        dynamic=dynamic,
        outlier_idx=idx,
        outlier_weight=w[:, idx].t().contiguous(),
        bias=None if bias is None else bias.detach().float().clone(),
        in_mult=keep.float() / factor,
    )


# ---------------------------------------------------------------------------------------------
# kernels


@dataclass
class PackedW8A8:
    """A W8A8 layer laid out for one kernel: the tensors the chunk graph takes as inputs."""

    inv_act_scale: torch.Tensor  # () 1 / s_x
    keep: torch.Tensor  # (in,) 0.0 for the outlier channels, 1 / smoothing factor for the others
    packed: torch.Tensor  # the kernel's weight layout
    out_scale: torch.Tensor  # (out,) s_x * s_w
    outlier_idx: torch.Tensor
    outlier_weight: torch.Tensor
    bias: torch.Tensor | None
    act_qmax: int = 127
    dynamic: bool = False
    nbytes: int = 0


def pack(w: W8A8Weights, kernel: str, *, rows: int = 128) -> PackedW8A8:
    """Lay `w` out for `kernel` ("int_mm" or "onednn"); `rows` is the expected batch of rows."""
    keep = w.in_mult
    if kernel == "int_mm":
        packed = w.weight_q.t().contiguous()  # (in, out)
    elif kernel == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(w.weight_q.contiguous(), [rows, w.in_features])
    else:
        raise ValueError(f"unknown int8 kernel '{kernel}' (known: {', '.join(KERNELS)})")
    return PackedW8A8(
        inv_act_scale=(1.0 / w.act_scale).reshape(()),
        keep=keep,
        packed=packed,
        out_scale=(w.weight_scale if w.dynamic else w.act_scale * w.weight_scale).float().contiguous(),
        outlier_idx=w.outlier_idx,
        outlier_weight=w.outlier_weight,
        bias=w.bias,
        act_qmax=w.act_qmax,
        dynamic=w.dynamic,
        nbytes=w.nbytes(),
    )


_ZERO_POINTS: dict[int, torch.Tensor] = {}


@torch.library.custom_op("tandem::onednn_u8s8_mm", mutates_args=())
def _onednn_u8s8_mm(xq: torch.Tensor, packed: torch.Tensor, out_scale: torch.Tensor, zero_point: int) -> torch.Tensor:
    """(xq - zero_point) @ Wq^T * out_scale, xq uint8 (m, in), through oneDNN's u8s8 GEMM.

    An opaque op for torch.compile: inductor fuses the quantisation before it and the float
    epilogue after it, and calls oneDNN with the pre-packed weight in between."""
    n = out_scale.shape[0]
    zp = _ZERO_POINTS.get(n)
    if zp is None:
        zp = _ZERO_POINTS[n] = torch.zeros(n, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        xq, 1.0, zero_point, packed, out_scale, zp, None, 1.0, 0, torch.float32, "none", [], ""
    )


@_onednn_u8s8_mm.register_fake
def _(xq: torch.Tensor, packed: torch.Tensor, out_scale: torch.Tensor, zero_point: int) -> torch.Tensor:
    return xq.new_empty((xq.shape[0], out_scale.shape[0]), dtype=torch.float32)


def w8a8_linear(x: torch.Tensor, p: PackedW8A8, kernel: str) -> torch.Tensor:
    """y = x W^T in W8A8 with shadow outliers; x is (m, in) float."""
    return w8a8_apply(
        x, p.inv_act_scale, p.keep, p.packed, p.out_scale, p.outlier_idx, p.outlier_weight, p.bias, p.act_qmax,
        p.dynamic, kernel,
    )


def w8a8_apply(x, inv_act_scale, keep, packed, out_scale, outlier_idx, outlier_weight, bias, qmax: int, dynamic: bool,
               kernel: str):
    """`w8a8_linear` on the packed tensors themselves (the form a compiled graph takes)."""
    xm = x * keep
    if dynamic:
        row_scale = xm.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
        q = torch.round(xm / row_scale)
    else:
        q = torch.clamp(torch.round(xm * inv_act_scale), -qmax, qmax)
    if kernel == "onednn":
        y = _onednn_u8s8_mm((q + (qmax + 1)).to(torch.uint8), packed, out_scale, qmax + 1)
    else:
        y = torch._int_mm(q.to(torch.int8), packed).float() * out_scale
    if dynamic:
        y = y * row_scale
    if outlier_idx.numel():
        # the shadow path: the outlier channels, in float, beside the int8 product
        y = y + x.index_select(-1, outlier_idx) @ outlier_weight
    if bias is not None:
        y = y + bias
    return y


@functools.cache
def pick_kernel(kernel: str = "auto", rows: int = 128, in_features: int = 576, out_features: int = 1536) -> str:
    """`kernel` itself, or for "auto" the faster of the two on this machine (timed once per process)."""
    if kernel != "auto":
        if kernel not in KERNELS:
            raise ValueError(f"unknown int8 kernel '{kernel}' (known: auto, {', '.join(KERNELS)})")
        return kernel
    gen = torch.Generator().manual_seed(0)
    w = quantize_w8a8(
        torch.randn(out_features, in_features, generator=gen), torch.ones(in_features), n_outliers=0
    )
    x = torch.randn(rows, in_features, generator=gen)
    best, best_t = "onednn", float("inf")
    times = KERNEL_TIMES.setdefault((rows, in_features, out_features), {})
    for name in KERNELS:
        try:
            p = pack(w, name, rows=rows)
            w8a8_linear(x, p, name)
        except (RuntimeError, NotImplementedError, AttributeError):
            times[name] = None
            continue  # a torch build without this kernel
        t0 = time.perf_counter()
        n = 0
        while n < 1 or (time.perf_counter() < t0 + 0.3 and n < 20):
            w8a8_linear(x, p, name)
            n += 1
        t = (time.perf_counter() - t0) / n
        times[name] = t
        if t < best_t:
            best, best_t = name, t
    return best


class W8A8Linear(torch.nn.Module):
    """An nn.Linear computed in W8A8 with per-row activation scales and no outlier channels: the
    form of a gateway target (`NAME:w8a8`). Each row is quantised on its own (max|row| / 127) and
    the int8 products are summed exactly in int32, so a row's result is the same bits whatever
    else shares the pass: batch-invariant by construction, and the probe (`invariant.py`)
    confirms it on this machine's kernel. Inputs keep their leading dimensions."""

    def __init__(self, w: W8A8Weights, kernel: str) -> None:
        super().__init__()
        self.kernel = kernel
        self.packed = pack(w, kernel, rows=8)
        self.in_features, self.out_features = w.in_features, w.out_features

    @staticmethod
    def quantize(linear: torch.nn.Linear) -> W8A8Weights:
        """The weights of `linear` in this layer's form: per output channel, per-row activations."""
        return quantize_w8a8(linear.weight, torch.ones(linear.in_features), n_outliers=0, bias=linear.bias,
                             per_channel=True, dynamic=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w8a8_linear(x.reshape(-1, self.in_features).float(), self.packed, self.kernel)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8A8 per-row, {self.kernel}"


def w8a8_rule(x: torch.Tensor, layer: W8A8Linear, _bias=None) -> torch.Tensor:
    """A W8A8Linear as `probe_linear` calls a rule (x, weight, bias)."""
    return layer(x)


def quantize_model_w8a8(model: torch.nn.Module, kernel: str = "auto", *, collect: dict | None = None,
                        prefix: str = "") -> torch.nn.Module:
    """Every nn.Linear of `model` (in place, the float weight released as it goes) as a
    W8A8Linear on `kernel` (auto: the faster int8 GEMM here, per shape); returns the model.
    `collect`, if given, receives {module name: (W8A8Weights, kernel)}, what a saved copy needs."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear):
            k = pick_kernel(kernel, 8, child.in_features, child.out_features)
            w = W8A8Linear.quantize(child)
            if collect is not None:
                collect[prefix + name] = (w, k)
            setattr(model, name, W8A8Linear(w, k))
        else:
            quantize_model_w8a8(child, kernel, collect=collect, prefix=f"{prefix}{name}.")
    return model


# (rows, in_features, out_features) -> seconds per call of each int8 kernel `pick_kernel("auto")`
# timed on that shape (None: unavailable in this torch build)
KERNEL_TIMES: dict[tuple[int, int, int], dict[str, float | None]] = {}


def kernel_report(rows: int = 128, in_features: int = 576, out_features: int = 1536) -> dict:
    """Which int8 GEMM "auto" chose on this shape and why: the times it measured, by name. A
    backend passes the shape it was built for (its chunk, the model's hidden and MLP widths)."""
    chosen = pick_kernel("auto", rows, in_features, out_features)
    times = {k: None if v is None else round(v * 1000, 3) for k, v in KERNEL_TIMES[(rows, in_features, out_features)].items()}
    others = {k: v for k, v in times.items() if k != chosen and v is not None}
    why = f"{chosen} took {times.get(chosen)} ms on a {rows}x{in_features}x{out_features} int8 GEMM" + (
        "; " + ", ".join(f"{k} {v} ms" for k, v in others.items()) if others else "; no other kernel runs here")
    return {"chosen": chosen, "shape": [rows, in_features, out_features], "ms": times, "why": why}


__all__ = [
    "W8A8Weights",
    "W8A8Linear",
    "PackedW8A8",
    "quantize_model_w8a8",
    "w8a8_rule",
    "quantize_w8a8",
    "pack",
    "w8a8_linear",
    "w8a8_apply",
    "pick_kernel",
    "kernel_report",
    "outlier_channels",
    "symmetric_scale",
    "quantize_symmetric",
    "KERNELS",
    "activation_qmax",
    "weight_qmax",
]
