"""The task-graph messages that travel over MQTT between a coordinator and device agents.

    DeviceCapabilities   retained on PREFIX/devices/ID/caps: models, memory, measured tokens/s, power
    Presence             retained on PREFIX/devices/ID/presence; a device's last will sets it offline
    Heartbeat            PREFIX/devices/ID/heartbeat, every few seconds
    TaskAssignment       PREFIX/devices/ID/tasks (QoS 1), coordinator -> device
    TaskResult           PREFIX/devices/ID/results (QoS 1), device -> coordinator

The topic layout is in `mqtt.Topics`; the coordinator and the agent are in `tandem.sdk.taskgraph`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .messages import PROTOCOL_VERSION


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = PROTOCOL_VERSION


PowerClass = Literal["mains", "battery", "unknown"]


class DeviceCapabilities(_Wire):
    """What a device offers, announced retained so a coordinator that starts later still sees it."""

    type: Literal["caps"] = "caps"
    device_id: str
    models: list[str] = Field(description="models it can run (the first is its default)")
    tokens_per_s: dict[str, float] = Field(description="measured decode speed per model")
    memory_mb: int = Field(ge=0, description="physical memory")
    power: PowerClass = "unknown"
    slots: int = Field(1, ge=1, description="tasks it runs at once")
    threads: int = Field(1, ge=1)
    data: list[str] = Field(default_factory=list, description="names of private data held on the device")
    functions: list[str] = Field(default_factory=list, description="module prefixes of functions it will run")
    heartbeat_s: float = Field(2.0, gt=0)
    link_latency_s: float = Field(0.002, ge=0)
    link_bytes_per_s: float = Field(10e6, gt=0)


class Presence(_Wire):
    type: Literal["presence"] = "presence"
    device_id: str
    online: bool
    at: float = Field(default_factory=time.time)


class Heartbeat(_Wire):
    type: Literal["heartbeat"] = "heartbeat"
    device_id: str
    at: float = Field(default_factory=time.time)
    running: list[str] = Field(default_factory=list)
    done: int = 0


class TaskInput(_Wire):
    """One input of a task: a value carried inline, a task output the device already holds
    (`ref`, optionally one element of it), data private to the device (`local`), or a list
    gathered from such parts (`items`)."""

    value: Any = None
    ref: str | None = None
    index: int | None = None
    local: str | None = None
    items: list[TaskInput] | None = None


class TaskAssignment(_Wire):
    """Run one task. `task_id` is stable across attempts: a device that sees an id it already
    finished answers with the stored result instead of running it again."""

    type: Literal["task"] = "task"
    task_id: str = Field(min_length=1, max_length=256)
    attempt: int = Field(1, ge=1)
    node: str
    kind: Literal["llm", "function"]
    inputs: dict[str, TaskInput] = Field(default_factory=dict)
    prompt: str | None = Field(None, description="llm: a str.format template over the inputs")
    model: str | None = None
    max_new_tokens: int = Field(64, ge=1, le=32_768)
    chat: bool = False
    ignore_eos: bool = False
    function: str | None = Field(None, description="function: 'module:qualname'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    deadline_s: float | None = Field(None, gt=0, description="seconds from receipt")


class TaskResult(_Wire):
    type: Literal["result"] = "result"
    task_id: str
    attempt: int
    device_id: str
    ok: bool
    output: Any = None
    error: str | None = None
    error_code: Literal["failed", "missing_ref", "deadline", "unsupported"] | None = None
    tokens: int = 0
    seconds: float = 0.0
    replayed: bool = Field(False, description="a stored result sent again for a repeated assignment")


__all__ = ["DeviceCapabilities", "Presence", "Heartbeat", "TaskInput", "TaskAssignment", "TaskResult", "PowerClass"]
