"""Sessions: one target-model KV cache per device conversation, owned by the key that opened it.

A session's sequence is `engine.tokens`; the gateway keeps every token but the last one in the
KV cache, so each verify runs one forward pass over [last token, draft_1 .. draft_k] and gets the
k + 1 distributions the accept rule needs.

Memory is the gateway's scarce resource, so the store bounds it three ways: a session count
(overall and per key), an idle TTL, and a budget for all KV caches together. Over the budget, idle
sessions are evicted least recently used first. An expired or evicted session leaves a tombstone
for a while, so its owner gets `session_evicted` (410: re-open it with `resume_tokens`) instead
of a bare "unknown session". Another key never learns that a session exists: to it every session
id it does not own is unknown (404).

Session ids are unguessable (a session id is a capability) and start with the replica id
(`s_<replica>.<random>`), so a load balancer can send every request of a session to the replica
that holds its cache.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cachetools import TTLCache

from ..local_runtime.text import IncrementalDecoder
from ..protocols.errors import gateway_error
from ..protocols.messages import SamplingParams


@dataclass
class Session:
    id: str
    engine: Any  # a local_runtime Sequence: the backend's per-session engine
    sampling: SamplingParams
    max_new_tokens: int
    prompt_len: int
    rng: np.random.Generator
    owner: str = "anonymous"  # the id of the key that opened it
    text_space: bool = False  # verifies text from a drafter with another tokenizer
    decoder: IncrementalDecoder | None = None  # the generated text, as it becomes certain
    text: str = ""  # text-space sessions: the generated text both sides agree on
    text_pending: bool = False  # the last tokens end inside a multi-byte character
    generated: int = 0
    finished: bool = False
    last_verify: tuple | None = None  # (request key, reply) of the last verify applied
    last_used: float = 0.0  # the store's clock, set when added and on every use
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def position(self) -> int:
        return len(self.engine.tokens)

    @property
    def busy(self) -> bool:
        return self.lock.locked()


def replica_of(session_id: str) -> str | None:
    """The replica a session id names (`s_<replica>.<random>`), or None for another format."""
    if not session_id.startswith("s_"):
        return None
    replica, dot, rest = session_id[2:].partition(".")
    return replica if dot and replica and rest else None


@dataclass
class _Tombstone:
    owner: str
    reason: str
    at: float


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        ttl_s: float,
        *,
        replica: str = "r0",
        max_per_key: int | None = None,
        kv_budget_bytes: int | None = None,
        on_evict=None,
        clock: Callable[[], float] = time.monotonic,
        finished_memory: int = 256,
        bytes_per_token: int = 0,
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.replica = replica
        self.max_per_key = max_per_key
        self.kv_budget_bytes = kv_budget_bytes
        self._on_evict = on_evict  # called with the reason ("ttl" | "memory") of each eviction
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        # recently finished sessions (their last reply, for a retried request) and tombstones of
        # evicted ones (so their owner hears "evicted", not "unknown"), each for a while
        self._finished: TTLCache[str, Session] = TTLCache(finished_memory, ttl_s, timer=clock)
        self._evicted: TTLCache[str, _Tombstone] = TTLCache(4096, max(3600.0, 4 * ttl_s), timer=clock)
        self._per_key: dict[str, int] = {}
        self.bytes_per_token = bytes_per_token  # of one cached token's keys and values (0: unknown)
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def new_id(self) -> str:
        return f"s_{self.replica}.{secrets.token_urlsafe(18)}"

    # -- memory ----------------------------------------------------------------------------------

    def kv_bytes(self, session: Session) -> int:
        """Bytes held by a session's KV cache: cached tokens x the backend's bytes per token."""
        return session.engine.cached * self.bytes_per_token

    def kv_bytes_total(self) -> int:
        return sum(self.kv_bytes(s) for s in self._sessions.values())

    def bytes_for(self, tokens: int) -> int:
        return tokens * self.bytes_per_token

    def make_room(self, need_bytes: int = 0, *, keep: str | None = None) -> bool:
        """Evict idle sessions, least recently used first, until every cache plus `need_bytes`
        fits the budget. Returns whether it fits."""
        if self.kv_budget_bytes is None:
            return True
        total = self.kv_bytes_total() + need_bytes
        if total <= self.kv_budget_bytes:
            return True
        for s in sorted(self._sessions.values(), key=lambda s: s.last_used):
            if s.busy or s.id == keep:
                continue
            total -= self.kv_bytes(s)
            self._evict(s, "memory")
            if total <= self.kv_budget_bytes:
                return True
        return False

    def _evict(self, session: Session, reason: str) -> None:
        self._drop(session.id)
        session.engine.release()
        self._evicted[session.id] = _Tombstone(session.owner, reason, self.clock())
        if reason == "ttl":
            self.expired += 1
        else:
            self.evicted += 1
        if self._on_evict is not None:
            self._on_evict(reason)

    def discard(self, session_id: str) -> Session | None:
        """Forget a session (whoever owns it); None if it was not live."""
        return self._drop(session_id)

    def _drop(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            left = self._per_key.get(session.owner, 1) - 1
            if left > 0:
                self._per_key[session.owner] = left
            else:
                self._per_key.pop(session.owner, None)
        return session

    # -- the store -------------------------------------------------------------------------------

    def count(self, owner: str) -> int:
        return self._per_key.get(owner, 0)

    def add(self, session: Session, *, max_per_key: int | None = None, need_bytes: int = 0) -> None:
        self.sweep()
        limit = max_per_key if max_per_key is not None else self.max_per_key
        if limit is not None and self.count(session.owner) >= limit:
            raise gateway_error(
                "session_limit",
                f"key '{session.owner}' holds its maximum of {limit} open sessions; close one (or let it finish) first",
                detail={"max_sessions": limit},
                retry_after_s=1.0,
            )
        if len(self._sessions) >= self.max_sessions:
            raise gateway_error(
                "capacity", f"the gateway holds its maximum of {self.max_sessions} sessions; close one or retry later",
                retry_after_s=1.0,
            )
        if not self.make_room(need_bytes):
            raise gateway_error(
                "capacity", "the gateway's KV-cache memory is taken by sessions in use; retry later", retry_after_s=1.0
            )
        session.last_used = self.clock()
        self._sessions[session.id] = session
        self._per_key[session.owner] = self._per_key.get(session.owner, 0) + 1

    def get(self, session_id: str, owner: str = "anonymous") -> Session:
        self.sweep()
        session = self._sessions.get(session_id) or self._finished.get(session_id)
        if session is None or session.owner != owner:
            tomb = self._evicted.get(session_id)
            if session is None and tomb is not None and tomb.owner == owner:
                why = (
                    f"expired after {self.ttl_s:g} s idle" if tomb.reason == "ttl"
                    else "evicted to free KV-cache memory for other sessions"
                )
                raise gateway_error(
                    "session_evicted",
                    f"session '{session_id}' was {why}; open it again with resume_tokens (the tokens generated so far)",
                    detail={"reason": tomb.reason},
                )
            raise gateway_error(
                "unknown_session", f"no session '{session_id}' on this gateway (closed, expired or never opened)"
            )
        session.last_used = self.clock()
        return session

    def pop(self, session_id: str, owner: str = "anonymous") -> Session:
        session = self.get(session_id, owner)
        self._drop(session_id)
        self._finished.pop(session_id, None)
        return session

    def finish(self, session_id: str) -> None:
        """Drop a finished session's KV cache now; remember its last reply a while for retries."""
        session = self._drop(session_id)
        if session is None:
            return
        session.engine.release()
        self._finished[session_id] = session

    def sweep(self) -> None:
        """Evict sessions idle for longer than the TTL (their caches are the gateway's memory)."""
        cutoff = self.clock() - self.ttl_s
        for s in [s for s in self._sessions.values() if s.last_used < cutoff and not s.busy]:
            self._evict(s, "ttl")


__all__ = ["Session", "SessionStore", "replica_of"]
