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
rate or count limit (with Retry-After), 408 a body too slow to arrive, 403 a Host not allowed.
Nothing a client sends takes the server down. What happens before a handler runs (the API key,
checked before the body is read; size and time limits; slow clients) is in edge.py.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..protocols.errors import GatewayError, gateway_error
from ..protocols.messages import ErrorReply
from ..protocols.operations import OPERATIONS, Operation, dispatch
from .auth import KeyRing, Principal
from .edge import Edge, EdgeLimits, error_response, uvicorn_config
from .service import Gateway

log = logging.getLogger("tandem.gateway")

def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts)


def create_app(gateway: Gateway, keys: KeyRing | None = None, edge: EdgeLimits | None = None) -> FastAPI:
    keys = keys or KeyRing(required=False)
    edge = edge or EdgeLimits()
    gateway.auth_required = keys.required
    docs = {} if edge.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="tandem gateway", version="0.2.0", summary="Verifies drafted tokens with the target model.", **docs)
    app.state.gateway = gateway
    app.state.edge = edge  # the server's limits too (uvicorn_config), wherever the app is served
    app.add_middleware(Edge, gateway=gateway, keys=keys, limits=edge)

    async def principal(request: Request) -> Principal:
        """The caller, authenticated by the edge before the body was read."""
        who = request.scope.get("state", {}).get("principal")
        return who if who is not None else keys.authenticate(request.headers.get("authorization"))

    def count_error(err: GatewayError) -> None:
        gateway.stats["errors"] += 1
        gateway.metrics.errors.labels(err.code).inc()

    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        count_error(exc)
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        err = gateway_error("bad_request", _describe_validation(errors), detail={"errors": errors, "param": param or None})
        count_error(err)
        return error_response(err, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {413: "too_large", 401: "unauthorized", 404: "not_found", 408: "timeout"}.get(exc.status_code, "bad_request")
        err = GatewayError(str(exc.detail), code=code, status=exc.status_code)
        count_error(err)
        return error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        # where it failed, never what it failed on: an exception's message and locals can hold
        # the caller's prompt or token ids
        where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-6:])
        log.error("unhandled %s on %s at %s", type(exc).__name__, request.url.path, where)
        err = gateway_error("internal", f"internal error: {type(exc).__name__}")
        count_error(err)
        return error_response(err, request.url.path)

    errors = {s: {"model": ErrorReply} for s in (400, 401, 404, 409, 410, 413, 429)}
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "sessions": len(gateway.sessions)}

    @app.get("/readyz", responses={503: {"model": ErrorReply}})
    async def readyz() -> JSONResponse:
        if gateway.ready:
            return JSONResponse({"status": "ready", "model": gateway.model_name, "replica": gateway.replica_id})
        return error_response(gateway_error("not_ready", "the gateway is starting or draining"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)

    for op in OPERATIONS:
        responses = {**errors, 200: {"links": SESSION_LINKS}} if op.name == "open" else errors
        app.add_api_route(
            op.path, _endpoint(op, gateway, principal), methods=[op.method], responses=responses, summary=op.summary,
            response_model=None if op.streaming else op.reply, name=op.name, operation_id=op.name,
        )

    from .openai_api import openai_router

    app.include_router(openai_router(gateway, principal))
    return app


# OpenAPI links from an opened session to what can follow it, so that a stateful client (a
# schemathesis state machine in the tests) chains open -> verify / append -> close on real ids
_SESSION = {"session_id": "$response.body#/session_id", "position": "$response.body#/position"}
SESSION_LINKS = {
    "verify": {"operationId": "verify", "requestBody": {**_SESSION, "draft_tokens": [], "draft_probs": []}},
    "append": {"operationId": "append", "requestBody": {**_SESSION, "tokens": []}},
    "close": {"operationId": "close_session", "requestBody": {"session_id": "$response.body#/session_id"}},
}


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
    edge: EdgeLimits | None = None,
) -> None:
    import uvicorn

    from .logs import configure_logging

    configure_logging(log_level, log_format)
    app = create_app(gateway, keys, edge)
    config = uvicorn_config(app, app.state.edge, host=host, port=port, log_level=log_level, log_config=None)
    uvicorn.Server(config).run()


__all__ = ["create_app", "serve"]
