"""The gateway's edge: what happens to a connection and a request before any handler runs.

Two layers, each doing what only it can:

- `GuardedH11Protocol`, uvicorn's HTTP/1.1 protocol with two deadlines uvicorn lacks: a client
  must finish sending a request's headers within `header_timeout_s` of connecting (or of its
  previous response), and a client that stops reading its response (the socket's send buffer
  stays full) for `send_timeout_s` is dropped. Neither holds the event loop, so a slow or silent
  client costs the others nothing. uvicorn itself caps concurrent connections
  (`limit_concurrency`: 503 beyond it), idle keep-alive (`timeout_keep_alive`) and header size
  (`h11_max_incomplete_event_size`); `uvicorn_config` sets all of them from `EdgeLimits`.
- `Edge`, pure ASGI middleware in front of the app. In order: the Host allow-list (403); the API
  key, checked before a byte of the body is read (401); the body-size limit, by Content-Length and
  by counting for bodies sent without one (413); a deadline for the whole body (408); then
  per-route metrics and the access log (method, path, status, duration, key id, session id:
  never a prompt or a token).

Every refusal is the gateway's error model (`ErrorReply`, or OpenAI's error shape on the OpenAI
routes), never a bare text page.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..protocols.errors import GatewayError, gateway_error
from .auth import KeyRing

access_log = logging.getLogger("tandem.gateway.access")

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


@dataclass
class EdgeLimits:
    """Connection and request limits at the edge (the config's `edge:` section)."""

    max_connections: int = 256  # concurrent connections; beyond: 503
    keepalive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # ... and its body within this of its headers (else 408)
    send_timeout_s: float = 30.0  # a client that reads nothing of its response for this is dropped
    max_header_bytes: int = 16_384  # all of a request's headers together
    allowed_hosts: list[str] | None = None  # Host header allow-list ("*.example.com" allowed); None: any
    metrics_need_key: bool = False  # /metrics answers only with a valid API key
    docs_need_key: bool = False  # /docs, /redoc and /openapi.json answer only with a valid API key
    docs: bool = True  # serve /docs, /redoc and /openapi.json at all
    extra: dict = field(default_factory=dict)  # further uvicorn.Config keywords (tests)


def error_response(err: GatewayError, path: str = "") -> JSONResponse:
    """`err` as the gateway's error model (OpenAI's shape on the OpenAI routes)."""
    if path.startswith(OPENAI_PATHS):
        param = err.detail.get("param") if isinstance(err.detail, dict) else None
        body = {"error": {"message": err.message, "type": err.code, "code": err.code, "param": param}}
    else:
        body = err.to_reply().model_dump(mode="json")
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tandem"'
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return JSONResponse(body, status_code=err.status, headers=headers)


def host_allowed(host: str, allowed: list[str] | None) -> bool:
    """Whether a Host header (port stripped) matches the allow-list: exact, or `*.domain`."""
    if allowed is None or "*" in allowed:
        return True
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    name = name.lower()
    for pattern in allowed:
        pattern = pattern.lower()
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class Edge:
    def __init__(self, app, gateway, keys: KeyRing, limits: EdgeLimits) -> None:
        self.app = app
        self.gateway = gateway
        self.keys = keys
        self.limits = limits

    def _needs_key(self, path: str) -> bool:
        if path.startswith("/v1/"):
            return True
        if path == "/metrics":
            return self.limits.metrics_need_key
        if path.startswith(DOCS_PATHS):
            return self.limits.docs_need_key
        return False

    def _refusal(self, scope) -> GatewayError | None:
        """Why this request is refused before its body is read, if it is."""
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.limits.allowed_hosts):
            return gateway_error("forbidden", "this gateway does not answer for that Host")
        path = scope.get("path", "")
        if self._needs_key(path):
            try:
                who = self.keys.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None)
            except GatewayError as err:
                return err
            scope.setdefault("state", {})["principal"] = who
            scope["state"]["key"] = who.id
        scope.setdefault("state", {})["session"] = headers.get(b"x-tandem-session", b"").decode("latin-1")[:128] or None
        limit = self.gateway.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return gateway_error("bad_request", "the content-length header is not a number")
            if int(length) > limit:
                return gateway_error("too_large", f"request body of {length.decode()} bytes exceeds the limit of {limit}")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}
        err = self._refusal(scope)
        if err is not None:
            self.gateway.metrics.errors.labels(err.code).inc()
            await error_response(err, scope.get("path", ""))(scope, receive, send)
            self._record(scope, err.status, t0)
            return
        limit, deadline = self.gateway.limits.max_body_bytes, time.monotonic() + self.limits.body_timeout_s
        seen, body_done = 0, False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body: only http.disconnect comes, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise StarletteHTTPException(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body exceeds the limit of {limit} bytes")
                body_done = not message.get("more_body", False)
            return message

        async def recorded_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, guarded_receive, recorded_send)
        finally:
            self._record(scope, status["code"], t0)

    def _record(self, scope, status: int, t0: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        seconds = time.perf_counter() - t0
        m = self.gateway.metrics
        m.requests.labels(route, str(status)).inc()
        m.request_seconds.labels(route).observe(seconds)
        state = scope.get("state") or {}
        access_log.info(
            "%s %s %d", scope.get("method"), scope.get("path"), status,
            extra={"method": scope.get("method"), "path": scope.get("path"), "status": status,
                   "ms": round(seconds * 1000, 2), "key": state.get("key"), "session": state.get("session")},
        )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a stalled-reader deadline (class
    attributes; `uvicorn_config` makes a subclass with the configured values)."""

    header_timeout_s: float = 10.0
    send_timeout_s: float = 30.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_deadline = None
        self._send_deadline = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel("_header_deadline")  # the headers are in: the request is being served
        else:
            self._arm_header_deadline()  # bytes of a next request, not yet complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel("_header_deadline")  # the keep-alive timeout covers the idle time now

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout_s, self._drop)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel("_send_deadline")

    def connection_lost(self, exc) -> None:
        self._cancel("_header_deadline")
        self._cancel("_send_deadline")
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None and self.header_timeout_s > 0:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self._drop()

    def _drop(self) -> None:
        self._send_deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _cancel(self, name: str) -> None:
        handle = getattr(self, name, None)
        if handle is not None:
            handle.cancel()
            setattr(self, name, None)


def uvicorn_config(app, limits: EdgeLimits, **options):
    """A uvicorn.Config for `app` with the edge limits applied (the guarded h11 protocol, the
    connection cap, the keep-alive and header-size limits); `options` are uvicorn's own."""
    import uvicorn

    protocol = type(
        "GuardedH11", (GuardedH11Protocol,),
        {"header_timeout_s": limits.header_timeout_s, "send_timeout_s": limits.send_timeout_s},
    )
    return uvicorn.Config(
        app, http=protocol, limit_concurrency=limits.max_connections, timeout_keep_alive=limits.keepalive_timeout_s,
        h11_max_incomplete_event_size=limits.max_header_bytes, **{**limits.extra, **options},
    )


__all__ = ["Edge", "EdgeLimits", "GuardedH11Protocol", "error_response", "host_allowed", "uvicorn_config"]
