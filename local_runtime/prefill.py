"""Chunked prefill: the prompt in fixed-length chunks, so one compiled graph serves every chunk.

An NPU (and an ahead-of-time compiler) wants static shapes; a prompt has any length. So the
prompt is cut into chunks of `chunk` tokens (the last one padded) and each chunk runs the same
per-layer graphs, attending to the keys/values that earlier chunks left in the cache:

    for each chunk c = tokens[p : p + chunk]:
        x = embed(c)
        for each layer:
            q, k, v = pre_attention(x)           compiled once: (chunk, hidden) in, fixed shapes
            cache[layer][p : p + chunk] = k, v
            a = attend(q, cache[layer][: p + chunk], causal mask)     (keys grow chunk by chunk)
            x = post_attention(x, a)             compiled once
    logits = lm_head(norm(x[last real row]))     one row: the only one prefill needs

The per-layer graphs take the layer's weights as inputs, so the same two compiled graphs run
all layers and all chunks; padded rows sit after every real token, so causality keeps them out
of every real row. Linear layers run in float ("float") or W8A8 with shadow outliers ("w8a8",
see `quant_w8a8`). Llama-architecture models only (Llama, Mistral without a sliding window,
Qwen2); others raise `UnsupportedModel`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..protocols.errors import UnsupportedModel
from .quant_w8a8 import W8A8Weights, pack, pick_kernel, quantize_w8a8, w8a8_apply

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
CHUNK_RANGE = (16, 1024)


@dataclass
class PrefillResult:
    """What a prefill leaves behind: the next-token logits and the prompt's keys/values."""

    logits: torch.Tensor  # (vocab,) float32, after the last prompt token
    keys: list[torch.Tensor]  # per layer (1, kv_heads, n, head_dim)
    values: list[torch.Tensor]
    n_tokens: int

    def to_cache(self):
        """The keys/values as a transformers DynamicCache, to continue decoding with the model."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)))


@runtime_checkable
class PrefillBackend(Protocol):
    """A device backend's prefill: prompt in, a `PrefillResult` out; what an accelerator runs
    (fixed-shape chunks, int8, compiled once). The torch engine takes one (engine.py)."""

    name: str
    # what actually runs it, e.g. "onnxruntime CPUExecutionProvider" or "torch cpu, oneDNN u8s8"
    device: str

    def prefill(self, tokens: list[int]) -> PrefillResult: ...

    def resident_bytes(self) -> int: ...


# ---------------------------------------------------------------------------------------------
# the model's layout


@dataclass
class LlamaLayout:
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    vocab: int
    embed: torch.Tensor  # (vocab, hidden)
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # (vocab, hidden)
    rotary: Any  # the model's rotary embedding module: (x, position_ids) -> cos, sin
    layers: list[dict[str, Any]]  # per layer: the norms and the nn.Linear modules


def llama_layout(model: Any) -> LlamaLayout:
    """Read a transformers Llama-architecture model's weights (no copies)."""
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise UnsupportedModel(
            f"chunked prefill implements the Llama architecture ({', '.join(SUPPORTED_TYPES)}); "
            f"this model is '{mtype}'"
        )
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and mtype != "llama":
        raise UnsupportedModel(f"'{mtype}' with a sliding attention window is not supported by chunked prefill")
    inner = model.model
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            {
                "ln1": layer.input_layernorm.weight.detach(),
                "ln2": layer.post_attention_layernorm.weight.detach(),
                "q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj,
            }
        )
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return LlamaLayout(
        hidden=cfg.hidden_size,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        eps=float(cfg.rms_norm_eps),
        vocab=cfg.vocab_size,
        embed=inner.embed_tokens.weight.detach(),
        final_norm=inner.norm.weight.detach(),
        lm_head=model.lm_head.weight.detach(),
        rotary=inner.rotary_emb,
        layers=layers,
    )


