"""One generation's run of each mode: options and a gateway link in, text out (the Client picks).

    options.py  RunOptions (prompt, sampling, budget, draft length, fallback) and DeviceModel
    link.py     GatewayLink: retries, opening sessions, the tokenizer check, byte accounting
    base.py     SessionRun: the open / rounds / fallback / rejoin skeleton every session run shares
    tokens.py   speculative decoding in token space (with pipelining)
    text.py     speculative decoding across tokenizers (drafts as text)
    assist.py   the device writes, the cloud answers only where a token router asks it to
    simple.py   local (device alone) and cloud (gateway alone, streamed)
"""

from .assist import AssistRun
from .base import SessionRun
from .link import GatewayLink
from .options import DeviceModel, RunOptions
from .simple import run_cloud, run_local
from .text import TextSpeculation
from .tokens import TokenSpeculation

__all__ = [
    "AssistRun",
    "DeviceModel",
    "GatewayLink",
    "RunOptions",
    "SessionRun",
    "TextSpeculation",
    "TokenSpeculation",
    "run_cloud",
    "run_local",
]
