"""Errors raised across the SDK, the transports and the gateway.

    TandemError
    ├── ModelLoadError            a model could not be found or loaded (names what is missing)
    ├── TokenizerMismatchError    drafter and target tokenizers differ where they must agree
    ├── GatewayError              the gateway answered with an error (has `.code` and `.status`)
    │   ├── UnknownSessionError   the session id is not (or no longer) known to the gateway      404
    │   │   └── SessionEvictedError  the gateway dropped it (idle TTL or KV-cache memory);     410
    │   │                            re-open it with `resume_tokens`
    │   ├── WrongPositionError    a verify named a position the session is not at              409
    │   ├── RequestTooLargeError  a limit was exceeded (prompt, draft length, body size)       413
    │   ├── AuthenticationError   no API key, or one the gateway does not know                 401
    │   └── RateLimitError        tokens per minute or sessions per key used up; has           429
    │                             `.retry_after_s` (also the Retry-After header)
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

    def __init__(self, code: str, message: str, status: int | None = None, detail=None, retry_after_s: float | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after_s = retry_after_s
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


class SessionEvictedError(UnknownSessionError):
    status = 410


class AuthenticationError(GatewayError):
    status = 401


class RateLimitError(GatewayError):
    status = 429


_BY_CODE: dict[str, tuple[type[GatewayError], int]] = {
    "bad_request": (GatewayError, 400),
    "unknown_session": (UnknownSessionError, 404),
    "wrong_position": (WrongPositionError, 409),
    "tokenizer_mismatch": (GatewayError, 409),
    "session_finished": (GatewayError, 409),
    "too_large": (RequestTooLargeError, 413),
    "unknown_model": (GatewayError, 404),
    "capacity": (RateLimitError, 429),
    "internal": (GatewayError, 500),
    "unauthorized": (AuthenticationError, 401),
    "rate_limited": (RateLimitError, 429),
    "session_limit": (RateLimitError, 429),
    "session_evicted": (SessionEvictedError, 410),
    "not_ready": (GatewayError, 503),
}


def gateway_error(code: str, message: str, detail=None, *, retry_after_s: float | None = None) -> GatewayError:
    """The exception class and HTTP status that belong to an error code."""
    cls, status = _BY_CODE.get(code, (GatewayError, 400))
    return cls(code, message, status=status, detail=detail, retry_after_s=retry_after_s)


def from_reply(reply: ErrorReply, retry_after_s: float | None = None) -> GatewayError:
    if retry_after_s is None and isinstance(reply.detail, dict):
        value = reply.detail.get("retry_after_s")
        retry_after_s = float(value) if isinstance(value, (int, float)) else None
    return gateway_error(reply.code, reply.message, reply.detail, retry_after_s=retry_after_s)


__all__ = [
    "TandemError",
    "ModelLoadError",
    "TokenizerMismatchError",
    "TransportError",
    "GatewayError",
    "UnknownSessionError",
    "WrongPositionError",
    "RequestTooLargeError",
    "SessionEvictedError",
    "AuthenticationError",
    "RateLimitError",
    "gateway_error",
    "from_reply",
]
