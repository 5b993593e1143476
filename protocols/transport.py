"""Transports move protocol messages between a device and a gateway; the client owns the policy.

A transport has one request method for the unary operations, one for the streaming one (`cloud`
mode), and close; which reply type and route belong to a request comes from the table in
`operations.py`. Every implementation counts the bytes it moves and the round trips it makes, so
`Usage` reports the same figures whatever the wire:

    InProcessTransport   calls a gateway object in the same process (messages still go through
                         their JSON form, so sizes and validation match the wire)
    HttpTransport        httpx over HTTP/1.1 keep-alive (protocols/http.py)
    MqttTransport        through an MQTT broker to the gateway's bridge (protocols/mqtt.py)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import TransportError, gateway_error
from .messages import GatewayInfo, GenerateChunk, GenerateRequest, GetInfo
from .operations import GatewayHandler, dispatch, operation_for


class Transport(ABC):
    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.round_trips = 0

    @abstractmethod
    async def request(self, msg: BaseModel) -> Any:
        """Send one request of a unary operation; return its reply or raise a GatewayError /
        TransportError."""

    @abstractmethod
    def stream(self, msg: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """`cloud` mode: the gateway's own generation, chunk by chunk."""

    async def info(self) -> GatewayInfo:
        return await self.request(GetInfo())

    async def aclose(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class InProcessTransport(Transport):
    def __init__(self, gateway: GatewayHandler) -> None:
        super().__init__()
        self.gateway = gateway
        self._closed = False

    def _wire(self, msg: BaseModel) -> BaseModel:
        """The request as the gateway would receive it: serialised, counted, parsed again."""
        if self._closed:
            raise TransportError("transport is closed")
        body = msg.model_dump_json()
        self.bytes_up += len(body)
        self.round_trips += 1
        try:
            return type(msg).model_validate_json(body)
        except ValidationError as exc:
            raise gateway_error("bad_request", str(exc)) from exc

    def _back(self, reply: BaseModel) -> Any:
        body = reply.model_dump_json()
        self.bytes_down += len(body)
        return type(reply).model_validate_json(body)

    async def request(self, msg: BaseModel) -> Any:
        if operation_for(msg).streaming:
            raise TypeError(f"{type(msg).__name__} is a streaming request: use stream()")
        return self._back(await dispatch(self.gateway, self._wire(msg)))

    async def stream(self, msg: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        async for chunk in await dispatch(self.gateway, self._wire(msg)):
            yield self._back(chunk)

    async def aclose(self) -> None:
        self._closed = True


__all__ = ["Transport", "InProcessTransport"]
