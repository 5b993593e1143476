"""Weight-only int8: each linear layer's weight as int8 with one float scale per output channel.

    W[o, :] ~= scale[o] * Wq[o, :],   scale[o] = max|W[o, :]| / 127,   Wq = round(W / scale)

The activations stay float. A quarter of the memory of fp32, and on CPUs with the fused kernel
(`aten._weight_int8pack_mm`) the matmul reads int8 straight from memory. The int8 model is a
slightly different model, which is exactly what a drafter may be: the target still decides.
"""

from __future__ import annotations

import torch
from torch import nn


def _has_int8pack_mm() -> bool:
    try:
        w = torch.zeros(8, 32, dtype=torch.int8)
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 32), w, torch.ones(8))
        return True
    except (RuntimeError, AttributeError):
        return False


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._fused = _FUSED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._fused:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        else:
            y = (x2 @ self.weight_int8.t().to(x2.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, fused={self._fused}"


_FUSED = _has_int8pack_mm()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` (in place) by an Int8Linear; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model


__all__ = ["Int8Linear", "quantize_int8"]
