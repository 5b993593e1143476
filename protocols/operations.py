"""The gateway's operations, in one table: request model -> reply model, HTTP route, handler.

Everything that carries a request to the gateway is derived from `OPERATIONS`: the in-process
transport, the HTTP client's paths, the gateway's FastAPI routes, the MQTT bridge's dispatch and
the protocol document. Adding an operation is one row here plus its handler method on the
gateway; no transport can forget it.

    operation      request            reply              HTTP
    open           OpenSession        SessionOpened      POST /v1/sessions
    verify         VerifyRequest      VerifyResult       POST /v1/sessions/verify
    verify_text    VerifyTextRequest  VerifyTextResult   POST /v1/sessions/verify_text
    append         AppendRequest      AppendResult       POST /v1/sessions/append
    close_session  CloseSession       SessionClosed      POST /v1/sessions/close
    generate       GenerateRequest    GenerateChunk...   POST /v1/generate (NDJSON stream)
    get_info       GetInfo            GatewayInfo        GET  /v1/info

A handler is the gateway method named like the operation: `async def verify(request, principal)`.
A streaming handler returns (after validating, before the first chunk) an async iterator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import BaseModel, Field, TypeAdapter

from .errors import gateway_error
from .messages import (
    AppendRequest,
    AppendResult,
    CloseSession,
    GatewayInfo,
    GenerateChunk,
    GenerateRequest,
    GetInfo,
    OpenSession,
    SessionClosed,
    SessionOpened,
    VerifyRequest,
    VerifyResult,
    VerifyTextRequest,
    VerifyTextResult,
)


@dataclass(frozen=True)
class Operation:
    name: str  # also the handler's method name on the gateway
    request: type[BaseModel]
    reply: type[BaseModel]
    path: str
    method: Literal["GET", "POST"] = "POST"
    streaming: bool = False  # the reply is a stream of `reply` messages, the last one `finished`
    summary: str = ""

    @property
    def session_bound(self) -> bool:
        """Whether requests name a session (their id then also travels in `x-tandem-session`)."""
        return "session_id" in self.request.model_fields


OPERATIONS: tuple[Operation, ...] = (
    Operation("open", OpenSession, SessionOpened, "/v1/sessions", summary="open a session: the prompt is prefilled"),
    Operation("verify", VerifyRequest, VerifyResult, "/v1/sessions/verify", summary="verify k draft tokens"),
    Operation("verify_text", VerifyTextRequest, VerifyTextResult, "/v1/sessions/verify_text",
              summary="verify drafted text (drafter and target tokenizers differ)"),
    Operation("append", AppendRequest, AppendResult, "/v1/sessions/append",
              summary="assist mode: take device tokens as they are, answer the target's next token"),
    Operation("close_session", CloseSession, SessionClosed, "/v1/sessions/close", summary="close a session"),
    Operation("generate", GenerateRequest, GenerateChunk, "/v1/generate", streaming=True,
              summary="cloud mode: the target generates alone (NDJSON stream of chunks)"),
    Operation("get_info", GetInfo, GatewayInfo, "/v1/info", method="GET",
              summary="the model, its tokenizer fingerprint and the gateway's limits"),
)

BY_REQUEST: dict[type[BaseModel], Operation] = {op.request: op for op in OPERATIONS}
BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}

# Any request, told apart by its `type` field (the MQTT bridge receives them all on one topic).
AnyRequest = Annotated[Union[tuple(op.request for op in OPERATIONS)], Field(discriminator="type")]  # noqa: UP007
REQUEST_ADAPTER: TypeAdapter = TypeAdapter(AnyRequest)


def operation_for(request: BaseModel) -> Operation:
    try:
        return BY_REQUEST[type(request)]
    except KeyError:
        raise gateway_error("bad_request", f"'{type(request).__name__}' is not a gateway request") from None


class GatewayHandler(Protocol):
    """What serves the operations: `remote_gateway.Gateway` (each method takes the request and the
    caller's principal, None for the anonymous one)."""

    async def open(self, request: OpenSession, principal: Any = None) -> SessionOpened: ...
    async def verify(self, request: VerifyRequest, principal: Any = None) -> VerifyResult: ...
    async def verify_text(self, request: VerifyTextRequest, principal: Any = None) -> VerifyTextResult: ...
    async def append(self, request: AppendRequest, principal: Any = None) -> AppendResult: ...
    async def close_session(self, request: CloseSession, principal: Any = None) -> SessionClosed: ...
    async def generate(self, request: GenerateRequest, principal: Any = None) -> AsyncIterator[GenerateChunk]: ...
    async def get_info(self, request: GetInfo, principal: Any = None) -> GatewayInfo: ...


async def dispatch(handler: GatewayHandler, request: BaseModel, principal: Any = None) -> Any:
    """Run `request` on `handler`: its reply, or (streaming operations) an async iterator of them."""
    op = operation_for(request)
    return await getattr(handler, op.name)(request, principal)


__all__ = [
    "Operation",
    "OPERATIONS",
    "BY_REQUEST",
    "BY_NAME",
    "AnyRequest",
    "REQUEST_ADAPTER",
    "GatewayHandler",
    "operation_for",
    "dispatch",
]
