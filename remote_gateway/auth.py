"""API keys: who is calling. Every session belongs to the key that opened it.

A key is a random string (`new_key()`); the gateway stores only its SHA-256 (keys are high-entropy,
so a fast hash is enough: nothing to brute-force), or reads the key itself from an environment
variable at start. A request names its key as `authorization: Bearer <key>`, the header every
OpenAI client sends too.

With `auth: none` every caller is the one `anonymous` principal: for a gateway on loopback, the
in-process gateway of the SDK, and tests. Session ids stay unguessable either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass

from ..protocols.errors import gateway_error

log = logging.getLogger("tandem.gateway.auth")


@dataclass(frozen=True)
class Principal:
    """A caller: the key's id (never the key) and its own limits (None: the gateway's default)."""

    id: str
    max_sessions: int | None = None
    tokens_per_minute: int | None = None


ANONYMOUS = Principal("anonymous")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "tdm_" + secrets.token_urlsafe(24)


class KeyRing:
    """Maps `authorization` headers to principals. `required=False` is `auth: none`."""

    def __init__(self, keys: dict[str, Principal] | None = None, *, required: bool = False) -> None:
        self._by_hash = dict(keys or {})  # sha256 hex -> principal
        self.required = required

    @classmethod
    def from_entries(cls, entries, *, required: bool) -> "KeyRing":
        """Entries with `id`, `sha256` or `env`, and optional `max_sessions` / `tokens_per_minute`."""
        keys: dict[str, Principal] = {}
        for e in entries:
            digest = e.sha256
            if digest is None:
                value = os.environ.get(e.env or "")
                if not value:
                    log.warning("API key '%s' is disabled: environment variable %s is not set", e.id, e.env)
                    continue
                digest = hash_key(value)
            keys[digest.lower()] = Principal(e.id, e.max_sessions, e.tokens_per_minute)
        return cls(keys, required=required)

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.required:
            return ANONYMOUS
        if not authorization:
            raise gateway_error("unauthorized", "this gateway needs an API key: send the header 'authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise gateway_error("unauthorized", "the authorization header must be 'Bearer <key>'")
        principal = self._by_hash.get(hash_key(key.strip()))
        if principal is None:
            raise gateway_error("unauthorized", "unknown API key")
        return principal


__all__ = ["Principal", "ANONYMOUS", "KeyRing", "hash_key", "new_key"]
