"""Device backends: who runs the prompt's prefill, and who drafts.

Prefill backends (`PrefillBackend`: prompt in, next-token logits and keys/values out):

    reference-fp32   the model's own float forward, one pass (what the others are compared with)
    cpu-int8         W8A8 chunks with shadow outlier channels, compiled once (torch)
    onnx             the same chunk graph in ONNX Runtime, on an NPU execution provider
                     (QNN, CoreML, OpenVINO) when one is installed, else the CPU provider

Drafting backends (`DraftingEngine`, what the speculative loop drives), picked by name:

    torch            `Engine`: transformers model, dynamic cache (the default)
    cpu-int8, onnx   `Engine` whose prompt prefill runs on that prefill backend
    torch-int8       a lean static-cache decode loop with int8 weights, compiled
    llama.cpp        llama.cpp on the same GGUF file, its own KV cache and rollback
    cpu-int8+llama.cpp  llama.cpp decoding after a `cpu-int8` prompt prefill, whose keys and
                     values are written into llama.cpp's sequence state (split_prefill.py)
    mlc              MLC LLM's engine (installed separately; see the README)

A drafter is named `MODEL@BACKEND` (`smollm2-135m@llama.cpp`) or `Client(drafter_backend=...)`.
Nothing heavy is imported until a backend is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...protocols.errors import BackendUnavailable
from .base import DraftingEngine, missing_extra

if TYPE_CHECKING:
    from ..loaded import LoadedModel
    from ..prefill import PrefillBackend

PREFILL_BACKENDS = ("reference-fp32", "cpu-int8", "onnx")
DRAFTING_BACKENDS = ("torch", "cpu-int8", "onnx", "torch-int8", "llama.cpp", "cpu-int8+llama.cpp", "mlc")
_ALIASES = {"llamacpp": "llama.cpp", "llama_cpp": "llama.cpp", "reference": "torch", "fp32": "torch"}



def normalize_backend(name: str) -> str:
    key = _ALIASES.get(name, name)
    if key not in DRAFTING_BACKENDS:
        raise BackendUnavailable(f"unknown device backend '{name}' (known: {', '.join(DRAFTING_BACKENDS)})")
    return key


def split_backend(name: str | None, backend: str | None = None) -> tuple[str | None, str | None]:
    """`MODEL@BACKEND` -> (MODEL, BACKEND); an explicit `backend` wins. `tiny-llama@smollm2-135m`
    (a tiny model with another model's tokenizer) is left alone: its suffix is not a backend."""
    if backend is not None:
        backend = normalize_backend(backend)
    if name is not None and "@" in name:
        base, _, suffix = name.rpartition("@")
        if suffix in DRAFTING_BACKENDS or suffix in _ALIASES:
            suffix = normalize_backend(suffix)
            if backend is not None and backend != suffix:
                raise BackendUnavailable(f"drafter '{name}' names backend '{suffix}' but drafter_backend is '{backend}'")
            return base, suffix
    return name, backend


_prefill_cache: dict[tuple, PrefillBackend] = {}


def prefill_backend(name: str, lm: "LoadedModel", **options: Any) -> PrefillBackend:
    """Build (once per model and options) the prefill backend `name` for a loaded torch model."""
    key = (name, id(lm.model), tuple(sorted(options.items())))
    if key in _prefill_cache:
        return _prefill_cache[key]
    if name == "reference-fp32":
        from .cpu_int8 import ReferencePrefill

        backend: PrefillBackend = ReferencePrefill(lm)
    elif name == "cpu-int8":
        from .cpu_int8 import CpuInt8Prefill

        backend = CpuInt8Prefill(lm, **options)
    elif name == "onnx":
        from .onnx_rt import OnnxPrefill

        backend = OnnxPrefill(lm, **options)
    else:
        raise BackendUnavailable(f"unknown prefill backend '{name}' (known: {', '.join(PREFILL_BACKENDS)})")
    _prefill_cache[key] = backend
    return backend


class WithPrefill:
    """A torch device model whose engines prefill prompts on a prefill backend; everything else
    (name, tokenizer, the model itself) is the wrapped `LoadedModel`'s."""

    def __init__(self, lm: "LoadedModel", backend: PrefillBackend) -> None:
        self.lm = lm
        self.backend = backend

    def __getattr__(self, item: str) -> Any:
        return getattr(self.lm, item)

    def new_engine(self, *, tie_margin: float | None = None) -> Any:
        from ..engine import Engine

        tie = self.lm.tie_margin if tie_margin is None else tie_margin
        return Engine(self.lm, tie_margin=tie, prefill_backend=self.backend)

    def resident_bytes(self) -> int:
        return self.backend.resident_bytes()


def gguf_path(name: str, *, progress: bool = True) -> Path:
    """The GGUF file behind a model name: a packaged model's, or the path itself."""
    from ..models import is_packaged, resolve_gguf

    if is_packaged(name):
        return resolve_gguf(name, progress=progress)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise BackendUnavailable(f"the llama.cpp and MLC backends load GGUF files; '{name}' is not a packaged model or a .gguf path")


_drafters: dict[tuple[str, str], Any] = {}


def load_drafter(name: str, backend: str | None = None, *, progress: bool = True) -> Any:
    """The device model for a drafting backend: a `LoadedModel` for the torch backends, a
    `LlamaCppModel` / `MlcModel` for the others (they carry their own weights)."""
    from ..models import load_model, load_tokenizer

    backend = normalize_backend(backend) if backend else "torch"
    if backend == "torch":
        return load_model(name, progress=progress)
    if backend in ("cpu-int8", "onnx"):
        lm = load_model(name, progress=progress)
        return WithPrefill(lm, prefill_backend(backend, lm))
    key = (name, backend)
    if key not in _drafters:
        if backend == "torch-int8":
            from .lean import StaticInt8Model

            _drafters[key] = StaticInt8Model(load_model(name, progress=progress))
        elif backend in ("llama.cpp", "cpu-int8+llama.cpp"):
            from .llamacpp import LlamaCppModel

            model = LlamaCppModel(name, gguf_path(name, progress=progress), load_tokenizer(name, progress=progress))
            if backend == "cpu-int8+llama.cpp":
                from .split_prefill import attach

                lm = load_model(name, progress=progress)
                model = attach(model, lm, prefill_backend("cpu-int8", lm))
            _drafters[key] = model
        else:
            from .mlc import MlcModel

            _drafters[key] = MlcModel(name, load_tokenizer(name, progress=progress))
    return _drafters[key]


def drafter_engine(model: Any, backend: str | None = None) -> DraftingEngine:
    """A fresh engine (one sequence) over a drafter from `load_drafter`, or over a plain
    `LoadedModel` on the torch backends."""
    from ..loaded import LoadedModel

    backend = normalize_backend(backend) if backend else "torch"
    if isinstance(model, LoadedModel):
        if backend in ("cpu-int8", "onnx"):
            return WithPrefill(model, prefill_backend(backend, model)).new_engine()
        if backend != "torch":
            raise BackendUnavailable(f"backend '{backend}' needs its device model from load_drafter")
    return model.new_engine()


def __getattr__(name: str) -> Any:
    # the prefill interface lives beside its result (prefill.py, which needs torch): importing
    # this package stays cheap until it is asked for
    if name == "PrefillBackend":
        from ..prefill import PrefillBackend

        return PrefillBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PrefillBackend",
    "DraftingEngine",
    "PREFILL_BACKENDS",
    "DRAFTING_BACKENDS",
    "split_backend",
    "normalize_backend",
    "prefill_backend",
    "load_drafter",
    "drafter_engine",
    "gguf_path",
    "missing_extra",
    "WithPrefill",
]
