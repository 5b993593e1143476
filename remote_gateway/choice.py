"""Which exact target runs a model fastest on this machine (`NAME@auto`, the default): chosen at
load from measurement, as the int8 kernel is.

A verifier scores a block of drafted tokens in one pass, so the target that serves speculation
best is the one whose block is nearly as cheap as one step, with rows that are the same bits
whatever the block (no near-tie recomputation). The candidates:

    w8a8        int8 weights and per-row int8 activations on oneDNN/`_int_mm`
                (quant_w8a8.W8A8Linear): memory-bound where the CPU multiplies int8 in int32
                (VNNI, AMX), a block of 8 ~1.2 steps; exact by construction (int32 sums)
    llama.cpp   the GGUF as shipped, one token per micro-batch (`n_ubatch` 1, the price of exact
                rows): a block of k costs k steps, but it loads in seconds and needs no VNNI

The measurement is the int8 GEMM itself on the 1.5B's MLP shape (1536 x 8960), for 1 and for 8
rows, with the probe that its rows agree bit for bit. w8a8 is chosen when it is exact and a block
of 8 costs at most `MAX_BLOCK_RATIO` one-row products; llama.cpp otherwise. The choice, the
figures and the reason are in `/v1/info` (`target`) and in the bench JSON.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field

MAX_BLOCK_RATIO = 1.3  # a block of 8 rows may cost at most this many single rows
SHAPE = (1536, 8960)  # the MLP up-projection of the default target


@dataclass(frozen=True)
class TargetChoice:
    model: str  # the resolved target: NAME:w8a8 or NAME@llama.cpp
    engine: str  # "w8a8" or "llama.cpp"
    why: str
    measured: dict = field(default_factory=dict)  # ms per int8 GEMM by row count, exactness

    def to_dict(self) -> dict:
        return asdict(self)


def rule(base: str, measured: dict) -> TargetChoice:
    """The choice for model `base` given the int8 GEMM's measurement (pure: tested apart).
    `measured`: {"available": bool, "exact": bool, "ms": {"1": t1, "8": t8}, "int8_dot": bool,
    "reason": why unavailable}."""
    if not measured.get("available"):
        why = f"no W8A8 target here ({measured.get('reason', 'int8 GEMM unavailable')}): llama.cpp"
        return TargetChoice(f"{base}@llama.cpp", "llama.cpp", why, measured)
    ms = measured["ms"]
    ratio = ms["8"] / ms["1"]
    figures = f"int8 GEMM {SHAPE[0]}x{SHAPE[1]}: {ms['1']:.2f} ms for 1 row, {ms['8']:.2f} ms for 8 ({ratio:.2f}x)"
    if not measured.get("int8_dot"):
        return TargetChoice(f"{base}@llama.cpp", "llama.cpp",
                            f"{figures}; no int8 dot product (VNNI/AMX), weights held to 7 bits: llama.cpp", measured)
    if not measured.get("exact"):
        return TargetChoice(f"{base}@llama.cpp", "llama.cpp", f"{figures}; rows depend on the batch: llama.cpp", measured)
    if ratio > MAX_BLOCK_RATIO:
        return TargetChoice(f"{base}@llama.cpp", "llama.cpp",
                            f"{figures}: a block costs over {MAX_BLOCK_RATIO}x a step, compute-bound: llama.cpp", measured)
    return TargetChoice(f"{base}:w8a8", "w8a8",
                        f"{figures}, rows exact: a block of 8 costs ~a step, W8A8 verifies for nearly free", measured)


@functools.cache
def measure() -> dict:
    """Time the int8 GEMM (the kernel W8A8 layers pick) for 1 and 8 rows on `SHAPE`, probe its
    exactness; once per process."""
    import torch

    from ..local_runtime.invariant import probe_linear
    from ..local_runtime.quant_w8a8 import W8A8Linear, pick_kernel, w8a8_rule, weight_qmax

    n_in, n_out = SHAPE
    out: dict = {"int8_dot": weight_qmax() == 127}
    try:
        kernel = pick_kernel("auto", 8, n_in, n_out)
        gen = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(n_in, n_out, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.02)
        layer = W8A8Linear(W8A8Linear.quantize(linear), kernel)
        ms = {}
        with torch.inference_mode():
            for rows in (1, 8):
                x = torch.randn(rows, n_in, generator=gen)
                layer(x)
                t0, n = time.perf_counter(), 0
                while n < 5 or (time.perf_counter() - t0 < 0.2 and n < 200):
                    layer(x)
                    n += 1
                ms[str(rows)] = round((time.perf_counter() - t0) / n * 1000, 3)
            exact = probe_linear(torch.empty(n_out, n_in), None, rows=(1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 32),
                                 linear=lambda x, _w, _b: w8a8_rule(x, layer)) is None
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        return {**out, "available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {**out, "available": True, "kernel": kernel, "ms": ms, "exact": exact}


def resolve_target(model: str) -> tuple[str, TargetChoice | None]:
    """`NAME@auto` -> the exact target chosen for this machine, and why; any other name as is."""
    base, at, suffix = model.rpartition("@")
    if not at or suffix != "auto":
        return model, None
    choice = rule(base, measure())
    return choice.model, choice


__all__ = ["TargetChoice", "rule", "measure", "resolve_target", "MAX_BLOCK_RATIO"]
