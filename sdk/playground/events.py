"""One generation as a stream of events: what the playground's page draws, in the order it happened.

    start     {mode}                                       before anything else
    decision  {mode, policy?, predicted?, objective?, ...}  auto: what was chosen and why (once known)
    round     {index, k, accepted, rejected, emitted,      one verify (or assist append) round, before
               draft_ms, verify_ms, round_ms}               the text it committed
    offline   {at_token, fallbacks}                        the cloud is unreachable: the device goes on alone
    rejoin    {at_token, round}                            a session again, after going on alone
    piece     {text, origin}                               text as it is committed; origin is
                                                           "accepted", "cloud" or "local" (sdk/usage.py)
    usage     {... summary ...}                            the running totals, at most every `usage_every_s`
    error     {message}                                    the generation stopped on an error
    done      {text, mode, finish_reason, usage, decision, estimate}   always last

Everything is read from the `GenerationRecord` the run fills as it goes (rounds, usage, the
decision), so the page sees exactly what `Client.stream` reports and nothing is computed twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ...protocols.errors import TandemError
from ...protocols.transport import Transport
from ..client import Generation
from ..usage import GenerationRecord

log = logging.getLogger("tandem.playground")


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]

    def sse(self) -> str:
        """The event in the server-sent events wire format."""
        return f"event: {self.name}\ndata: {json.dumps(self.data, default=str)}\n\n"


def summarize(rec: GenerationRecord, elapsed_s: float | None = None, moved: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """The usage summary the page shows: the `Usage` fields plus the figures derived from them.
    A run adds its bytes to `Usage` when it ends; until then `moved` (bytes up, down) stands in.

    tokens_per_round        tokens the rounds committed / rounds (None without rounds: local, cloud)
    cloud_passes_per_token  target forward passes / tokens: a pass per round, or per token when
                            the cloud generates alone
    tokens_per_s            tokens / seconds so far (`elapsed_s`; the final wall time once done)
    ttft_ms                 time to the first piece of text (None before it)
    """
    u, n = rec.usage, len(rec.tokens)
    wall = u.wall_s or elapsed_s or 0.0
    passes = u.cloud_tokens if rec.mode == "cloud" else u.rounds
    committed = sum(r.emitted for r in rec.rounds)
    return {
        **u.to_dict(),
        "bytes_up": u.bytes_up or moved[0],
        "bytes_down": u.bytes_down or moved[1],
        "mode": rec.mode,
        "tokens": n,
        "acceptance_rate": u.acceptance_rate if u.tested_tokens else None,
        "tokens_per_round": committed / len(rec.rounds) if rec.rounds else None,
        "cloud_passes_per_token": passes / n if n else None,
        "tokens_per_s": n / wall if wall > 0 else None,
        "wall_s": wall,
        "ttft_ms": rec.ttft_ms,
    }


class _Watcher:
    """What changed in a record since it was last looked at, as events."""

    def __init__(self, rec: GenerationRecord) -> None:
        self.rec = rec
        self.rounds = 0
        self.fallbacks = 0
        self.offline = False
        self.decision_sent = False

    def changes(self) -> list[Event]:
        rec, events = self.rec, []
        if rec.decision is not None and not self.decision_sent and "mode" in rec.decision:
            self.decision_sent = True
            events.append(Event("decision", dict(rec.decision)))
        if rec.usage.fallbacks > self.fallbacks:
            self.fallbacks = rec.usage.fallbacks
            self.offline = True
            events.append(Event("offline", {"at_token": len(rec.tokens), "fallbacks": self.fallbacks}))
        for r in rec.rounds[self.rounds:]:
            self.rounds += 1
            if self.offline:
                self.offline = False
                events.append(Event("rejoin", {"at_token": len(rec.tokens) - r.emitted, "round": self.rounds}))
            events.append(Event("round", {
                "index": self.rounds, "k": r.k, "accepted": r.accepted, "rejected": max(0, r.k - r.accepted),
                "emitted": r.emitted, "draft_ms": r.draft_s * 1000, "verify_ms": r.verify_s * 1000,
                "round_ms": (r.draft_s + r.verify_s) * 1000,
            }))
        return events


async def generation_events(
    gen: Generation,
    *,
    estimate: Callable[[], dict[str, Any]] | None = None,
    transport: Transport | None = None,
    usage_every_s: float = 0.1,
    clock: Callable[[], float] = time.perf_counter,
) -> AsyncIterator[Event]:
    """Run `gen` and describe it as events (see the module's docstring). `estimate` returns the
    client's link estimate, sent at the end; `transport` (the client's, carrying this generation
    alone) gives the bytes moved so far while the run has not counted them yet."""
    rec = gen.record
    watch = _Watcher(rec)
    t0 = last_usage = clock()
    start = (transport.bytes_up, transport.bytes_down) if transport is not None else (0, 0)

    def moved() -> tuple[int, int]:
        if transport is None:
            return (0, 0)
        return (transport.bytes_up - start[0], transport.bytes_down - start[1])

    yield Event("start", {"mode": rec.mode})
    try:
        async for piece in gen:
            for event in watch.changes():
                yield event
            yield Event("piece", {"text": str(piece), "origin": piece.origin})
            if (now := clock()) - last_usage >= usage_every_s:
                last_usage = now
                yield Event("usage", summarize(rec, now - t0, moved()))
    except (TandemError, ValueError) as exc:
        yield Event("error", {"message": str(exc)})
    except Exception as exc:  # noqa: BLE001 - the page must hear why its stream ended
        log.exception("generation failed")
        yield Event("error", {"message": f"internal error: {type(exc).__name__}: {exc}"})
    for event in watch.changes():
        yield event
    yield Event("done", {
        "text": rec.text, "mode": rec.mode, "finish_reason": rec.finish_reason,
        "usage": summarize(rec, clock() - t0), "decision": rec.decision,
        "estimate": estimate() if estimate is not None else None,
    })


__all__ = ["Event", "generation_events", "summarize"]
