"""The record of one graph run, shared by the run (run.py), the inputs it hands each task
(contents.py) and the coordinator (executor.py): the tasks, the report, and what a run needs of
the coordinator that holds it. A leaf of the package: it imports none of those three."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...protocols.mqtt import Topics
from .graph import Function, Node, Reduce

# where a task runs when no device does: here (plain functions), or on the cloud gateway
HOST = "host"
GATEWAY = "gateway"

# A CPU prefills a prompt token ~20x faster than it decodes one (470 vs 21 tokens/s for
# SmolLM2-135M here), so a prompt of n tokens costs about n/20 decode steps.
PREFILL_RATIO = 20.0
CHARS_PER_TOKEN = 4.0


@dataclass
class RunReport:
    graph: str
    completed: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)
    tasks: int = 0
    lost: int = 0  # tasks that never completed
    duplicates: int = 0  # results applied more than once (exactly once: always 0)
    redundant_results: int = 0  # extra results received and dropped (replays, slow first attempts)
    replaced: int = 0  # tasks placed again after their device went away
    timeouts: int = 0  # tasks placed again after missing their deadline
    retries: int = 0  # tasks run again after a failure on a device
    makespan_s: float = 0.0
    planned_makespan_s: float = 0.0  # HEFT's estimate at the start
    placements: dict[str, str] = field(default_factory=dict)  # task id -> where its result came from
    busy_s: dict[str, float] = field(default_factory=dict)  # seconds each place spent on applied results
    events: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Task:
    id: str
    node: Node
    index: int | None = None
    status: str = "pending"  # pending | running | done
    attempt: int = 0
    device: str | None = None
    dispatched_at: float = 0.0
    deadline_at: float | None = None
    excluded: set[str] = field(default_factory=set)
    inline: bool = False
    output: Any = None
    ran_on: str | None = None

    @property
    def kind(self) -> str:
        if isinstance(self.node, Function) or (isinstance(self.node, Reduce) and self.node.fn is not None):
            return "function"
        return "llm"


class RunHost(Protocol):
    """What a run needs of its coordinator (executor.py's `Coordinator` is one)."""

    devices: dict[str, Any]  # device id -> its state (caps, `running` task ids, speed)
    busy: dict[str, int]  # slots in use at HOST and GATEWAY
    wake: asyncio.Event  # set when a result, a device or a free slot may unblock a run
    topics: Topics
    gateway_tokens_per_s: float
    min_deadline_s: float
    deadline_factor: float
    max_attempts: int

    def available(self, now: float | None = None) -> list[str]: ...

    async def publish(self, topic: str, payload: bytes) -> None: ...

    def cloud_client(self) -> Any: ...


__all__ = ["CHARS_PER_TOKEN", "GATEWAY", "HOST", "PREFILL_RATIO", "RunHost", "RunReport", "Task"]
