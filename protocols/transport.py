"""Transports move protocol messages between a device and a gateway; the client owns the policy.

A transport has one request method (plus streaming for `cloud` mode, and close). Every
implementation counts the bytes it moves and the round trips it makes, so `Usage` reports the
same figures whatever the wire:

    InProcessTransport   calls a gateway object in the same process (messages still go through
                         their JSON form, so sizes and validation match the wire)
    HttpTransport        httpx over HTTP/1.1 keep-alive (protocols/http.py)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar, Union

from pydantic import BaseModel, ValidationError

from .errors import GatewayError, TransportError, gateway_error
from .messages import (
    AppendRequest,
    AppendResult,
    CloseSession,
    GatewayInfo,
    GenerateChunk,
    GenerateRequest,
    OpenSession,
    SessionClosed,
    SessionOpened,
    VerifyRequest,
    VerifyResult,
    VerifyTextRequest,
    VerifyTextResult,
)

Request = Union[OpenSession, VerifyRequest, VerifyTextRequest, AppendRequest, CloseSession]
Reply = Union[SessionOpened, VerifyResult, VerifyTextResult, AppendResult, SessionClosed]
R = TypeVar("R", bound=BaseModel)

REPLY_TYPE: dict[type, type] = {
    OpenSession: SessionOpened,
    VerifyRequest: VerifyResult,
    VerifyTextRequest: VerifyTextResult,
    AppendRequest: AppendResult,
    CloseSession: SessionClosed,
}


class Transport(ABC):
    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.round_trips = 0

    @abstractmethod
    async def request(self, msg: Request) -> Reply:
        """Send one message; return its reply or raise a GatewayError / TransportError."""

    @abstractmethod
    def stream(self, msg: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """`cloud` mode: the gateway's own generation, chunk by chunk."""

    @abstractmethod
    async def info(self) -> GatewayInfo: ...

    async def aclose(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class GatewayHandler(Protocol):
    """What InProcessTransport needs from a gateway (remote_gateway.Gateway has it)."""

    async def open(self, req: OpenSession) -> SessionOpened: ...
    async def verify(self, req: VerifyRequest) -> VerifyResult: ...
    async def verify_text(self, req: VerifyTextRequest) -> VerifyTextResult: ...
    async def append(self, req: AppendRequest) -> AppendResult: ...
    async def close_session(self, req: CloseSession) -> SessionClosed: ...
    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...
    def info(self) -> GatewayInfo: ...


class InProcessTransport(Transport):
    def __init__(self, gateway: GatewayHandler) -> None:
        super().__init__()
        self.gateway = gateway
        self._closed = False

    def _wire(self, msg: BaseModel, reply_type: type[R]) -> tuple[BaseModel, type[R]]:
        if self._closed:
            raise TransportError("transport is closed")
        body = msg.model_dump_json()
        self.bytes_up += len(body)
        try:
            return type(msg).model_validate_json(body), reply_type
        except ValidationError as exc:
            raise gateway_error("bad_request", str(exc)) from exc

    def _back(self, reply: R) -> R:
        body = reply.model_dump_json()
        self.bytes_down += len(body)
        return type(reply).model_validate_json(body)

    async def request(self, msg: Request) -> Reply:
        received, _ = self._wire(msg, REPLY_TYPE[type(msg)])
        self.round_trips += 1
        handler = {
            OpenSession: self.gateway.open,
            VerifyRequest: self.gateway.verify,
            VerifyTextRequest: self.gateway.verify_text,
            AppendRequest: self.gateway.append,
            CloseSession: self.gateway.close_session,
        }[type(msg)]
        return self._back(await handler(received))

    async def stream(self, msg: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        received, _ = self._wire(msg, GenerateChunk)
        self.round_trips += 1
        async for chunk in await self.gateway.generate(received):
            yield self._back(chunk)

    async def info(self) -> GatewayInfo:
        return self.gateway.info()

    async def aclose(self) -> None:
        self._closed = True


__all__ = ["Transport", "InProcessTransport", "GatewayHandler", "Request", "Reply", "GatewayError", "TransportError"]
