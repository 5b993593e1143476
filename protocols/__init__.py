"""What travels between device and gateway: the wire messages (pydantic v2), the table of the
gateway's operations, the error tree, and the transports (in-process, HTTP, MQTT)."""

from .errors import *  # noqa: F403 - every error tandem raises is part of this package's face
from .errors import __all__ as _errors_all
from .messages import *  # noqa: F403 - the message classes are this package's public face
from .messages import __all__ as _messages_all
from .operations import OPERATIONS, Operation
from .transport import InProcessTransport, Transport

__all__ = [*_messages_all, *_errors_all, "OPERATIONS", "Operation", "Transport", "InProcessTransport"]
