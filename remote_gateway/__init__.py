"""The cloud gateway: sessions holding the target model's KV cache, verification, HTTP API."""

from importlib import import_module

_EXPORTS = {"Gateway": ".service", "GatewayLimits": ".service", "create_app": ".app", "serve": ".app"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
