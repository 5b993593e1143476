"""Batch-invariant arithmetic: the logits after a prefix are the same bits however the tokens
before it were split into forward passes.

Why it matters. A verifier scores a drafted block in one pass; the target decoding alone scores
the same positions one step at a time. Where the two passes round differently, a near-tied argmax
can flip, and speculative output would differ from the target's own. The near-tie rule
(sequence.py) repairs that by recomputing such choices canonically, at the price of a forward
over the whole prefix. In bfloat16, with 8 bits of mantissa, near ties are common and that price
dominates. A batch-invariant model needs no such rule (its tie margin is 0): each position's
logits are a function of the tokens alone, whatever the blocking.

Three things decide whether a forward is batch-invariant (He et al., "Defeating Nondeterminism
in LLM Inference", 2025):

    linear layers   a GEMM row's reduction order must not depend on how many rows there are.
                    CPU GEMMs switch to a matrix-vector kernel for a single row, so a one-token
                    step is run as two rows (the token twice) and the first row kept. Whether
                    every other row count agrees is a property of this machine's kernels, so it
                    is measured at load time on the model's own shapes (`probe_linear`), never
                    assumed; a model whose kernels disagree keeps the near-tie rule.
    attention       query j of a block attends to exactly the keys a one-token step at that
                    position would see, with operations of the same shapes: one small float32
                    attention per query (`invariant_attention_rows`), not one masked call for
                    the block (whose softmax would sum over a longer row, in another order).
    everything else norms, activations, rotary embeddings and residuals are per row or per
                    element, so they are invariant by construction.

Row counts above `MAX_ROWS` are never probed; an engine splits longer passes into chunks of at
most that many tokens (which a batch-invariant model computes identically).
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger("tandem.invariant")

INVARIANT = "tandem_invariant"  # the attention implementation's registered name
MAX_ROWS = 512  # the largest pass the probe checks (and the gateway's packed-batch token budget)

# Row counts the probe compares: every count up to 17 (where kernels switch between register
# blockings), then powers of two and their neighbours up to MAX_ROWS.
PROBE_ROWS = (*range(1, 18), 31, 32, 33, 64, 65, 128, 129, 256, 257, MAX_ROWS)


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with a single-row input run as two rows (the row twice, the first kept), so that
    it goes through the same GEMM kernel as a block: a matrix-vector kernel sums in another order."""
    if x.dim() >= 2 and x.shape[-2] == 1:
        return F.linear(torch.cat([x, x], dim=-2), weight, bias)[..., :1, :]
    return F.linear(x, weight, bias)


class RowPaddedLinear(torch.nn.Linear):
    """A Linear computed by `padded_linear`. Installed by swapping the class of the model's own
    Linear modules: weights and state dicts are untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_linear(x, self.weight, self.bias)


@torch.inference_mode()
def probe_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, rows: tuple[int, ...] = PROBE_ROWS,
                 linear=padded_linear) -> int | None:
    """The first row count whose rows differ from the same rows computed in the largest pass,
    or None when every count in `rows` agrees bit for bit (random inputs on the weight's device
    and dtype). `linear` is the rule under test: the one the model will run."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(max(rows), weight.shape[1], generator=gen).to(device=weight.device, dtype=weight.dtype)
    full = linear(x, weight, bias)
    for m in rows:
        if not torch.equal(linear(x[:m], weight, bias), full[:m]):
            return m
    return None


