"""Prefill backends in torch: `cpu-int8` (W8A8 chunks, compiled) and `reference-fp32`.

    cpu-int8         ChunkedPrefill in W8A8 with calibrated per-tensor activation scales and shadow
                     outlier channels; the per-layer chunk graphs compiled once (torch.compile)
    reference-fp32   the model's own float forward over the whole prompt (output layer on the last
                     position only), as the Engine runs it:
                     what every other backend's logits are compared against
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..prefill import ChunkedPrefill, PrefillResult, calibrate
from ..prefill_calibration import calibration_samples
from ..quant_w8a8 import DEFAULT_SMOOTH
from ..saved import remembered
from .base import tensor_bytes

if TYPE_CHECKING:
    from ..loaded import LoadedModel

DEFAULT_CHUNK = 128
DEFAULT_OUTLIERS = 16


class CpuInt8Prefill:
    """W8A8 chunked prefill on the CPU (the int8 GEMM picked by `quant_w8a8.pick_kernel`)."""

    name = "cpu-int8"

    def __init__(
        self,
        lm: "LoadedModel",
        *,
        chunk: int = DEFAULT_CHUNK,
        n_outliers: int = DEFAULT_OUTLIERS,
        per_channel: bool = True,
        dynamic: bool = True,
        smooth: float = DEFAULT_SMOOTH,
        kernel: str = "auto",
        compile: bool = True,
        act_absmax: list[dict[str, torch.Tensor]] | None = None,
        float_groups: tuple[str, ...] = (),
        float_layers: tuple[int, ...] = (),
    ) -> None:
        self.lm = lm
        if act_absmax is None:
            samples = calibration_samples(lm.tokenizer)
            # measured once per weights file and machine (saved.py): ~11 s for the 0.5B model
            act_absmax = remembered("calibration", Path(lm.source), lambda: calibrate(lm.model, samples),
                                    hashlib.sha256(repr(samples).encode()).hexdigest())
        self.act_absmax = act_absmax
        self.runner = ChunkedPrefill(
            lm.model, mode="w8a8", chunk=chunk, act_absmax=act_absmax, n_outliers=n_outliers,
            per_channel=per_channel, dynamic=dynamic, smooth=smooth, kernel=kernel, compile=compile,
            float_groups=float_groups, float_layers=float_layers,
        )
        self.chunk = chunk
        self.device = f"torch cpu, int8 GEMM via {self.runner.kernel}, chunk {chunk}, {n_outliers} outlier channels"
        if float_groups:
            self.device += f", groups {'/'.join(float_groups)} in float"
        if float_layers:
            self.device += f", layers {list(float_layers)} in float"

    def prefill(self, tokens: list[int]) -> PrefillResult:
        return self.runner.run(tokens)

    def resident_bytes(self) -> int:
        return self.runner.weight_bytes


class ReferencePrefill:
    """The plain float path: one forward of the transformers model over the whole prompt."""

    name = "reference-fp32"

    def __init__(self, lm: "LoadedModel") -> None:
        self.lm = lm
        self.device = "torch cpu, float32, one forward (transformers)"

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> PrefillResult:
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.lm.model(
            input_ids=torch.tensor([list(tokens)]), cache=cache, use_cache=True, logits_to_keep=1
        )
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return PrefillResult(logits=out.logits[0, -1].float(), keys=keys, values=values, n_tokens=len(tokens))

    def resident_bytes(self) -> int:
        return tensor_bytes(list(self.lm.model.parameters()) + list(self.lm.model.buffers()))


def build(lm: "LoadedModel", **options: Any) -> CpuInt8Prefill:
    return CpuInt8Prefill(lm, **options)


__all__ = ["CpuInt8Prefill", "ReferencePrefill", "DEFAULT_CHUNK", "DEFAULT_OUTLIERS"]
