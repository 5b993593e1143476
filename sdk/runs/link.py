"""The device's side of a gateway: what every run needs from it, in one place.

    request(msg)         send with retries: a reply lost in transit is asked for again
                         unchanged (the gateway answers a repeated verify with its first reply,
                         so a session never advances twice)
    open(msg, probe)     open a session; None when the gateway cannot be reached and the device
                         may go on alone (`fallback="local"`), else TransportError
    session_lost(exc)    the rule for a failed session-bound request: re-open the session (from
                         what the run has accepted) and go on, or give up (see below)
    close(session_id)    best effort: a close that fails changes nothing for the caller
    shares_tokenizer(f)  whether the target tokenises like the drafter (fingerprint f): verify
                         token ids, or text
    measure_rtt()        one light round trip (GET /v1/info), folded into the link estimate
    counting()           the bytes one run moved up and down (a context that adds them to Usage)
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from typing import Any, Literal

from ...protocols.errors import GatewayError, TandemError, TransportError, UnknownSessionError
from ...protocols.messages import CloseSession, OpenSession
from ...protocols.transport import Transport
from ..estimates import LinkEstimate
from ..usage import Usage


def unreachable(exc: BaseException) -> bool:
    """Whether a request failed because no gateway could answer it: nothing reached one or came
    back in time (TransportError, also what a load balancer's own 502/503/504 becomes), or the
    one that answered is not ready (503 `not_ready`: starting or draining)."""
    return isinstance(exc, TransportError) or (isinstance(exc, GatewayError) and exc.status in (502, 503, 504))


def session_lost(exc: BaseException) -> bool:
    """Whether a failed session-bound request means its session is gone, so that a run re-opens
    one with everything it has accepted (`resume_tokens`, `resume_text`, or its prompt plus its
    tokens) and goes on: the gateway forgot or dropped the session (404, 410; also a survivor
    behind a load balancer answering for a replica that died, 410 reason `replica`), or the
    replica holding it could not answer (`unreachable`). Only when that re-open cannot reach a
    gateway either does the device go on alone (`GatewayLink.open`). Other errors are the run's."""
    return isinstance(exc, UnknownSessionError) or unreachable(exc)


class GatewayLink:
    def __init__(
        self,
        transport: Transport,
        *,
        retries: int = 2,
        fallback: Literal["local", "error"] = "local",
        probe_timeout_s: float = 2.0,
        estimate: LinkEstimate | None = None,
    ) -> None:
        self.transport = transport
        self.retries = retries
        self.fallback = fallback
        self.probe_timeout_s = probe_timeout_s
        self.estimate = estimate if estimate is not None else LinkEstimate()
        self._fingerprint: str | None = None
        self.max_draft_tokens: int | None = None  # the gateway's limit on one verify's drafts, once known
        self._rtt_samples = 0

    async def request(self, msg: Any) -> Any:
        attempts = 1 + self.retries
        for attempt in range(attempts):
            try:
                return await self.transport.request(msg)
            except TransportError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)

    async def open(self, msg: OpenSession, *, probe: bool = False) -> str | None:
        """The new session's id; None when the gateway is away (`unreachable`) and the device may
        go on alone. A probe (trying to rejoin) waits at most `probe_timeout_s` and is not retried."""
        try:
            if probe:
                opened = await asyncio.wait_for(self.transport.request(msg), self.probe_timeout_s)
            else:
                opened = await self.request(msg)
        except (TandemError, asyncio.TimeoutError) as exc:
            if isinstance(exc, TandemError) and not unreachable(exc):
                raise
            if self.fallback != "local":
                raise TransportError(f"gateway unreachable and fallback is '{self.fallback}': {exc}") from exc
            return None
        return opened.session_id

    async def close(self, session_id: str | None) -> None:
        if session_id is None:
            return
        try:
            await self.transport.request(CloseSession(session_id=session_id))
        except TandemError:
            pass

    async def shares_tokenizer(self, fingerprint: str) -> bool:
        """Unknown (gateway away) counts as shared: token space, and the fallback takes over if
        the gateway stays away."""
        if self._fingerprint is None:
            try:
                info = await self.transport.info()
            except TransportError:
                return True
            self._fingerprint, self.max_draft_tokens = info.tokenizer_fingerprint, info.max_draft_tokens
        return self._fingerprint == fingerprint

    @property
    def rtt_measured(self) -> bool:
        return self._rtt_samples > 0

    async def measure_rtt(self) -> float | None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self.transport.info(), self.probe_timeout_s)
        except (TransportError, asyncio.TimeoutError):
            return None
        rtt = time.perf_counter() - t0
        self.estimate.observe_rtt(rtt, first=self._rtt_samples == 0)
        self._rtt_samples += 1
        return rtt

    @contextmanager
    def counting(self, usage: Usage):
        """Add the bytes moved inside the block to `usage` (also when it fails half-way)."""
        up, down = self.transport.bytes_up, self.transport.bytes_down
        try:
            yield
        finally:
            usage.bytes_up += self.transport.bytes_up - up
            usage.bytes_down += self.transport.bytes_down - down


__all__ = ["GatewayLink", "session_lost", "unreachable"]