def invariant_attention_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float | None,
                             window: int | None = None) -> torch.Tensor:
    """Causal attention for the q_len queries at the end of `key`/`value` (one sequence:
    query j sits at key index kv_len - q_len + j), each query computed alone over exactly the
    keys it sees, in float32. Grouped-query heads share their key/value head without copies.
    Returns (batch, q_len, heads, head_dim) in the query's dtype."""
    b, heads, q_len, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    q = query.float().view(b, kv_heads, heads // kv_heads, q_len, d)
    k, v = key.float(), value.float()
    outs = []
    for j in range(q_len):
        end = kv_len - q_len + j + 1
        start = 0 if window is None else max(0, end - window)  # transformers' rule: kv > q - window
        scores = torch.matmul(q[:, :, :, j], k[:, :, start:end].transpose(-1, -2)) * scale
        outs.append(torch.matmul(torch.softmax(scores, dim=-1), v[:, :, start:end]))  # (b, kv_heads, groups, d)
    return torch.stack(outs, dim=1).reshape(b, q_len, heads, d).to(query.dtype)


def invariant_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """The attention implementation of a batch-invariant model (transformers' AttentionInterface
    signature). Causal and unpadded, as every engine here runs: the mask is not read."""
    return invariant_attention_rows(query, key, value, scaling=scaling, window=sliding_window), None


_register_lock = threading.Lock()


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    with _register_lock:
        AttentionInterface.register(INVARIANT, invariant_attention)
        AttentionMaskInterface.register(INVARIANT, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _device(model) -> str:
    return str(next(model.parameters()).device)


def make_batch_invariant(model, *, probed: bool = False) -> bool:
    """Make `model` batch-invariant if this machine's kernels allow it: probe every distinct
    linear shape, then swap in `RowPaddedLinear` and the per-query attention. Returns whether it
    did; a model it cannot serve (soft-capped attention, an attention other than sdpa, kernels
    whose rows depend on the row count) keeps (or gets back) plain Linear and sdpa, and the
    near-tie rule. A model moved to another device is probed again there. `probed`: the GEMM
    probes passed before for these weights on this machine (a saved verdict), skip them."""
    if _invariant.get(model) == _device(model):
        return True
    cfg = getattr(model.config, "text_config", None) or model.config
    reason = None
    if getattr(cfg, "attn_logit_softcapping", None):
        reason = "soft-capped attention"
    elif model.config._attn_implementation not in ("sdpa", INVARIANT):
        reason = f"attention implementation {model.config._attn_implementation!r}"
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes: dict[tuple, torch.nn.Linear] = {}
    for m in linears:
        shapes.setdefault((tuple(m.weight.shape), m.weight.dtype, m.bias is not None), m)
    for (shape, dtype, _), m in shapes.items() if reason is None and not probed else ():
        bad = probe_linear(m.weight, m.bias)
        if bad is not None:
            reason = (f"a {shape[1]}x{shape[0]} {str(dtype).removeprefix('torch.')} GEMM on {_device(model)} "
                      f"sums {bad} rows in another order than a block")
            break
    if reason is None and not probed:
        reason = _probe_exact_linears(model)
    if reason is not None:
        log.info("batch invariance is off (the near-tie rule stays): %s", reason)
        if model in _invariant:  # probed on another device before: undo
            for m in linears:
                m.__class__ = torch.nn.Linear
            model.set_attn_implementation("sdpa")
            del _invariant[model]
        return False
    _register()
    for m in linears:
        m.__class__ = RowPaddedLinear
    model.set_attn_implementation(INVARIANT)
    _invariant[model] = _device(model)
    return True


def _probe_exact_linears(model) -> str | None:
    """The W8A8 layers' rows are independent by construction (int32 sums, per-row scales); the
    probe checks this machine's int8 kernel agrees, once per distinct shape. The reason it does
    not, or None."""
    from .quant_w8a8 import W8A8Linear, w8a8_rule

    shapes: dict[tuple, W8A8Linear] = {}
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            shapes.setdefault((m.in_features, m.out_features, m.kernel), m)
    for (n_in, n_out, kernel), m in shapes.items():
        bad = probe_linear(torch.empty(n_out, n_in), None, linear=lambda x, _w, _b, m=m: w8a8_rule(x, m))
        if bad is not None:
            return f"a {n_in}x{n_out} W8A8 GEMM ({kernel}) gives {bad} rows other bits than a block"
    return None


# the models make_batch_invariant converted, and the device each was probed on
_invariant: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def is_batch_invariant(model) -> bool:
    return model in _invariant and _invariant[model] == _device(model)


def chunks(start: int, upto: int, size: int = MAX_ROWS) -> list[tuple[int, int]]:
    """[start, upto) in consecutive pieces of at most `size` (the passes a batch-invariant
    model runs a long block as)."""
    return [(s, min(s + size, upto)) for s in range(start, upto, size)]


__all__ = ["INVARIANT", "MAX_ROWS", "RowPaddedLinear", "chunks", "invariant_attention", "invariant_attention_rows",
           "is_batch_invariant", "make_batch_invariant", "padded_linear", "probe_linear"]
