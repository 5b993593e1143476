"""Wire messages (pydantic v2) and the transports that carry them."""

from .errors import (
    GatewayError,
    ModelLoadError,
    RequestTooLargeError,
    TandemError,
    TokenizerMismatchError,
    TransportError,
    UnknownSessionError,
    WrongPositionError,
)
from .messages import *  # noqa: F403 - the message classes are this package's public face
from .messages import __all__ as _messages_all
from .transport import InProcessTransport, Transport

__all__ = [
    *_messages_all,
    "Transport",
    "InProcessTransport",
    "TandemError",
    "ModelLoadError",
    "TokenizerMismatchError",
    "TransportError",
    "GatewayError",
    "UnknownSessionError",
    "WrongPositionError",
    "RequestTooLargeError",
]
