"""The on-device engine: model loading, a KV cache with rollback, drafting.

torch and transformers load on first use, so importing this package stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": ".engine",
    "Draft": ".engine",
    "generate_alone": ".engine",
    "load_model": ".models",
    "known_models": ".models",
    "LoadedModel": ".models",
    "Tokenizer": ".models",
    "IncrementalDecoder": ".text",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
