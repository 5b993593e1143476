"""A model in W8A8 as a gateway target (`NAME:w8a8`), and the on-disk copy that makes its second
start fast.

Quantising a 1.5B model takes two steps that cost minutes on one core: the GGUF's weights are
dequantised into a float32 transformers model, then every linear layer is quantised to int8
(quant_w8a8.W8A8Linear). The result is saved under the cache's `w8a8` folder, keyed by

    the weights file (resolved path, size, mtime), the torch version, the CPU's int8 flags and
    the int8 kernel chosen for each layer

so a second start loads the int8 weights memory-mapped into a model skeleton built on the meta
device (no float copy, no random initialisation) and only re-packs them for the kernel. The
batch-invariance probe runs again on every start: it takes a fraction of a second and it is what
makes the model exact, so it is never taken on trust from a file.

A damaged or foreign file is ignored with one warning and rebuilt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

import torch

from .loaded import LoadedModel, Tokenizer
from .packaged import cache_root
from .saved import all_tensors, assign, file_key, finish, read_payload, skeleton, write_model
from .quant_w8a8 import W8A8Linear, W8A8Weights, quantize_model_w8a8, weight_qmax

log = logging.getLogger("tandem.models")

FORMAT = 2  # bumped when what is saved changes


def cache_key(source: Path) -> str:
    """What the saved model depends on: the weights file, torch, this CPU's int8 arithmetic."""
    return file_key(source, torch.__version__, weight_qmax(), torch.backends.cpu.get_cpu_capability(), FORMAT)


def cache_file(source: Path) -> Path:
    return cache_root() / "w8a8" / f"{source.stem}-{cache_key(source)}.pt"


def load_w8a8(
    name: str,
    *,
    source: Path | None,
    load_float: Callable[[], tuple[LoadedModel, bool]],
    tokenizer_for: Callable[[Any], Tokenizer],
    status: Callable[[str], ContextManager],
) -> LoadedModel:
    """`name` in W8A8, batch-invariant. `source`: the weights file (None: nothing is cached, as
    for the tests' random models); `load_float()`: the float model and whether it may be
    quantised in place; `tokenizer_for(model)`: the tokenizer a cached model speaks."""
    from ..protocols.errors import ModelLoadError
    from .invariant import make_batch_invariant

    path = cache_file(source) if source is not None else None
    model = _read(path, status) if path is not None and path.exists() else None
    if model is not None:
        tokenizer, origin = tokenizer_for(model), str(source)
    else:
        lm, in_place = load_float()
        model = lm.model if in_place else _clone(lm.model)
        model.set_attn_implementation("sdpa")  # the stock attention, whatever a gateway installed on the original
        collected: dict[str, tuple[W8A8Weights, str]] = {}
        with status(f"quantising {lm.name} to W8A8 ..."):
            quantize_model_w8a8(model, collect=collected if path is not None else None)
        if path is not None:
            _write(path, model, collected)
        tokenizer, origin = lm.tokenizer, lm.source
    if not make_batch_invariant(model):
        raise ModelLoadError(f"model '{name}': this machine's int8 GEMM is not batch-invariant, so a W8A8 "
                             "target would not be exact here; use the model on llama.cpp or in bf16")
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source=origin + " (W8A8: int8 weights and activations)")


def _clone(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


# ---------------------------------------------------------------------------------------------
# the file: the config, every W8A8 layer's int8 weight and scales, every other tensor


def _write(path: Path, model: Any, linears: dict[str, tuple[W8A8Weights, str]]) -> None:
    inside = tuple(n + "." for n in linears)
    rest = {n: t for n, t in all_tensors(model).items() if not n.startswith(inside)}
    write_model(path, model, rest, w8a8_format=FORMAT,
                linears={n: {"weight_q": w.weight_q, "weight_scale": w.weight_scale, "bias": w.bias, "kernel": k}
                         for n, (w, k) in linears.items()})


def _read(path: Path, status: Callable[[str], ContextManager]) -> Any | None:
    """The model saved at `path`, or None (with a warning) when the file cannot be used."""
    try:
        with status(f"loading the W8A8 weights from {path.name} ..."):
            payload = read_payload(path)
            if payload.get("w8a8_format") != FORMAT:
                raise ValueError(f"W8A8 format {payload.get('w8a8_format')}, expected {FORMAT}")
            model = skeleton(payload)
            for name, spec in payload["linears"].items():
                parent, _, attr = name.rpartition(".")
                w = W8A8Weights(weight_q=spec["weight_q"], weight_scale=spec["weight_scale"], act_scale=torch.tensor(1.0),
                                act_qmax=127, outlier_idx=torch.zeros(0, dtype=torch.long),
                                outlier_weight=torch.zeros(0, spec["weight_q"].shape[0]), bias=spec["bias"],
                                in_mult=torch.ones(spec["weight_q"].shape[1]), dynamic=True)
                setattr(model.get_submodule(parent), attr, W8A8Linear(w, spec["kernel"]))
            for name, tensor in payload["tensors"].items():
                assign(model, name, tensor)
            return finish(model, payload)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring the saved W8A8 model %s (quantising again): %s", path.name, exc)
        return None


__all__ = ["load_w8a8", "cache_file", "cache_key", "FORMAT"]
