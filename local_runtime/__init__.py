"""The on-device engine: model loading, one sequence base every engine extends (a KV cache with
rollback, the near-tie rule, drafting), the speculative rule, accelerated prefill backends.

torch and transformers load on first use, so importing this package stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": ".engine",
    "Draft": ".draft",
    "Sequence": ".sequence",
    "generate_alone": ".sequence",
    "load_model": ".models",
    "known_models": ".models",
    "LoadedModel": ".loaded",
    "Tokenizer": ".loaded",
    "IncrementalDecoder": ".text",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
