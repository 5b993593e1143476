"""Usage: what one generation cost, on the device and in the cloud. Values add up."""

from __future__ import annotations

from typing import Any

from dataclasses import asdict, dataclass, field, fields

ACCEPTED, CLOUD, LOCAL = "accepted", "cloud", "local"

# How every front shows who produced a piece of text: the terminal (`tandem generate`, rich
# styles), the playground's page (its CSS mirrors these colours) and the Textual sample.
ORIGIN_NAMES = {ACCEPTED: "drafted on the device, accepted by the cloud", CLOUD: "the cloud's own token",
                LOCAL: "the device alone"}
ORIGIN_STYLES = {ACCEPTED: "green", CLOUD: "bold cyan", LOCAL: "yellow"}


class Piece(str):
    """A piece of generated text and who produced it:

        "accepted"  drafted on the device and accepted by the cloud model
        "cloud"     chosen by the cloud model itself (a correction, a bonus token, cloud mode)
        "local"     produced on the device with no cloud (local mode, assist's kept tokens, a fallback)

    A `str` like any other (print it, join it); `origin` says where it came from."""

    origin: str

    def __new__(cls, text: str, origin: str) -> "Piece":
        piece = super().__new__(cls, text)
        piece.origin = origin
        return piece


@dataclass
class Usage:
    local_tokens: int = 0  # tokens the device model produced (drafts, or the whole output in local mode)
    cloud_tokens: int = 0  # tokens the cloud model chose itself (corrections, bonus tokens, cloud mode)
    accepted_tokens: int = 0  # drafted tokens the cloud model accepted
    tested_tokens: int = 0  # drafted tokens the target actually judged (accepted + the first rejected)
    rounds: int = 0  # verify round trips (or 1 for a cloud stream)
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    fallbacks: int = 0  # times the cloud was unreachable and the device carried on alone
    forced_tokens: int = 0  # accepted drafts a grammar forced (drafted without the device model)

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.tested_tokens if self.tested_tokens else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Round:
    """One verify round: k drafted, n accepted (the target added one more token)."""

    k: int
    accepted: int
    emitted: int
    draft_s: float = 0.0
    verify_s: float = 0.0


@dataclass
class GenerationRecord:
    mode: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    usage: Usage = field(default_factory=Usage)
    rounds: list[Round] = field(default_factory=list)
    finish_reason: str | None = None
    decision: dict | None = None  # auto mode: what was chosen, and the predictions it was chosen on
    first_piece_s: float | None = None  # seconds to the first piece of text (the prompt's prefill included)
    first_piece_tokens: int = 0  # tokens the record held when that piece came
    tool_calls: list = field(default_factory=list)  # the calls the model made (grammar.ToolCall), with tools
    content: str | None = None  # with tools: the text before the first call
    parsed: Any = None  # under a JSON response_format: the validated answer
    parse_error: str | None = None  # why the answer did not parse or validate (the model's output stays in text)

    @property
    def ttft_ms(self) -> float | None:
        """Time to the first token a user sees (the first piece of text), in ms; None before it."""
        return None if self.first_piece_s is None else round(self.first_piece_s * 1000, 1)


__all__ = ["Usage", "Round", "GenerationRecord", "Piece", "ACCEPTED", "CLOUD", "LOCAL", "ORIGIN_NAMES", "ORIGIN_STYLES"]
