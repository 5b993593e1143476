"""Sessions: one target-model KV cache per device conversation, with expiry.

A session's sequence is `engine.tokens`; the gateway keeps every token but the last one in the
KV cache, so each verify runs one forward pass over [last token, draft_1 .. draft_k] and gets the
k + 1 distributions the accept rule needs.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
import time
from dataclasses import dataclass, field

import numpy as np

from ..local_runtime.engine import Engine
from ..local_runtime.text import IncrementalDecoder
from ..protocols.errors import gateway_error
from ..protocols.messages import SamplingParams


@dataclass
class Session:
    id: str
    engine: Engine
    sampling: SamplingParams
    max_new_tokens: int
    prompt_len: int
    rng: np.random.Generator
    text_space: bool = False  # verifies text from a drafter with another tokenizer
    decoder: IncrementalDecoder | None = None  # the generated text, as it becomes certain
    text: str = ""  # text-space sessions: the generated text both sides agree on
    text_pending: bool = False  # the last tokens end inside a multi-byte character
    generated: int = 0
    finished: bool = False
    last_verify: tuple | None = None  # (request key, reply) of the last verify applied
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def position(self) -> int:
        return len(self.engine.tokens)


class SessionStore:
    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._finished: OrderedDict[str, Session] = OrderedDict()  # recently finished, for retries
        self.expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def new_id(self) -> str:
        # unguessable: a session id is a capability to the conversation it names
        return "s_" + secrets.token_urlsafe(18)

    def add(self, session: Session) -> None:
        self.sweep()
        if len(self._sessions) >= self.max_sessions:
            raise gateway_error(
                "capacity", f"the gateway holds its maximum of {self.max_sessions} sessions; close one or retry later"
            )
        self._sessions[session.id] = session

    def get(self, session_id: str) -> Session:
        self.sweep()
        session = self._sessions.get(session_id) or self._finished.get(session_id)
        if session is None:
            raise gateway_error(
                "unknown_session", f"no session '{session_id}' on this gateway (closed, expired or never opened)"
            )
        session.last_used = time.monotonic()
        return session

    def pop(self, session_id: str) -> Session:
        session = self.get(session_id)
        self._sessions.pop(session_id, None)
        self._finished.pop(session_id, None)
        return session

    def finish(self, session_id: str, keep: int = 256) -> None:
        """Drop a finished session's KV cache now; remember its last reply a while for retries."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        session.engine.reset()
        self._finished[session_id] = session
        while len(self._finished) > keep:
            self._finished.popitem(last=False)

    def sweep(self) -> None:
        """Drop sessions idle for longer than the TTL (their caches are the gateway's memory)."""
        cutoff = time.monotonic() - self.ttl_s
        for sid in [sid for sid, s in self._sessions.items() if s.last_used < cutoff and not s.lock.locked()]:
            del self._sessions[sid]
            self.expired += 1
        for sid in [sid for sid, s in self._finished.items() if s.last_used < cutoff]:
            del self._finished[sid]


__all__ = ["Session", "SessionStore"]
