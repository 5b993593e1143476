"""Weight-only int8: each linear layer's weight as int8 with one float scale per output channel.

    W[o, :] ~= scale[o] * Wq[o, :],   scale[o] = max|W[o, :]| / 127,   Wq = round(W / scale)

The activations stay float. A quarter of the memory of fp32 for the weights. Each call
dequantises the weight before a float matmul: on CPUs without an int8 GEMV kernel (AVX2 machines:
torch's fused `_weight_int8pack_mm` measured 4-40x slower than fp32 there) that is the fastest
exact form, and it costs decode speed, not accuracy. The int8 model is a slightly different
model, which is exactly what a drafter may be: the target still decides.
"""

from __future__ import annotations

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scale the (small) output rather than the (large) weight: one multiply per output
        y = torch.nn.functional.linear(x, self.weight_int8.to(x.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` (in place) by an Int8Linear; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model


__all__ = ["Int8Linear", "quantize_int8"]
