"""`torch-int8`: a lean torch decode loop, int8 weights and a static, position-indexed KV cache.

No transformers call on the hot path: the model's layers run as the same pure functions the
chunked prefill uses (`prefill._pre_attention` / `_post_attention`), over int8 weights with one
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
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..prefill import LINEAR_GROUPS, _cat_linear, _post_attention, _pre_attention, attend, llama_layout, rms_norm
from .base import tensor_bytes

if TYPE_CHECKING:
    from ..engine import Draft
    from ..models import LoadedModel


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
        self.layout = lay = llama_layout(lm.model)
        self.layers: list[dict[str, Any]] = []
        with torch.no_grad():
            for layer in lay.layers:
                p: dict[str, Any] = {"ln1": layer["ln1"].float(), "ln2": layer["ln2"].float()}
                for name, parts in LINEAR_GROUPS.items():
                    w, b = _cat_linear([layer[m] for m in parts])
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
        from ..engine import DEFAULT_TIE_MARGIN

        return StaticInt8Engine(self, tie_margin=DEFAULT_TIE_MARGIN if tie_margin is None else tie_margin)


class StaticInt8Engine:
    """The `DraftingEngine` interface over a `StaticInt8Model`."""

    def __init__(self, model: StaticInt8Model, *, tie_margin: float) -> None:
        self.lm = model
        self.tie_margin = tie_margin
        lay = model.layout
        self.tokens: list[int] = []
        self.cached = 0
        self.forward_passes = 0
        self.tie_recomputes = 0
        self._keys = torch.zeros(lay.n_layers, lay.n_kv_heads, model.capacity, lay.head_dim)
        self._values = torch.zeros_like(self._keys)
        self._cos = self._sin = torch.zeros(0)
        self._scale = 1.0 / math.sqrt(lay.head_dim)

    # -- the cache ---------------------------------------------------------------------------

    def reset(self) -> None:
        self.tokens, self.cached = [], 0

    def append(self, tokens: list[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def truncate(self, pos: int) -> None:
        if pos < 0 or pos > len(self.tokens):
            raise ValueError(f"cannot truncate a sequence of {len(self.tokens)} tokens to {pos}")
        del self.tokens[pos:]
        self.cached = min(self.cached, pos)

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
            q, k, v = _pre_attention(_wo8_linear, x, p["ln1"], p["qkv"], cos, sin, lay.eps, lay.n_heads, lay.n_kv_heads, lay.head_dim)
            self._keys[i, :, start:upto] = k.transpose(0, 1)
            self._values[i, :, start:upto] = v.transpose(0, 1)
            a = attend(q, self._keys[i, :, :upto], self._values[i, :, :upto], mask, self._scale)
            x = _post_attention(_wo8_linear, x, a, p["o"], p["ln2"], p["gate_up"], p["down"], lay.eps)
        self.forward_passes += 1
        return _wo8_linear(rms_norm(x[-1:], lay.final_norm, lay.eps), (*m.head, None))[0]

    def next_logits(self) -> torch.Tensor:
        if not self.tokens:
            raise RuntimeError("nothing to compute: the sequence is empty")
        start = min(self.cached, len(self.tokens) - 1)
        logits = self._forward(start, len(self.tokens))
        self.cached = len(self.tokens)
        return logits

    def fresh_logits(self, prefix_len: int) -> torch.Tensor:
        """Logits after tokens[:prefix_len] recomputed from position 0 in one block (canonical)."""
        logits = self._forward(0, prefix_len)
        self.cached = prefix_len
        return logits

    # -- entry points --------------------------------------------------------------------------

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        self.reset()
        self.append(prompt)
        return self.next_logits()

    def step(self, token: int) -> torch.Tensor:
        self.append([token])
        return self.next_logits()

    def greedy_token(self, logits: torch.Tensor, prefix_len: int) -> int:
        from ..sampling import top2_margin

        if top2_margin(logits) >= self.tie_margin:
            return int(torch.argmax(logits))
        self.tie_recomputes += 1
        return int(torch.argmax(self.fresh_logits(prefix_len)))

    def draft(self, k: int, *, temperature: float = 0.0, top_p: float = 1.0, generator: Any = None,
              support: int | None = None) -> "Draft":
        from ..engine import Draft
        from ..sampling import DEFAULT_DRAFT_SUPPORT, logits_to_probs, sample_sparse, truncate_support

        t0 = time.perf_counter()
        out = Draft(tokens=[], probs=[], dists=[] if temperature > 0 else None)
        if k == 0:
            return out
        logits = self.next_logits()
        for i in range(k):
            if temperature > 0:
                ids, probs = truncate_support(logits_to_probs(logits, temperature, top_p), support or DEFAULT_DRAFT_SUPPORT)
                tok = sample_sparse(ids, probs, generator)
                q = float(probs[(ids == tok).nonzero()[0, 0]])
                out.dists.append((ids.tolist(), probs.tolist()))
            else:
                tok = int(torch.argmax(logits))
                q = float(torch.softmax(logits.double(), -1)[tok])
            out.tokens.append(tok)
            out.probs.append(q)
            self.tokens.append(tok)
            if i < k - 1:
                logits = self.next_logits()
        out.seconds = time.perf_counter() - t0
        return out


__all__ = ["StaticInt8Model", "StaticInt8Engine"]
