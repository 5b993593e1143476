"""The HTTP transport: httpx with one keep-alive connection pool per client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from .errors import TransportError, from_reply, gateway_error
from .messages import ErrorReply, GenerateChunk, GenerateRequest
from .operations import operation_for
from .transport import Transport

# Session-bound requests repeat their session id in this header, so a load balancer can route them
# to the replica that holds the session (sticky routing) without parsing bodies.
SESSION_HEADER = "x-tandem-session"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# A status without an ErrorReply body: a proxy in front of the gateway had no replica to ask.
_UNAVAILABLE = frozenset({502, 503, 504})

# The API key when the caller gives none (like OPENAI_API_KEY): `Bearer $TANDEM_API_KEY`.
API_KEY_ENV = "TANDEM_API_KEY"


def parse_chunk(line: str | bytes) -> GenerateChunk:
    """One line of a generate stream: a chunk, or the error that ended the stream."""
    try:
        return GenerateChunk.model_validate_json(line)
    except ValidationError:
        try:
            reply = ErrorReply.model_validate_json(line)
        except ValidationError as exc:
            raise gateway_error("internal", f"malformed line in the gateway's stream: {str(line)[:200]}") from exc
        raise from_reply(reply) from None


class HttpTransport(Transport):
    """`headers` go with every request; without an `authorization` header, the key in the
    TANDEM_API_KEY environment variable (if set) is sent as `Bearer <key>`."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 60.0,
        headers: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        headers = dict(headers or {})
        if not any(k.lower() == "authorization" for k in headers) and os.environ.get(API_KEY_ENV):
            headers["authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        self._client = client or httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            headers=headers,
            limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=60.0),
        )

    def _raise_for(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            reply = ErrorReply.model_validate_json(response.content)
        except ValidationError:
            reply = None
        if reply is not None:
            raise from_reply(reply, _retry_after(response))
        if response.status_code in _UNAVAILABLE:
            # not the gateway's own answer: a load balancer (or proxy) in front of it found no
            # replica to answer; as retryable as a connection that failed
            raise TransportError(f"{self.base_url} answered HTTP {response.status_code} (no gateway replica answered)")
        raise gateway_error("internal", f"gateway answered HTTP {response.status_code}: {response.text[:200]}")

    async def request(self, msg: BaseModel) -> Any:
        op = operation_for(msg)
        headers = {}
        if op.method == "GET":
            body = b""
        else:
            body = msg.model_dump_json().encode()
            headers["content-type"] = "application/json"
        if op.session_bound:
            headers[SESSION_HEADER] = msg.session_id
        try:
            response = await self._client.request(op.method, op.path, content=body or None, headers=headers)
        except httpx.TimeoutException as exc:
            raise TransportError(f"gateway at {self.base_url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise TransportError(f"cannot reach gateway at {self.base_url}: {exc}") from exc
        self.bytes_up += len(body)
        self.bytes_down += len(response.content)
        self.round_trips += 1
        self._raise_for(response)
        return op.reply.model_validate_json(response.content)

    async def stream(self, msg: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        body = msg.model_dump_json().encode()
        self.bytes_up += len(body)
        self.round_trips += 1
        try:
            async with self._client.stream(
                "POST", operation_for(msg).path, content=body, headers={"content-type": "application/json"}
            ) as response:
                if not response.is_success:
                    await response.aread()
                    self.bytes_down += len(response.content)
                    self._raise_for(response)
                finished = False
                async for line in response.aiter_lines():
                    if line.strip():
                        self.bytes_down += len(line) + 1
                        chunk = parse_chunk(line)
                        finished = chunk.finished
                        yield chunk
                if not finished:  # a proxy may end a reply cleanly when its replica died mid-stream
                    raise TransportError(f"the stream from {self.base_url} ended before its last chunk")
        except httpx.TimeoutException as exc:
            raise TransportError(f"gateway at {self.base_url} stopped answering mid-stream") from exc
        except httpx.TransportError as exc:
            raise TransportError(f"lost the gateway at {self.base_url}: {exc}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


__all__ = ["HttpTransport", "SESSION_HEADER"]
