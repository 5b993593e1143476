"""HTTP face of the gateway (FastAPI, served by uvicorn).

    GET  /healthz                  liveness
    GET  /v1/info                  model, tokenizer fingerprint, limits      -> GatewayInfo
    POST /v1/sessions              OpenSession                               -> SessionOpened
    POST /v1/sessions/verify       VerifyRequest                             -> VerifyResult
    POST /v1/sessions/verify_text  VerifyTextRequest (cross-tokenizer)       -> VerifyTextResult
    POST /v1/sessions/close        CloseSession                              -> SessionClosed
    POST /v1/generate              GenerateRequest -> NDJSON stream of GenerateChunk

Every error is an `ErrorReply` JSON body with a 4xx/5xx status: malformed JSON and schema
violations are 400 with the offending fields named, unknown sessions 404, wrong positions 409,
oversized bodies or drafts 413. Nothing a client sends takes the server down.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..protocols.errors import GatewayError, gateway_error
from ..protocols.messages import (
    CloseSession,
    ErrorReply,
    GatewayInfo,
    GenerateRequest,
    OpenSession,
    SessionClosed,
    SessionOpened,
    VerifyRequest,
    VerifyResult,
    VerifyTextRequest,
    VerifyTextResult,
)
from .service import Gateway

log = logging.getLogger("tandem.gateway")


def _error(err: GatewayError) -> JSONResponse:
    return JSONResponse(err.to_reply().model_dump(mode="json"), status_code=err.status)


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts)


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="tandem gateway", version="0.1.0", summary="Verifies drafted tokens with the target model.")
    app.state.gateway = gateway

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = gateway.limits.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(gateway_error("too_large", f"request body of {length} bytes exceeds the limit of {limit}"))
        return await call_next(request)

    @app.exception_handler(GatewayError)
    async def on_gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        gateway.stats["errors"] += 1
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        gateway.stats["errors"] += 1
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return _error(gateway_error("bad_request", _describe_validation(errors), detail=errors))

    @app.exception_handler(Exception)
    async def on_crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        gateway.stats["errors"] += 1
        return _error(gateway_error("internal", f"internal error: {type(exc).__name__}"))

    responses = {400: {"model": ErrorReply}, 404: {"model": ErrorReply}, 409: {"model": ErrorReply}, 413: {"model": ErrorReply}}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "sessions": len(gateway.sessions)}

    @app.get("/v1/info", response_model=GatewayInfo)
    async def info() -> GatewayInfo:
        return gateway.info()

    @app.post("/v1/sessions", response_model=SessionOpened, responses=responses)
    async def open_session(req: OpenSession) -> SessionOpened:
        return await gateway.open(req)

    @app.post("/v1/sessions/verify", response_model=VerifyResult, responses=responses)
    async def verify(req: VerifyRequest) -> VerifyResult:
        return await gateway.verify(req)

    @app.post("/v1/sessions/verify_text", response_model=VerifyTextResult, responses=responses)
    async def verify_text(req: VerifyTextRequest) -> VerifyTextResult:
        return await gateway.verify_text(req)

    @app.post("/v1/sessions/close", response_model=SessionClosed, responses=responses)
    async def close(req: CloseSession) -> SessionClosed:
        return await gateway.close_session(req)

    @app.post("/v1/generate", responses=responses)
    async def generate(req: GenerateRequest) -> StreamingResponse:
        chunks = await gateway.generate(req)

        async def ndjson():
            async for chunk in chunks:
                yield chunk.model_dump_json() + "\n"

        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    return app


def serve(gateway: Gateway, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(gateway), host=host, port=port, log_level=log_level)


__all__ = ["create_app", "serve"]