# the linear layers that share an input run as one: their weights stacked on the output axis
LINEAR_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def quantize_layers(
    lay: "LlamaLayout", act_absmax: list[dict[str, torch.Tensor]], n_outliers: int, per_channel: bool,
    dynamic: bool = False,
    smooth: float = 0.0,
) -> list[dict[str, W8A8Weights]]:
    """Every layer's linear groups in W8A8, with `n_outliers` shadow channels per input
    (twice as many for the MLP's wide down-projection input)."""
    out = []
    for i, layer in enumerate(lay.layers):
        q = {}
        for name, parts in LINEAR_GROUPS.items():
            w, b = cat_linear([layer[m] for m in parts])
            k = n_outliers * (2 if name == "down" else 1)
            q[name] = quantize_w8a8(
                w, act_absmax[i][name], n_outliers=k, bias=b, per_channel=per_channel, dynamic=dynamic,
                smooth=smooth,
            )
        out.append(q)
    return out


def cat_linear(mods: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.weight.detach().float() for m in mods], 0)
    if all(m.bias is None for m in mods):
        return w, None
    return w, torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features) for m in mods])


# ---------------------------------------------------------------------------------------------
# the per-layer graphs (pure functions of tensors)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (rows, heads, d) rotated by position (transformers' rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _float_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def _make_linear(mode: str, kernel: str):
    if mode == "float":
        return lambda x, p: _float_linear(x, *p)

    # a group kept in float (mixed precision) carries (weight, bias); a W8A8 group its 9 tensors.
    # The structure is fixed per layer, so the compiled graph specialises on it once.
    return lambda x, p: _float_linear(x, *p) if len(p) == 2 else w8a8_apply(x, *p, kernel)


def pre_attention(lin, x, ln1, qkv, cos, sin, eps: float, n_heads: int, n_kv: int, head_dim: int):
    h = rms_norm(x, ln1, eps)
    out = lin(h, qkv)
    rows = x.shape[0]
    q = out[:, : n_heads * head_dim].reshape(rows, n_heads, head_dim)
    k = out[:, n_heads * head_dim : (n_heads + n_kv) * head_dim].reshape(rows, n_kv, head_dim)
    v = out[:, (n_heads + n_kv) * head_dim :].reshape(rows, n_kv, head_dim)
    return rope(q, cos, sin), rope(k, cos, sin), v


