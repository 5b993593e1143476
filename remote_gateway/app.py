"""HTTP face of the gateway (FastAPI, served by uvicorn).

    GET  /healthz                  liveness (the process answers)
    GET  /readyz                   readiness (model loaded, worker running, not draining): 200 or 503
    GET  /metrics                  Prometheus text format (metrics.py)
    /v1/info, /v1/sessions/...     the gateway's operations, one route each, derived from the
    /v1/generate                   table in protocols/operations.py
    GET  /v1/models                OpenAI-compatible model list              (openai_api.py)
    POST /v1/chat/completions      OpenAI-compatible chat, streaming (SSE) or not

Every /v1 route needs `authorization: Bearer <key>` when the gateway has keys (401 otherwise),
and a session answers only to the key that opened it (any other key: 404, as for an id that
does not exist). Every error is an `ErrorReply` JSON body (OpenAI's error shape on the OpenAI
routes): 400 malformed (naming the field), 401 no or unknown key, 404 unknown session, 409 wrong
position, 410 session evicted (re-open with resume_tokens), 413 over a size limit, 429 over a
rate or count limit (with Retry-After). Nothing a client sends takes the server down.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..protocols.errors import GatewayError, gateway_error
from ..protocols.messages import ErrorReply
from ..protocols.operations import OPERATIONS, Operation, dispatch
from .auth import KeyRing, Principal
from .service import Gateway

log = logging.getLogger("tandem.gateway")
access_log = logging.getLogger("tandem.gateway.access")

_OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


def _headers(err: GatewayError) -> dict[str, str]:
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tandem"'
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return headers


def _error(err: GatewayError, path: str = "") -> JSONResponse:
    if path.startswith(_OPENAI_PATHS):
        body = {"error": {"message": err.message, "type": err.code, "code": err.code, "param": None}}
    else:
        body = err.to_reply().model_dump(mode="json")
    return JSONResponse(body, status_code=err.status, headers=_headers(err))


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts)


class _Edge:
    """Pure ASGI middleware in front of everything: the body-size limit (by Content-Length, and
    by counting for bodies sent without one), per-route request metrics and the access log."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.gateway.limits.max_body_bytes
        t0 = time.perf_counter()
        status = {"code": 500}
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit():
                err = gateway_error("too_large", f"request body of {length.decode()} bytes exceeds the limit of {limit}")
            else:
                err = gateway_error("bad_request", "the content-length header is not a number")
            await _error(err, scope.get("path", ""))(scope, receive, send)
            self._record(scope, err.status, t0)
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        async def recorded_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted_receive, recorded_send)
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


def create_app(gateway: Gateway, keys: KeyRing | None = None) -> FastAPI:
    keys = keys or KeyRing(required=False)
    gateway.auth_required = keys.required
    app = FastAPI(title="tandem gateway", version="0.2.0", summary="Verifies drafted tokens with the target model.")
    app.state.gateway = gateway
    app.add_middleware(_Edge, gateway=gateway)

    async def principal(request: Request) -> Principal:
        who = keys.authenticate(request.headers.get("authorization"))
        request.state.key = who.id
        request.state.session = request.headers.get("x-tandem-session")
        return who

    def count_error(err: GatewayError) -> None:
        gateway.stats["errors"] += 1
        gateway.metrics.errors.labels(err.code).inc()

    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        count_error(exc)
        return _error(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        err = gateway_error("bad_request", _describe_validation(errors), detail=errors)
        count_error(err)
        return _error(err, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {413: "too_large", 401: "unauthorized", 404: "not_found"}.get(exc.status_code, "bad_request")
        err = GatewayError(str(exc.detail), code=code, status=exc.status_code)
        count_error(err)
        return _error(err, request.url.path)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = gateway_error("internal", f"internal error: {type(exc).__name__}")
        count_error(err)
        return _error(err, request.url.path)

    errors = {s: {"model": ErrorReply} for s in (400, 401, 404, 409, 410, 413, 429)}
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "sessions": len(gateway.sessions)}

    @app.get("/readyz", responses={503: {"model": ErrorReply}})
    async def readyz() -> JSONResponse:
        if gateway.ready:
            return JSONResponse({"status": "ready", "model": gateway.model_name, "replica": gateway.replica_id})
        return _error(gateway_error("not_ready", "the gateway is starting or draining"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)

    for op in OPERATIONS:
        app.add_api_route(
            op.path, _endpoint(op, gateway, principal), methods=[op.method], responses=errors, summary=op.summary,
            response_model=None if op.streaming else op.reply, name=op.name,
        )

    from .openai_api import openai_router

    app.include_router(openai_router(gateway, principal))
    return app


def _endpoint(op: Operation, gateway: Gateway, principal: Callable) -> Callable:
    """The route handler of one operation: the body parsed as its request model (a GET
    operation has none), the caller authenticated, the gateway's handler called through the
    table; a streaming operation answers NDJSON, one reply model per line."""

    async def endpoint(who: Principal, req=None):
        result = await dispatch(gateway, req if req is not None else op.request(), who)
        if not op.streaming:
            return result

        async def ndjson():
            try:
                async for chunk in result:
                    yield chunk.model_dump_json() + "\n"
            except GatewayError as exc:  # the status line has gone: the error is the stream's last line
                yield exc.to_reply().model_dump_json() + "\n"

        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    params = [inspect.Parameter("who", inspect.Parameter.KEYWORD_ONLY, default=Depends(principal), annotation=Principal)]
    if op.method != "GET":
        params.append(inspect.Parameter("req", inspect.Parameter.KEYWORD_ONLY, annotation=op.request))
    endpoint.__signature__ = inspect.Signature(params)  # what FastAPI reads to parse and document
    endpoint.__name__ = op.name
    return endpoint


def serve(
    gateway: Gateway,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    *,
    keys: KeyRing | None = None,
    log_format: str = "json",
) -> None:
    import uvicorn

    from .logs import configure_logging

    configure_logging(log_level, log_format)
    uvicorn.run(create_app(gateway, keys), host=host, port=port, log_level=log_level, log_config=None)


__all__ = ["create_app", "serve"]
