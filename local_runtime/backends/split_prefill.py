"""`cpu-int8+llama.cpp`: the prompt prefilled in W8A8 chunks, decoding on llama.cpp.

mllm-NPU's split of the work: an NPU-style engine (fixed-shape int8 chunks, `cpu-int8`) computes
the prompt's keys and values, they are written into the llama.cpp context's sequence state
(`llama_state_seq_set_data`, layout in llamacpp_state.py), and llama.cpp decodes on from there,
at its own decode speed. The prompt's last token is decoded by llama.cpp itself, so every row the
drafter hands out comes from llama.cpp's graph.

Before it is used, `attach` checks the layout against this llama.cpp build: it reads the state
llama.cpp writes for a short probe, parses it strictly, and compares the probe's keys and values
with the backend's (cosine per layer). A build whose state is laid out otherwise, or a rope
order that does not match, is refused with one warning and the drafter prefills on llama.cpp.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING

import numpy as np

from ...protocols.errors import BackendUnavailable
from .gguf_writer import rotates_halves
from .llamacpp_state import KVState, read_state, rope_to_llama_cpp, write_state

if TYPE_CHECKING:
    from ..loaded import LoadedModel
    from ..prefill import PrefillBackend, PrefillResult
    from .llamacpp import LlamaCppModel

log = logging.getLogger("tandem.backends")

PROBE_TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
MIN_AGREEMENT = 0.97  # cosine of the probe's keys/values, per layer, against llama.cpp's own


class StatePrefill:
    """Writes a prefill backend's keys and values into a llama.cpp context as sequence 0."""

    def __init__(self, lm: "LoadedModel", backend: "PrefillBackend") -> None:
        self.lm = lm
        self.backend = backend
        self.neox = rotates_halves(lm.model.config.model_type)
        self.layout: KVState | None = None  # llama.cpp's own, from the probe
        self.agreement: float | None = None
        self.name = f"{backend.name} prefill into llama.cpp"

    def state_of(self, result: "PrefillResult", upto: int) -> KVState:
        """The first `upto` positions of a prefill in llama.cpp's layout."""
        assert self.layout is not None
        keys, values = [], []
        for k, v in zip(result.keys, result.values):
            _, heads, _, head_dim = k.shape
            rows = k[0, :, :upto].transpose(0, 1).reshape(upto, heads * head_dim).float().numpy()
            keys.append(rope_to_llama_cpp(rows, head_dim, self.neox))
            values.append(v[0, :, :upto].transpose(0, 1).reshape(upto, -1).float().numpy())
        return self.layout.like(np.arange(upto), keys, values)

    def write(self, ctx, tokens: list[int]) -> None:
        """Prefill `tokens` on the backend and make them sequence 0's cache in `ctx`."""
        data = write_state(self.state_of(self.backend.prefill(tokens), len(tokens)))
        _set_state(ctx, data)


def _llama_cpp():
    import llama_cpp  # noqa: PLC0415 - only reached once a llama.cpp model is loaded

    return llama_cpp


def _get_state(ctx) -> bytes:
    llama_cpp = _llama_cpp()
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
    return bytes(buf)[:written]


def _set_state(ctx, data: bytes) -> None:
    llama_cpp = _llama_cpp()
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if llama_cpp.llama_state_seq_set_data(ctx, buf, len(data), 0) != len(data):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        raise BackendUnavailable("llama.cpp did not take the prefilled sequence state")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def check(model: "LlamaCppModel", prefill: StatePrefill) -> float:
    """Probe the layout (see the module doc); the lowest per-layer cosine. Raises
    `BackendUnavailable` naming what does not match."""
    llama_cpp = _llama_cpp()
    ctx, mem = model.llm.ctx, llama_cpp.llama_get_memory(model.llm.ctx)
    tokens = model.tokenizer.encode(PROBE_TEXT)[:24]
    llama_cpp.llama_memory_clear(mem, True)
    try:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
            raise BackendUnavailable("llama.cpp could not decode the probe")
        own_bytes = _get_state(ctx)
        own = read_state(own_bytes)
        if write_state(own) != own_bytes:
            raise BackendUnavailable("llama.cpp's sequence state does not round-trip through this layout")
        if list(own.positions) != list(range(len(tokens))):
            raise BackendUnavailable("llama.cpp's sequence state lists positions this reader does not expect")
        prefill.layout = own
        ours = prefill.state_of(prefill.backend.prefill(tokens), len(tokens))
        if ours.n_layers != own.n_layers or any(a.shape != b.shape for a, b in zip(ours.keys + ours.values, own.keys + own.values)):
            raise BackendUnavailable(f"the {prefill.backend.name} backend's keys/values do not have llama.cpp's shapes")
        agreement = min(_cosine(a, b) for a, b in zip(ours.keys + ours.values, own.keys + own.values))
        if agreement < MIN_AGREEMENT:
            raise BackendUnavailable(f"the {prefill.backend.name} keys/values agree with llama.cpp's own only to cosine "
                                     f"{agreement:.3f} (< {MIN_AGREEMENT})")
        _set_state(ctx, write_state(ours))
        if _llama_cpp().llama_memory_seq_pos_max(mem, 0) != len(tokens) - 1:
            raise BackendUnavailable("llama.cpp took the prefilled state at other positions")
        return agreement
    finally:
        llama_cpp.llama_memory_clear(mem, True)


def attach(model: "LlamaCppModel", lm: "LoadedModel", backend: "PrefillBackend") -> "LlamaCppModel":
    """`model` with its prompts prefilled on `backend` when the probe passes; otherwise `model`
    as it was, after one warning saying why."""
    prefill = StatePrefill(lm, backend)
    try:
        prefill.agreement = check(model, prefill)
    except BackendUnavailable as exc:
        log.warning("%s: prompts prefill on llama.cpp itself (%s)", model.name, exc)
        return model
    model.state_prefill = prefill
    return model


__all__ = ["StatePrefill", "attach", "check", "MIN_AGREEMENT"]
