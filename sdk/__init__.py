"""What apps embed: the Client, its modes, Usage accounting, and every error tandem raises.

    client.py      Client / SyncClient: resources, mode choice, one link estimate
    runs/          one generation of each mode (speculative in tokens or text, assist, local, cloud)
    auto.py        predicted cost of each mode, and auto's choice; estimates.py: the link estimate
    taskgraph/     graphs of LLM calls spread over devices through an MQTT broker
    cli/, bench/   the `tandem` command and the benchmarks (they tie every package together)
"""

from ..protocols.errors import (
    ArtifactMissing,
    AuthenticationError,
    BackendUnavailable,
    ConfigError,
    EmbeddingUnavailable,
    GatewayError,
    GraphError,
    GraphRunError,
    ModelLoadError,
    PlacementError,
    PolicyFileError,
    RateLimitError,
    RequestTooLargeError,
    RouterUnavailable,
    SessionEvictedError,
    TandemError,
    TokenizerMismatchError,
    TransportError,
    UnknownSessionError,
    UnsupportedModel,
    WrongPositionError,
)
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
    "TandemError",
    "ModelLoadError",
    "BackendUnavailable",
    "UnsupportedModel",
    "ConfigError",
    "PolicyFileError",
    "RouterUnavailable",
    "ArtifactMissing",
    "EmbeddingUnavailable",
    "GraphError",
    "GraphRunError",
    "PlacementError",
    "TransportError",
    "GatewayError",
    "UnknownSessionError",
    "SessionEvictedError",
    "WrongPositionError",
    "TokenizerMismatchError",
    "RequestTooLargeError",
    "AuthenticationError",
    "RateLimitError",
]
