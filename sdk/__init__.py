"""What apps embed: the Client, its modes, Usage accounting, and every error tandem raises.

    client.py      Client / SyncClient: resources, mode choice, one link estimate
    runs/          one generation of each mode (speculative in tokens or text, assist, local, cloud)
    auto.py        predicted cost of each mode, and auto's choice; estimates.py: the link estimate
    taskgraph/     graphs of LLM calls spread over devices through an MQTT broker
    cli/, bench/   the `tandem` command and the benchmarks (they tie every package together)
"""

from ..protocols import errors as _errors
from ..protocols.errors import *  # noqa: F403 - every error tandem raises is part of the SDK's face
from .client import MODES, Client, Generation, SyncClient
from .usage import GenerationRecord, Piece, Round, Usage

__all__ = [
    "Client",
    "SyncClient",
    "Generation",
    "GenerationRecord",
    "Usage",
    "Round",
    "Piece",
    "MODES",
    *(name for name in _errors.__all__ if name[0].isupper()),  # the error classes
]
