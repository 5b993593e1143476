"""Running a task graph over devices reached through an MQTT broker.

The `Coordinator` keeps a live view of the devices from their retained capabilities, presence
and heartbeats, and for each run:

1. expands the graph into tasks (a map gets one task per element once its list is known);
2. places the tasks not yet started with `placement.heft` (devices' measured speeds, refined by
   what their tasks actually took; link costs; constraints: private data, the cloud gateway,
   models, which functions a device runs), again after every change;
3. sends a task to a device (QoS 1) when the plan puts it first on a device with a free slot;
   plain functions without a device that runs them execute here (the "host"), and nodes that
   require the cloud go to the gateway through the SDK `Client` in cloud mode;
4. applies each result once: a task id that is already done ignores further results
   (replays, a slow first attempt); a device that goes offline (its last will, or silence
   past its heartbeat) or misses a deadline has its tasks placed again, elsewhere.

Inputs a device already holds (outputs of its own earlier tasks, private data) travel as
references, not values; a device that no longer holds one asks, and gets the value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ...protocols.broker import BrokerURL
from ...protocols.errors import TandemError
from ...protocols.mqtt import PREFIX, Topics, reconnecting
from ...protocols.taskgraph import (
    DeviceCapabilities,
    Heartbeat,
    Presence,
    TaskResult,
)
from .graph import Graph
from .record import CHARS_PER_TOKEN, GATEWAY, HOST, PREFILL_RATIO, RunReport
from .run import GraphRun

if TYPE_CHECKING:
    import aiomqtt

    from ...protocols.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class _Device:
    caps: DeviceCapabilities | None = None
    online: bool = False
    last_seen: float = 0.0
    running: set[str] = field(default_factory=set)
    speed: float | None = None  # tokens/s, as observed on its tasks (EMA)

    def usable(self, now: float, grace: float) -> bool:
        if self.caps is None or not self.online:
            return False
        return now - self.last_seen <= grace * self.caps.heartbeat_s


class Coordinator:
    """Runs graphs on the devices of one broker. Use as an async context manager:

        async with Coordinator("mqtt://127.0.0.1:1883") as coord:
            await coord.wait_for_devices(2)
            report = await coord.run(graph, {"document": text})
    """

    def __init__(
        self,
        broker: str | BrokerURL,
        *,
        gateway: Transport | None = None,
        gateway_tokens_per_s: float = 50.0,
        gateway_slots: int = 4,
        host_slots: int = 2,
        run_functions_here: bool = True,
        prefix: str = PREFIX,
        name: str | None = None,
        heartbeat_grace: float = 3.0,
        min_deadline_s: float = 30.0,
        deadline_factor: float = 10.0,
        max_attempts: int = 4,
        reconnect_s: float = 0.5,
    ) -> None:
        self.broker = BrokerURL.parse(broker)
        self.topics = Topics(prefix)
        self.gateway = gateway
        self.gateway_tokens_per_s = gateway_tokens_per_s
        self.gateway_slots = gateway_slots
        self.host_slots = host_slots
        self.run_functions_here = run_functions_here
        self.name = name or uuid.uuid4().hex[:8]
        self.heartbeat_grace = heartbeat_grace
        self.min_deadline_s = min_deadline_s
        self.deadline_factor = deadline_factor
        self.max_attempts = max_attempts
        self.reconnect_s = reconnect_s
        self.devices: dict[str, _Device] = {}
        self._client: aiomqtt.Client | None = None
        self._runner: asyncio.Task | None = None
        self.wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._runs: dict[str, GraphRun] = {}
        self.busy: dict[str, int] = {HOST: 0, GATEWAY: 0}  # busy slots
        self._cloud = None

    # -- the connection ------------------------------------------------------------------------

    async def start(self, timeout_s: float = 10.0) -> Coordinator:
        self._runner = asyncio.create_task(self._connection(), name=f"tandem-coordinator-{self.name}")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            await self.stop()
            raise TandemError(f"the coordinator could not connect to {self.broker.redacted()} in {timeout_s} s") from None
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _connection(self) -> None:
        t = self.topics

        async def session(client: aiomqtt.Client, protocol: str) -> None:
            try:
                for leaf in ("caps", "presence", "heartbeat", "results"):
                    await client.subscribe(f"{t.prefix}/devices/+/{leaf}", qos=1)
                self._client = client
                self._connected.set()
                self.wake.set()
                async for message in client.messages:
                    self._on_message(str(message.topic), bytes(message.payload))
            finally:
                self._client = None
                self._connected.clear()

        await reconnecting(
            self.broker, session, name="coordinator", reconnect_s=self.reconnect_s,
            identifier=f"tandem-coordinator-{self.name}", persistent=True,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_device(topic)
        if parsed is None or not payload:
            return
        device_id, leaf = parsed
        dev = self.devices.setdefault(device_id, _Device())
        now = time.monotonic()
        try:
            if leaf == "caps":
                dev.caps = DeviceCapabilities.model_validate_json(payload)
                dev.last_seen = now
            elif leaf == "presence":
                dev.online = Presence.model_validate_json(payload).online
                dev.last_seen = now
            elif leaf == "heartbeat":
                Heartbeat.model_validate_json(payload)
                dev.last_seen = now  # presence alone says online: a heartbeat may trail the last will
            elif leaf == "results":
                result = TaskResult.model_validate_json(payload)
                dev.last_seen = now
                run = self._runs.get(result.task_id.split("/", 1)[0])
                if run is not None:
                    run.on_result(result)
        except ValidationError as exc:
            log.warning("coordinator: dropped a malformed %s message from %s: %s", leaf, device_id, exc)
            return
        self.wake.set()

    def available(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return sorted(d for d, dev in self.devices.items() if dev.usable(now, self.heartbeat_grace))

    async def wait_for_devices(self, n: int, timeout_s: float = 60.0, ids: Sequence[str] | None = None) -> list[str]:
        """Wait until `n` devices (or all of `ids`) are up; returns the ids up."""
        deadline = time.monotonic() + timeout_s
        while True:
            up = self.available()
            if (ids is not None and set(ids) <= set(up)) or (ids is None and len(up) >= n):
                return up
            left = deadline - time.monotonic()
            if left <= 0:
                raise TandemError(f"only {len(up)} device(s) up after {timeout_s:g} s ({', '.join(up) or 'none'}); wanted {ids or n}")
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), min(left, 0.5))

    def running_on(self, device_id: str) -> set[str]:
        """Ids of the tasks this coordinator has running on a device now."""
        dev = self.devices.get(device_id)
        return set(dev.running) if dev is not None else set()

    def progress(self) -> tuple[int, int]:
        """(tasks done, tasks known) over the runs in progress."""
        tasks = [t for run in self._runs.values() for t in run.tasks.values()]
        return sum(t.status == "done" for t in tasks), len(tasks)

    async def publish(self, topic: str, payload: bytes) -> None:
        if self._client is None:
            raise TandemError("not connected to the broker")
        await self._client.publish(topic, payload, qos=1)

    # -- runs ----------------------------------------------------------------------------------

    async def run(
        self,
        graph: Graph,
        inputs: Mapping[str, Any],
        *,
        devices: Sequence[str] | None = None,
        deadline_s: float | None = None,
        on_event=None,
    ) -> RunReport:
        """Run `graph` to completion and return its report (outputs in `report.outputs`).
        `devices` limits the run to those ids; past `deadline_s` it fails with `GraphRunError`."""
        graph.check_inputs(inputs)
        run = GraphRun(self, graph, dict(inputs), devices, on_event)
        self._runs[run.id] = run
        try:
            return await run.execute(deadline_s)
        finally:
            del self._runs[run.id]

    def cloud_client(self):
        if self._cloud is None:
            from ..client import Client

            self._cloud = Client(drafter=None, gateway=self.gateway, mode="cloud")
        return self._cloud


__all__ = ["GATEWAY", "HOST", "Coordinator", "RunReport", "CHARS_PER_TOKEN", "PREFILL_RATIO"]
