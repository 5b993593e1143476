"""A device agent: one device's share of a task graph, reached through an MQTT broker.

    tandem device serve --id laptop --broker mqtt://127.0.0.1:1883 --model smollm2-135m

On start it loads its model, measures its decode speed, and connects with a persistent session
(queued tasks survive a dropped connection or a broker restart) and a last will that marks it
offline the moment its connection dies. It then announces, retained, its capabilities and its
presence, sends a heartbeat every few seconds, and runs the tasks sent to its own topic.

Each task id runs at most once here: a repeated assignment (QoS 1 may deliver twice, a
coordinator may resend) is answered with the stored result, and results that could not be sent
while the broker was away are sent again after reconnecting. Inputs may name outputs this
device already holds (`ref`) or data that never leaves it (`local`, for private nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache
from pydantic import ValidationError

from ...protocols.broker import BrokerURL
from ...protocols.mqtt import PREFIX, Topics, check_device_id, reconnecting
from ...protocols.taskgraph import (
    DeviceCapabilities,
    Heartbeat,
    Presence,
    TaskAssignment,
    TaskInput,
    TaskResult,
)
from .graph import render_prompt, resolve_function

if TYPE_CHECKING:
    import subprocess

    import aiomqtt

log = logging.getLogger(__name__)

DEFAULT_FUNCTIONS = ("tandem.sdk.taskgraph.library",)


class _MissingRef(Exception):
    pass


class _Deadline(Exception):
    pass


def power_class() -> str:
    """'battery' when the machine reports one, 'mains' when it reports only mains, else 'unknown'."""
    root = Path("/sys/class/power_supply")
    try:
        types = {(p / "type").read_text().strip().lower() for p in root.iterdir() if (p / "type").exists()}
    except OSError:
        return "unknown"
    if "battery" in types:
        return "battery"
    return "mains" if "mains" in types else "unknown"


def memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError, AttributeError):
        return 0


class DeviceAgent:
    def __init__(
        self,
        device_id: str,
        broker: str | BrokerURL,
        *,
        model: str | None = "smollm2-135m",
        threads: int = 1,
        power: str | None = None,
        data: Mapping[str, str] | None = None,
        functions: Sequence[str] = DEFAULT_FUNCTIONS,
        heartbeat_s: float = 2.0,
        prefix: str = PREFIX,
        reconnect_s: float = 0.5,
        calibrate_tokens: int = 16,
        keep_results: int = 2048,
    ) -> None:
        self.device_id = check_device_id(device_id)
        self.broker = BrokerURL.parse(broker)
        self.model_name = model
        self.threads = threads
        self.power = power or power_class()
        self.data = dict(data or {})
        self.functions = tuple(functions)
        self.heartbeat_s = heartbeat_s
        self.topics = Topics(prefix)
        self.reconnect_s = reconnect_s
        self.calibrate_tokens = calibrate_tokens
        self.keep_results = keep_results
        self.lm = None
        self.tokens_per_s: dict[str, float] = {}
        self.results: LRUCache[str, TaskResult] = LRUCache(max(1, keep_results))  # by task id, for repeats
        self.stats = {"ran": 0, "replayed": 0, "failed": 0}
        self._accepted: set[str] = set()  # queued or running
        self._running: list[str] = []
        self._outbox: list[TaskResult] = []
        self._queue: asyncio.Queue[TaskAssignment] | None = None
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self._stopping = threading.Event()  # ends a generation in progress when the agent stops

    # -- set-up --------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Load the model and measure its decode speed (blocking; seconds for real models)."""
        if self.model_name is None or self.lm is not None:
            return
        import torch

        from ...local_runtime.models import load_model
        from ...local_runtime.sequence import generate_alone

        torch.set_num_threads(self.threads)
        self.lm = load_model(self.model_name, progress=False)
        ids = self.lm.tokenizer.prompt_tokens("The weather today is", chat=False)
        n = self.calibrate_tokens
        list(generate_alone(self.lm, ids, 4, eos_token_ids=[]))  # warm up
        t0 = time.perf_counter()
        list(generate_alone(self.lm, ids, n, eos_token_ids=[]))
        self.tokens_per_s[self.model_name] = round(n / max(time.perf_counter() - t0, 1e-6), 2)

    def capabilities(self) -> DeviceCapabilities:
        return DeviceCapabilities(
            device_id=self.device_id,
            models=[self.model_name] if self.model_name else [],
            tokens_per_s=self.tokens_per_s,
            memory_mb=memory_mb(),
            power=self.power,  # type: ignore[arg-type]
            threads=self.threads,
            data=sorted(self.data),
            functions=list(self.functions),
            heartbeat_s=self.heartbeat_s,
        )

    # -- the connection ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; reconnect whenever the broker goes away."""
        import aiomqtt

        await asyncio.to_thread(self.prepare)
        self._queue = asyncio.Queue()
        worker = asyncio.create_task(self._work(), name=f"tandem-device-{self.device_id}-worker")
        will = aiomqtt.Will(
            self.topics.presence(self.device_id),
            Presence(device_id=self.device_id, online=False).model_dump_json().encode(),
            qos=1, retain=True,
        )
        async def session(client: aiomqtt.Client, protocol: str) -> None:
            try:
                await self._serve(client)
            except asyncio.CancelledError:
                # a clean stop says so itself (the will is for unclean ones); never wait long for it
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.publish(
                        self.topics.presence(self.device_id),
                        Presence(device_id=self.device_id, online=False).model_dump_json().encode(), qos=1, retain=True,
                    ), 1.0)
                raise
            finally:
                self._client = None
                self.connected.clear()

        try:
            await reconnecting(
                self.broker, session, name=f"device {self.device_id}", reconnect_s=self.reconnect_s,
                identifier=f"tandem-device-{self.device_id}", will=will, persistent=True,
                keepalive=max(2, int(self.heartbeat_s * 2)),
            )
        finally:
            self._stopping.set()
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _serve(self, client: aiomqtt.Client) -> None:
        t = self.topics
        await client.subscribe(t.tasks(self.device_id), qos=1)
        await client.publish(t.caps(self.device_id), self.capabilities().model_dump_json().encode(), qos=1, retain=True)
        await client.publish(
            t.presence(self.device_id), Presence(device_id=self.device_id, online=True).model_dump_json().encode(), qos=1, retain=True
        )
        self._client = client
        self.connected.set()
        await self._flush()
        beat = asyncio.create_task(self._heartbeat(client))
        try:
            async for message in client.messages:
                if str(message.topic) != t.tasks(self.device_id):
                    continue  # amqtt may echo this client's own retained announcements
                try:
                    task = TaskAssignment.model_validate_json(message.payload)
                except ValidationError as exc:
                    log.warning("device %s: dropped a malformed task: %s", self.device_id, exc)
                    continue
                await self._accept(task)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        while True:
            beat = Heartbeat(device_id=self.device_id, running=list(self._running), done=len(self.results))
            await client.publish(self.topics.heartbeat(self.device_id), beat.model_dump_json().encode(), qos=0)
            await asyncio.sleep(self.heartbeat_s)

    async def _accept(self, task: TaskAssignment) -> None:
        stored = self.results.get(task.task_id)
        if stored is not None:  # done before: the same answer again, not a second run
            self.stats["replayed"] += 1
            await self._send(stored.model_copy(update={"replayed": True}))
            return
        if task.task_id in self._accepted:
            return  # queued or running: its result is on the way
        self._accepted.add(task.task_id)
        assert self._queue is not None
        self._queue.put_nowait(task)

    async def _send(self, result: TaskResult) -> None:
        self._outbox.append(result)
        await self._flush()

    async def _flush(self) -> None:
        while self._outbox and self._client is not None:
            result = self._outbox[0]
            try:
                await self._client.publish(
                    self.topics.results(self.device_id), result.model_dump_json().encode(), qos=1
                )
            except Exception as exc:  # kept in the outbox; sent after reconnecting
                log.warning("device %s: result %s not sent yet (%s)", self.device_id, result.task_id, exc)
                return
            if self._outbox and self._outbox[0] is result:
                self._outbox.pop(0)

    # -- running tasks -------------------------------------------------------------------------

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            task = await self._queue.get()
            received = time.monotonic()
            self._running.append(task.task_id)
            try:
                result = await asyncio.to_thread(self.execute, task, received)
            finally:
                self._running.remove(task.task_id)
                self._accepted.discard(task.task_id)
            if result.ok:
                if self.keep_results > 0:  # 0 keeps nothing: every reference is then asked for again
                    self.results[task.task_id] = result
            await self._send(result)

    def execute(self, task: TaskAssignment, received: float | None = None) -> TaskResult:
        """Run one task here and now (blocking); failures become a result with `ok=False`."""
        received = time.monotonic() if received is None else received
        deadline = received + task.deadline_s if task.deadline_s else None
        t0 = time.perf_counter()
        base = {"task_id": task.task_id, "attempt": task.attempt, "device_id": self.device_id}
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise _Deadline("the deadline passed before the task started")
            values = {name: self._resolve(inp) for name, inp in task.inputs.items()}
            if task.kind == "llm":
                output, tokens = self._run_llm(task, values, deadline)
            else:
                output, tokens = self._run_function(task, values), 0
        except _MissingRef as exc:
            return TaskResult(**base, ok=False, error=f"no stored output for {exc}", error_code="missing_ref")
        except _Deadline as exc:
            self.stats["failed"] += 1
            return TaskResult(**base, ok=False, error=str(exc), error_code="deadline", seconds=time.perf_counter() - t0)
        except PermissionError as exc:
            self.stats["failed"] += 1
            return TaskResult(**base, ok=False, error=str(exc), error_code="unsupported")
        except Exception as exc:
            self.stats["failed"] += 1
            log.exception("device %s: task %s failed", self.device_id, task.task_id)
            return TaskResult(**base, ok=False, error=f"{type(exc).__name__}: {exc}", error_code="failed",
                              seconds=time.perf_counter() - t0)
        self.stats["ran"] += 1
        return TaskResult(**base, ok=True, output=output, tokens=tokens, seconds=time.perf_counter() - t0)

    def _resolve(self, inp: TaskInput) -> Any:
        if inp.local is not None:
            if inp.local not in self.data:
                raise PermissionError(f"device {self.device_id} holds no data named '{inp.local}'")
            return self.data[inp.local]
        if inp.items is not None:
            return [self._resolve(i) for i in inp.items]
        if inp.ref is not None:
            stored = self.results.get(inp.ref)
            if stored is None:
                raise _MissingRef(inp.ref)
            return stored.output if inp.index is None else stored.output[inp.index]
        return inp.value

    def _run_llm(self, task: TaskAssignment, values: dict[str, Any], deadline: float | None) -> tuple[str, int]:
        from ...local_runtime.sequence import generate_alone

        if self.lm is None or (task.model is not None and task.model != self.model_name):
            raise PermissionError(f"device {self.device_id} does not run model '{task.model or 'any'}'")
        tok = self.lm.tokenizer
        prompt = render_prompt(task.prompt or "", values)
        ids = tok.prompt_tokens(prompt, chat=task.chat)
        out: list[int] = []
        for t in generate_alone(self.lm, ids, task.max_new_tokens, eos_token_ids=[] if task.ignore_eos else None):
            out.append(t)
            if deadline is not None and time.monotonic() > deadline:
                raise _Deadline(f"deadline of {task.deadline_s:g} s passed after {len(out)} tokens")
            if self._stopping.is_set():
                raise _Deadline("the device is stopping")
        return tok.text(out), len(out)

    def _run_function(self, task: TaskAssignment, values: dict[str, Any]) -> Any:
        ref = task.function or ""
        module = ref.partition(":")[0]
        if not any(module == p or module.startswith(p + ".") for p in self.functions):
            raise PermissionError(f"device {self.device_id} does not run functions from '{module}' (allowed: {', '.join(self.functions)})")
        return resolve_function(ref)(*values.values(), **task.kwargs)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this process when the one that spawned it dies, so no agent outlives it."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_agent(
    device_id: str,
    broker: str,
    *,
    model: str = "smollm2-135m",
    threads: int = 1,
    heartbeat_s: float = 2.0,
    log_path: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen:
    """`tandem device serve` as a child process, the way a separate device would run it: its
    own session (Linux's autogroup scheduler shares a session's CPU among all its processes, so
    agents started from one session could not compute side by side on a busy machine), one
    torch thread by default, and tied to this process's life."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tandem.sdk.cli", "device", "serve", "--id", device_id, "--broker", broker,
             "--model", model, "--threads", str(threads), "--heartbeat-s", str(heartbeat_s), *extra_args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if log_path is not None else subprocess.DEVNULL,
            env=env, start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]


def stop_agents(procs: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM (an agent marks itself offline), then SIGKILL what lingers."""
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout_s)


def serve_device(device_id: str, broker: str, **kwargs: Any) -> None:
    """Run an agent until interrupted (SIGINT/SIGTERM leave it marked offline)."""
    import signal

    async def main() -> None:
        agent = DeviceAgent(device_id, broker, **kwargs)
        task = asyncio.create_task(agent.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


__all__ = ["DEFAULT_FUNCTIONS", "DeviceAgent", "memory_mb", "power_class", "serve_device", "spawn_agent", "stop_agents"]
