"""What apps embed: the Client, its modes, and Usage accounting."""

from .client import MODES, Client, Generation, SyncClient
from .usage import GenerationRecord, Round, Usage

__all__ = ["Client", "SyncClient", "Generation", "GenerationRecord", "Usage", "Round", "MODES"]