def post_attention(lin, x, attn, o, ln2, gate_up, down, eps: float):
    x = x + lin(attn, o)
    h = rms_norm(x, ln2, eps)
    gu = lin(h, gate_up)
    half = gu.shape[-1] // 2
    return x + lin(F.silu(gu[:, :half]) * gu[:, half:], down)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention of q (rows, heads, d) over keys/values (kv_heads, n, d).

    The query heads that share a kv head are stacked along the row axis, so one SDPA call per
    kv head reads each key once, with no copy of the cache."""
    rows, n_heads, d = q.shape
    n_kv = keys.shape[0]
    g = n_heads // n_kv
    qg = q.reshape(rows, n_kv, g, d).permute(1, 2, 0, 3).reshape(1, n_kv, g * rows, d)
    m = mask.repeat(g, 1) if g > 1 else mask
    out = F.scaled_dot_product_attention(qg, keys[None], values[None], attn_mask=m, scale=scale)
    return out.reshape(n_kv, g, rows, d).permute(2, 0, 1, 3).reshape(rows, n_heads * d)


_compiled: dict[tuple, Any] = {}
_compile_lock = threading.Lock()


def _graphs(mode: str, kernel: str, compiled: bool):
    """The two per-layer graphs for a linear mode, compiled once per process and shared."""
    key = (mode, kernel, compiled)
    with _compile_lock:
        if key not in _compiled:
            import functools

            lin = _make_linear(mode, kernel)
            pre = functools.partial(pre_attention, lin)
            post = functools.partial(post_attention, lin)
            if compiled:
                pre = torch.compile(pre, dynamic=False, fullgraph=True)
                post = torch.compile(post, dynamic=False, fullgraph=True)
            _compiled[key] = (pre, post)
        return _compiled[key]


# ---------------------------------------------------------------------------------------------
# the runner


class ChunkedPrefill:
    """Prefill a Llama-architecture model chunk by chunk.

    mode       "float" (the model's own weights) or "w8a8" (needs `act_absmax`, from `calibrate`)
    chunk      tokens per chunk: every chunk runs the same graph
    kernel     the int8 GEMM for w8a8: "auto", "onednn" or "int_mm" (see quant_w8a8)
    n_outliers calibrated outlier channels kept in float, per linear input
    smooth     SmoothQuant migration strength for w8a8 (0 = off; see quant_w8a8.quantize_w8a8)
    float_groups  linear groups kept in float in every layer (mixed precision: any of qkv, o,
               gate_up, down)
    float_layers  layers (0-based; negative counts from the end) kept wholly in float
    compile    torch.compile the per-layer graphs (compiled once per process, shared)
    """

    def __init__(
        self,
        model: Any,
        *,
        mode: str = "float",
        chunk: int = 128,
        act_absmax: list[dict[str, torch.Tensor]] | None = None,
        n_outliers: int = 8,
        per_channel: bool = False,
        dynamic: bool = False,
        smooth: float = 0.0,
        kernel: str = "auto",
        compile: bool = False,
        float_groups: Collection[str] = (),
        float_layers: Collection[int] = (),
    ) -> None:
        if mode not in ("float", "w8a8"):
            raise ValueError(f"unknown linear mode '{mode}' (known: float, w8a8)")
        if not CHUNK_RANGE[0] <= chunk <= CHUNK_RANGE[1]:
            raise ValueError(f"chunk must be within {CHUNK_RANGE[0]}..{CHUNK_RANGE[1]}, got {chunk}")
        unknown = sorted(set(float_groups) - set(LINEAR_GROUPS))
        if unknown:
            raise ValueError(f"unknown linear group(s) {unknown} in float_groups (known: {', '.join(LINEAR_GROUPS)})")
        self.layout = lay = llama_layout(model)
        bad = [i for i in float_layers if not -lay.n_layers <= i < lay.n_layers]
        if bad:
            raise ValueError(f"float_layers {bad} out of range for a model of {lay.n_layers} layers")
        float_at = {i % lay.n_layers for i in float_layers}
        self.mode, self.chunk, self.n_outliers = mode, chunk, n_outliers
        # the int8 GEMM, timed on this model's own shape (a chunk of rows x hidden x MLP width)
        self.kernel_shape = (chunk, lay.hidden, lay.layers[0]["gate"].out_features)
        self.kernel = pick_kernel(kernel, *self.kernel_shape) if mode == "w8a8" else "float"
        self.scale = 1.0 / math.sqrt(lay.head_dim)
        self._pre, self._post = _graphs(mode, self.kernel, compile)
        self._cos = self._sin = torch.zeros(0)
        self.params: list[dict[str, tuple]] = []
        self.weight_bytes = 0
        if mode == "w8a8" and act_absmax is None:
            raise ValueError("w8a8 needs calibrated activation ranges: pass act_absmax=calibrate(model, samples)")
        quantized = quantize_layers(lay, act_absmax, n_outliers, per_channel, dynamic, smooth) if mode == "w8a8" else None
        for i, layer in enumerate(lay.layers):
            p: dict[str, tuple] = {"ln1": layer["ln1"], "ln2": layer["ln2"]}
            for name, parts in LINEAR_GROUPS.items():
                if mode == "float" or name in float_groups or i in float_at:
                    w, b = cat_linear([layer[m] for m in parts])
                    p[name] = (w, b)
                    self.weight_bytes += w.numel() * 4
                else:
                    packed = pack(quantized[i][name], self.kernel, rows=chunk)
                    self.weight_bytes += packed.nbytes
                    p[name] = (
                        packed.inv_act_scale, packed.keep, packed.packed, packed.out_scale,
                        packed.outlier_idx, packed.outlier_weight, packed.bias, packed.act_qmax, packed.dynamic,
                    )
            self.params.append(p)
        # embedding (tied or not) and lm_head stay float: one row of logits per prefill
        self.weight_bytes += lay.embed.numel() * 4
        if lay.lm_head.data_ptr() != lay.embed.data_ptr():
            self.weight_bytes += lay.lm_head.numel() * 4

    def _rope_table(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < n:
            size = max(n, 2 * self._cos.shape[0], 1024)
            pos = torch.arange(size)[None]
            dummy = torch.zeros(1, 1, self.layout.head_dim)
            cos, sin = self.layout.rotary(dummy, pos)
            self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        return self._cos, self._sin

    @torch.inference_mode()
    def run(self, tokens: Sequence[int]) -> PrefillResult:
        """Prefill `tokens` from an empty cache: next-token logits and the keys/values."""
        n = len(tokens)
        if n == 0:
            raise ValueError("nothing to prefill")
        lay, c = self.layout, self.chunk
        padded = -(-n // c) * c
        cos, sin = self._rope_table(padded)
        ids = torch.zeros(padded, dtype=torch.long)
        ids[:n] = torch.as_tensor(list(tokens), dtype=torch.long)
        keys = torch.empty(lay.n_layers, lay.n_kv_heads, padded, lay.head_dim)
        values = torch.empty_like(keys)
        pos = torch.arange(padded)
        x = None
        for p0 in range(0, padded, c):
            end = p0 + c
            x = F.embedding(ids[p0:end], lay.embed).float()
            mask = pos[None, :end] <= pos[p0:end, None]
            for i, p in enumerate(self.params):
                q, k, v = self._pre(
                    x, p["ln1"], p["qkv"], cos[p0:end], sin[p0:end], lay.eps, lay.n_heads, lay.n_kv_heads, lay.head_dim
                )
                keys[i, :, p0:end] = k.transpose(0, 1)
                values[i, :, p0:end] = v.transpose(0, 1)
                a = attend(q, keys[i, :, :end], values[i, :, :end], mask, self.scale)
                x = self._post(x, a, p["o"], p["ln2"], p["gate_up"], p["down"], lay.eps)
        last = x[(n - 1) - (padded - c)]
        logits = F.linear(rms_norm(last, lay.final_norm, lay.eps), lay.lm_head).float()
        return PrefillResult(
            logits=logits,
            keys=[keys[i, :, :n][None] for i in range(lay.n_layers)],
            values=[values[i, :, :n][None] for i in range(lay.n_layers)],
            n_tokens=n,
        )


# ---------------------------------------------------------------------------------------------
# calibration


@torch.inference_mode()
def calibrate(model: Any, samples: Sequence[Sequence[int]]) -> list[dict[str, torch.Tensor]]:
    """Per layer, the max |activation| of every input channel of each linear group (qkv, o,
    gate_up, down), over `samples` (token id lists) run through the float model."""
    lay = llama_layout(model)
    stats: list[dict[str, torch.Tensor]] = [{} for _ in lay.layers]
    hooks = []

    def watch(i: int, name: str):
        def hook(_module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            prev = stats[i].get(name)
            stats[i][name] = a if prev is None else torch.maximum(prev, a)

        return hook

    for i, layer in enumerate(lay.layers):
        for name, mod in (("qkv", "q"), ("o", "o"), ("gate_up", "gate"), ("down", "down")):
            hooks.append(layer[mod].register_forward_pre_hook(watch(i, name)))
    try:
        for ids in samples:
            if len(ids):
                model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if any(len(s) < 4 for s in stats):
        raise ValueError("calibration needs at least one non-empty sample")
    return stats


__all__ = [
    "ChunkedPrefill",
    "PrefillResult",
    "UnsupportedModel",
    "LlamaLayout",
    "llama_layout",
    "calibrate",
    "quantize_layers",
    "LINEAR_GROUPS",
    "attend",
    "rms_norm",
    "rope",
    "W8A8Weights",
]
