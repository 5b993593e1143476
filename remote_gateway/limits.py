"""The gateway's limits (`GatewayLimits`), and per-key rate limits: a token bucket per API key.

A key may spend `tokens_per_minute` target tokens a minute, counted as the gateway's cost: the
tokens a forward pass processes (prompt tokens at open, k + 1 per verify of k drafts, the appended
tokens plus one per append, one per generated token in cloud mode). The bucket holds at most a
minute's worth and refills continuously:

    level(t) = min(capacity, level(t0) + rate * (t - t0)),   rate = capacity / 60 s

A request that needs n tokens passes when level >= n and takes them; otherwise it is refused with
the time until the bucket holds n: (n - level) / rate, sent as Retry-After.

Work whose cost is only known as it runs reserves up front instead: a generation (cloud mode,
chat completions) takes its prompt plus `max_new_tokens` from the bucket when it starts (or as
many as the bucket holds, and generates no more than that), and gives back what it did not use
when it ends. So concurrent generations of one key together never spend more than its budget.
The only debt is a re-prefill forced by the gateway itself (an evicted generation re-opened),
which the key's next request waits out.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..protocols.errors import gateway_error
from .auth import Principal


@dataclass
class GatewayLimits:
    max_sessions: int = 64
    session_ttl_s: float = 300.0
    max_draft_tokens: int = 32
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_body_bytes: int = 1_000_000
    max_append_tokens: int = 256
    max_sessions_per_key: int | None = None  # None: a quarter of max_sessions (keyed callers only)
    tokens_per_minute_per_key: int | None = None  # None: unlimited
    kv_cache_budget_mb: float | Literal["auto"] | None = "auto"  # auto: a quarter of RAM; None: no budget
    prefill_chunk_tokens: int = 512  # long prompts are prefilled in chunks, so verifies interleave

    def per_key_sessions(self) -> int:
        return self.max_sessions_per_key or max(1, self.max_sessions // 4)

    def kv_budget_bytes(self) -> int | None:
        if self.kv_cache_budget_mb == "auto":
            return default_kv_budget_bytes()
        return None if self.kv_cache_budget_mb is None else int(self.kv_cache_budget_mb * 2**20)


def default_kv_budget_bytes(share: float = 0.25) -> int:
    """The default budget for all KV caches together: a quarter of this machine's memory (the
    model's weights, the activations and everything else keep the rest)."""
    return int(share * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class TokenBucket:
    capacity: float
    level: float
    updated: float

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + self.rate * max(0.0, now - self.updated))
        self.updated = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until `n` tokens are available (0: now). Does not take them."""
        self.refill(now)
        return 0.0 if self.level >= n else (n - self.level) / self.rate


class RateLimiter:
    def __init__(self, default_tokens_per_minute: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default_tokens_per_minute
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, principal: Principal) -> TokenBucket | None:
        tpm = principal.tokens_per_minute if principal.tokens_per_minute is not None else self.default
        if tpm is None:
            return None
        b = self._buckets.get(principal.id)
        if b is None or b.capacity != tpm:
            b = self._buckets[principal.id] = TokenBucket(capacity=float(tpm), level=float(tpm), updated=self.clock())
        return b

    def charge(self, principal: Principal, n: int, *, strict: bool = True) -> None:
        """Take n tokens from the key's bucket; strict: refuse (429, or 413 for more than a
        minute's worth) rather than go into debt."""
        b = self._bucket(principal)
        if b is None or n <= 0:
            return
        now = self.clock()
        if strict:
            if n > b.capacity:
                raise gateway_error(
                    "too_large", f"this request needs {n} tokens, more than key '{principal.id}' may use in a minute ({int(b.capacity)})"
                )
            wait = b.wait_for(n, now)
            if wait > 0:
                raise gateway_error(
                    "rate_limited",
                    f"key '{principal.id}' has used its {int(b.capacity)} tokens per minute; retry in {math.ceil(wait)} s",
                    detail={"retry_after_s": round(wait, 3), "tokens_per_minute": int(b.capacity), "needed": n},
                    retry_after_s=wait,
                )
        else:
            b.refill(now)
        b.level -= n

    def reserve(self, principal: Principal, now_tokens: int, want: int) -> int:
        """Take `now_tokens` (refusing as `charge` does) plus up to `want` more for work still to
        come; returns how many of those were reserved (`want` when the key is unlimited, at
        least 1). Give back the unused part with `refund`."""
        b = self._bucket(principal)
        if b is None:
            return want
        self.charge(principal, now_tokens + 1)  # refuses unless the prompt and one token fit
        b.level += 1
        granted = max(1, min(want, math.floor(b.level)))
        b.level -= granted
        return granted

    def refund(self, principal: Principal, n: int) -> None:
        b = self._bucket(principal)
        if b is not None and n > 0:
            b.refill(self.clock())
            b.level = min(b.capacity, b.level + n)


__all__ = ["TokenBucket", "RateLimiter", "GatewayLimits", "default_kv_budget_bytes"]
