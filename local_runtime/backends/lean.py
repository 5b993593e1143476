"""`torch-int8`: a lean torch decode loop, int8 weights and a static, position-indexed KV cache.

No transformers call on the hot path: the model's layers run as the same pure functions the
chunked prefill uses (`prefill.pre_attention` / `post_attention`), over int8 weights with one
scale per output channel, the linear layers that share an input stacked into one (q|k|v,
gate|up), and the lm_head in int8 too (the biggest single matrix of a small model). The cache is
two preallocated tensors (layers, kv_heads, capacity, head_dim); a token's keys/values are
written at its position, so `truncate(pos)` only moves the position. A quarter of the float
model's weight memory.

Speed: on CPUs whose torch has no int8 GEMV kernel (AVX2: `_weight_int8pack_mm` and `_int_mm`
are slower than fp32 there) each step dequantises the weights it reads, so decode runs at about
float speed; the memory saving is what this backend buys on such machines. llama.cpp is the
fast drafter there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..draft import DEFAULT_TIE_MARGIN
from ..prefill import (
    LINEAR_GROUPS,
    cat_linear,
    post_attention,
    pre_attention,
    attend,
    llama_layout,
    rms_norm,
)
from ..sequence import Sequence
from .base import tensor_bytes

if TYPE_CHECKING:
    from ..loaded import LoadedModel


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _wo8_linear(x: torch.Tensor, p: tuple) -> torch.Tensor:
    w, scale, bias = p
    y = F.linear(x, w.to(x.dtype)) * scale
    return y if bias is None else y + bias


class StaticInt8Model:
    """A LoadedModel's weights in int8, laid out for the lean loop; `new_engine()` per sequence."""

    def __init__(self, lm: "LoadedModel", *, capacity: int = 1024) -> None:
        self.lm = lm
        self.name = f"{lm.name}@torch-int8"
        self.tokenizer = lm.tokenizer
        self.source = lm.source
        self.capacity = capacity
        self.tie_margin = DEFAULT_TIE_MARGIN
        self.layout = lay = llama_layout(lm.model)
        self.layers: list[dict[str, Any]] = []
        with torch.no_grad():
            for layer in lay.layers:
                p: dict[str, Any] = {"ln1": layer["ln1"].float(), "ln2": layer["ln2"].float()}
                for name, parts in LINEAR_GROUPS.items():
                    w, b = cat_linear([layer[m] for m in parts])
                    q, s = _int8_rows(w)
                    p[name] = (q, s, b)
                self.layers.append(p)
            self.head = _int8_rows(lay.lm_head.float())
        self.embed = lay.embed

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab

    def resident_bytes(self) -> int:
        tensors = [self.embed, self.layout.final_norm, *self.head]
        for p in self.layers:
            tensors += [p["ln1"], p["ln2"]] + [t for name in LINEAR_GROUPS for t in p[name] if t is not None]
        return tensor_bytes(tensors)

    def new_engine(self, *, tie_margin: float | None = None) -> "StaticInt8Engine":
        return StaticInt8Engine(self, tie_margin=self.tie_margin if tie_margin is None else tie_margin)


class StaticInt8Engine(Sequence):
    """The `DraftingEngine` interface over a `StaticInt8Model`: a static cache written by position,
    so cropping it is only moving the position."""

    def __init__(self, model: StaticInt8Model, *, tie_margin: float) -> None:
        super().__init__(model, tie_margin=tie_margin)
        lay = model.layout
        self._keys = torch.zeros(lay.n_layers, lay.n_kv_heads, model.capacity, lay.head_dim)
        self._values = torch.zeros_like(self._keys)
        self._cos = self._sin = torch.zeros(0)
        self._scale = 1.0 / math.sqrt(lay.head_dim)

    def _crop(self, pos: int) -> bool:
        return True  # positions past `cached` are overwritten when next computed

    def _ensure(self, n: int) -> None:
        if n > self._keys.shape[2]:
            grow = max(n, 2 * self._keys.shape[2])
            pad = grow - self._keys.shape[2]
            self._keys = F.pad(self._keys, (0, 0, 0, pad))
            self._values = F.pad(self._values, (0, 0, 0, pad))
        if self._cos.shape[0] < n:
            size = max(n, 2 * self._cos.shape[0], 1024)
            cos, sin = self.lm.layout.rotary(torch.zeros(1, 1, self.lm.layout.head_dim), torch.arange(size)[None])
            self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()

    @torch.inference_mode()
    def _forward(self, start: int, upto: int) -> torch.Tensor:
        """Rows start..upto-1 through the model over the cache; the last row's logits."""
        lay, m = self.lm.layout, self.lm
        self._ensure(upto)
        ids = torch.tensor(self.tokens[start:upto])
        x = F.embedding(ids, m.embed).float()
        pos = torch.arange(upto)
        mask = pos[None, :] <= pos[start:upto, None]
        cos, sin = self._cos[start:upto], self._sin[start:upto]
        for i, p in enumerate(m.layers):
            q, k, v = pre_attention(_wo8_linear, x, p["ln1"], p["qkv"], cos, sin, lay.eps, lay.n_heads, lay.n_kv_heads, lay.head_dim)
            self._keys[i, :, start:upto] = k.transpose(0, 1)
            self._values[i, :, start:upto] = v.transpose(0, 1)
            a = attend(q, self._keys[i, :, :upto], self._values[i, :, :upto], mask, self._scale)
            x = post_attention(_wo8_linear, x, a, p["o"], p["ln2"], p["gate_up"], p["down"], lay.eps)
        return _wo8_linear(rms_norm(x[-1:], lay.final_norm, lay.eps), (*m.head, None))[0]


__all__ = ["StaticInt8Model", "StaticInt8Engine"]
