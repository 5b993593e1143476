"""Sessions: one target-model KV cache per device conversation, owned by the key that opened it.

A session's sequence is `engine.tokens`; the gateway keeps every token but the last one in the
KV cache, so each verify runs one forward pass over [last token, draft_1 .. draft_k] and gets the
k + 1 distributions the accept rule needs.

Memory is the gateway's scarce resource, so the store bounds it three ways: a session count
(overall and per key), an idle TTL, and a budget for all KV caches together. When a new session
needs room (the count is at its cap, or the caches are over the budget), idle sessions are
evicted: first from the key that holds the most sessions, least recently used first within it
(`victims`), so one client that opens sessions and never closes them loses its own, not everyone
else's. A session with a request in flight or waiting is never evicted. An expired or evicted
session leaves a tombstone for a while, so its owner gets `session_evicted` (410: re-open it with
`resume_tokens`) instead of a bare "unknown session". Another key never learns that a session
exists: to it every session id it does not own is unknown (404). A session id that names another
replica is answered 410 too (reason `replica`): its replica is gone or the request was sent to the
wrong one, and the client re-opens here with what it has.

Every way a session ends (close, finish, eviction, expiry) goes through `_end`, which marks the
session `gone` and frees its cache exactly once. Eviction and expiry only take idle sessions; a
close waits for the session's lock (service.py), so no cache is freed under a running forward
pass, and a request that was queued behind it finds the session `gone` and gets a clean error.

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
    waiting: int = 0  # requests holding or waiting for the lock
    gone: str | None = None  # why it ended: closed | finished | ttl | memory | capacity
    grammar: Any = None  # structured output: a local_runtime GrammarState every emitted token follows
    grammar_from: int = 0  # where in engine.tokens the grammar's tokens begin

    def grammar_mask(self, upto: int, extra: list[int] = ()):
        """What the grammar admits after engine.tokens[grammar_from:upto] + extra (None: no grammar)."""
        if self.grammar is None:
            return None
        self.grammar.sync([*self.engine.tokens[self.grammar_from : upto], *extra])
        return self.grammar.mask().allowed

    @property
    def position(self) -> int:
        return len(self.engine.tokens)

    @property
    def busy(self) -> bool:
        """A request holds or waits for it: it must not be evicted or expired."""
        return self.waiting > 0 or self.lock.locked()


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

    def victims(self, keep: str | None = None) -> list[Session]:
        """Idle sessions in the order they are evicted: the key holding the most sessions first,
        least recently used first within a key."""
        idle = [s for s in self._sessions.values() if not s.busy and s.id != keep]
        return sorted(idle, key=lambda s: (-self.count(s.owner), s.last_used))

    def make_room(self, need_bytes: int = 0, *, keep: str | None = None) -> bool:
        """Evict idle sessions (in `victims` order) until every cache plus `need_bytes` fits the
        budget. Returns whether it fits."""
        if self.kv_budget_bytes is None:
            return True
        total = self.kv_bytes_total() + need_bytes
        while total > self.kv_budget_bytes:
            victims = self.victims(keep)
            if not victims:
                return False
            total -= self.kv_bytes(victims[0])
            self._evict(victims[0], "memory")
        return True

    def retry_after_s(self, owner: str | None = None) -> float:
        """When capacity frees, as far as the store can tell: the soonest idle expiry among the
        sessions that block (the owner's, for its per-key cap), else one second (every session
        is busy, and a request takes about that long to finish)."""
        now = self.clock()
        idle = [s for s in self._sessions.values() if not s.busy and (owner is None or s.owner == owner)]
        if not idle:
            return 1.0
        return max(1.0, min(s.last_used + self.ttl_s - now for s in idle))

    def _end(self, session: Session, why: str) -> None:
        """The one way a session ends: marked gone, its cache freed (once)."""
        if session.gone is None:
            session.gone = why
            session.engine.release()

    def _evict(self, session: Session, reason: str) -> None:
        self._drop(session.id)
        self._end(session, reason)
        self._evicted[session.id] = _Tombstone(session.owner, reason, self.clock())
        if reason == "ttl":
            self.expired += 1
        else:
            self.evicted += 1
        if self._on_evict is not None:
            self._on_evict(reason)

    def evict_idle(self, session_id: str, reason: str = "memory") -> bool:
        """Evict one session if it is live and idle (as `make_room` would); whether it was."""
        session = self._sessions.get(session_id)
        if session is None or session.busy:
            return False
        self._evict(session, reason)
        return True

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
                retry_after_s=self.retry_after_s(session.owner),
            )
        if len(self._sessions) >= self.max_sessions:
            victims = self.victims()
            if not victims:
                raise gateway_error(
                    "capacity", f"the gateway's {self.max_sessions} sessions are all in use; retry later",
                    retry_after_s=self.retry_after_s(),
                )
            self._evict(victims[0], "capacity")
        if not self.make_room(need_bytes):
            raise gateway_error(
                "capacity", "the gateway's KV-cache memory is taken by sessions in use; retry later",
                retry_after_s=self.retry_after_s(),
            )
        session.last_used = self.clock()
        self._sessions[session.id] = session
        self._per_key[session.owner] = self._per_key.get(session.owner, 0) + 1

    def get(self, session_id: str, owner: str = "anonymous") -> Session:
        self.sweep()
        session = self._sessions.get(session_id) or self._finished.get(session_id)
        if session is None or session.owner != owner:
            tomb = self._evicted.get(session_id)
            if session is None and tomb is None and replica_of(session_id) not in (None, self.replica):
                raise gateway_error(
                    "session_evicted",
                    f"session '{session_id}' belongs to replica '{replica_of(session_id)}', not this one "
                    f"('{self.replica}'): open it again here with resume_tokens (the tokens generated so far)",
                    detail={"reason": "replica"},
                )
            if session is None and tomb is not None and tomb.owner == owner:
                why = {
                    "ttl": f"expired after {self.ttl_s:g} s idle",
                    "memory": "evicted to free KV-cache memory for other sessions",
                    "capacity": "evicted to make room for a new session (the gateway was at its session cap)",
                }.get(tomb.reason, f"evicted ({tomb.reason})")
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
        """Take a session out of the store (its owner closes it). The caller frees its cache
        with `end` once no request is using it."""
        session = self.get(session_id, owner)
        self._drop(session_id)
        self._finished.pop(session_id, None)
        return session

    def end(self, session: Session, why: str = "closed") -> None:
        self._end(session, why)

    def finish(self, session_id: str) -> None:
        """Drop a finished session's KV cache now; remember its last reply a while for retries."""
        session = self._drop(session_id)
        if session is None:
            return
        self._end(session, "finished")
        self._finished[session_id] = session

    def sweep(self) -> None:
        """Evict sessions idle for longer than the TTL (their caches are the gateway's memory)."""
        cutoff = self.clock() - self.ttl_s
        for s in [s for s in self._sessions.values() if s.last_used < cutoff and not s.busy]:
            self._evict(s, "ttl")


__all__ = ["Session", "SessionStore", "replica_of"]
