"""Errors raised across the SDK, the transports and the gateway.

    TandemError
    ├── ModelLoadError            a model could not be found or loaded (names what is missing)
    ├── TokenizerMismatchError    drafter and target tokenizers differ where they must agree
    ├── GatewayError              the gateway answered with an error (has `.code` and `.status`)
    │   ├── UnknownSessionError   the session id is not (or no longer) known to the gateway
    │   ├── WrongPositionError    a verify named a position the session is not at
    │   └── RequestTooLargeError  a limit was exceeded (prompt, draft length, body size)
    └── TransportError            the gateway could not be reached or did not answer in time

Lower-level exceptions (httpx, pydantic) are mapped to the most specific of these with
`raise ... from exc`, so callers catch one family.
"""

from __future__ import annotations

from .messages import ErrorReply


class TandemError(Exception):
    """Base of every error tandem raises on purpose."""


class ModelLoadError(TandemError):
    pass


class TokenizerMismatchError(TandemError):
    pass


class TransportError(TandemError):
    pass


class GatewayError(TandemError):
    status: int = 400

    def __init__(self, code: str, message: str, status: int | None = None, detail=None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, message=self.message, detail=self.detail)


class UnknownSessionError(GatewayError):
    status = 404


class WrongPositionError(GatewayError):
    status = 409


class RequestTooLargeError(GatewayError):
    status = 413


_BY_CODE: dict[str, tuple[type[GatewayError], int]] = {
    "bad_request": (GatewayError, 400),
    "unknown_session": (UnknownSessionError, 404),
    "wrong_position": (WrongPositionError, 409),
    "tokenizer_mismatch": (GatewayError, 409),
    "session_finished": (GatewayError, 409),
    "too_large": (RequestTooLargeError, 413),
    "unknown_model": (GatewayError, 404),
    "capacity": (GatewayError, 429),
    "internal": (GatewayError, 500),
}


def gateway_error(code: str, message: str, detail=None) -> GatewayError:
    """The exception class and HTTP status that belong to an error code."""
    cls, status = _BY_CODE.get(code, (GatewayError, 400))
    return cls(code, message, status=status, detail=detail)


def from_reply(reply: ErrorReply) -> GatewayError:
    return gateway_error(reply.code, reply.message, reply.detail)


__all__ = [
    "TandemError",
    "ModelLoadError",
    "TokenizerMismatchError",
    "TransportError",
    "GatewayError",
    "UnknownSessionError",
    "WrongPositionError",
    "RequestTooLargeError",
    "gateway_error",
    "from_reply",
]
