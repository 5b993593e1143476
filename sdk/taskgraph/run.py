"""One run of a graph on a `Coordinator`'s devices: its tasks, their placement, dispatch and
results (the steps listed in executor.py), with the inputs each task needs in `contents.py`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...protocols.errors import GraphRunError, PlacementError
from ...protocols.taskgraph import (
    TaskAssignment,
    TaskResult,
)
from .contents import TaskContents
from .graph import Graph, Map, function_ref
from .placement import Done, Job, Proc, heft
from .record import CHARS_PER_TOKEN, GATEWAY, HOST, PREFILL_RATIO, RunHost, RunReport, Task

log = logging.getLogger(__name__)

class GraphRun(TaskContents):
    def __init__(self, coord: RunHost, graph: Graph, inputs: dict[str, Any], devices: Sequence[str] | None, on_event) -> None:
        self.c = coord
        self.graph = graph
        self.id = uuid.uuid4().hex[:10]
        self.values: dict[str, Any] = dict(inputs)
        self.only = set(devices) if devices is not None else None
        self.on_event = on_event
        self.tasks: dict[str, Task] = {}
        self.node_tasks: dict[str, list[str]] = {}
        self.report = RunReport(graph=graph.name)
        self.applied: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self.local_jobs: set[asyncio.Task] = set()
        self.failure: str | None = None
        self.lost_devices: set[str] = set()
        self.waiting = ""

    # -- bookkeeping ---------------------------------------------------------------------------

    def event(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:7.2f}s {text}"
        self.report.events.append(line)
        log.info("run %s: %s", self.id, text)
        if self.on_event is not None:
            self.on_event(line)

    def expand(self) -> None:
        for node in self.graph.nodes:
            if node.name in self.node_tasks:
                continue
            if isinstance(node, Map):
                if node.over not in self.values:
                    continue
                items = self.values[node.over]
                if not isinstance(items, (list, tuple)):
                    raise GraphRunError(f"map '{node.name}' works over '{node.over}', which is a {type(items).__name__}, not a list", self.report)
                ids = [f"{self.id}/{node.name}/{i}" for i in range(len(items))]
                for i, tid in enumerate(ids):
                    self.tasks[tid] = Task(tid, node, index=i)
                self.node_tasks[node.name] = ids
                self.event(f"{node.name}: {len(ids)} map task(s)")
            else:
                tid = f"{self.id}/{node.name}"
                self.tasks[tid] = Task(tid, node)
                self.node_tasks[node.name] = [tid]

    def complete_nodes(self) -> None:
        for name, ids in self.node_tasks.items():
            if name in self.values or not all(self.tasks[t].status == "done" for t in ids):
                continue
            node = self.graph[name]
            self.values[name] = [self.tasks[t].output for t in ids] if isinstance(node, Map) else self.tasks[ids[0]].output

    def ready(self, task: Task) -> bool:
        return all(r in self.values or r in self.graph.local_inputs for r in task.node.reads())

    def on_result(self, result: TaskResult) -> None:
        task = self.tasks.get(result.task_id)
        if task is None:
            return
        dev = self.c.devices.get(result.device_id)
        if dev is not None:
            dev.running.discard(task.id)
        if result.device_id in (HOST, GATEWAY):
            self.c.busy[result.device_id] -= 1
        if task.status == "done":
            self.report.redundant_results += 1
            return
        if result.ok:
            task.status, task.output, task.ran_on = "done", result.output, result.device_id
            self.applied[task.id] += 1
            self.report.placements[task.id] = result.device_id
            self.report.busy_s[result.device_id] = round(self.report.busy_s.get(result.device_id, 0.0) + result.seconds, 3)
            work = self.work(task)
            if dev is not None and result.seconds > 0 and work > 0:
                seen = work / result.seconds
                dev.speed = seen if dev.speed is None else 0.5 * dev.speed + 0.5 * seen
            return
        if result.device_id != task.device and task.status == "running":
            return  # a failed earlier attempt; the current one may still succeed
        task.status = "pending"
        if result.error_code == "missing_ref":
            self.event(f"{task.id}: {result.device_id} no longer holds an input; sending values instead")
            task.inline = True
            return
        if result.device_id == HOST:  # a plain function here: running it again gives the same error
            self.failure = f"task {task.id} failed: {result.error}"
            return
        task.excluded.add(result.device_id)
        self.report.retries += 1
        self.event(f"{task.id} failed on {result.device_id} ({result.error}); placing it again")
        if task.attempt >= self.c.max_attempts:
            self.failure = f"task {task.id} failed {task.attempt} times; last: {result.error}"

    # -- estimates -----------------------------------------------------------------------------

    def prompt_chars(self, task: Task) -> int:
        node = task.node
        template = getattr(node, "prompt", None) or ""
        size = len(template)
        for r in node.reads():
            v = self.values.get(r)
            if v is None:
                continue
            if isinstance(node, Map) and r == node.over and isinstance(v, (list, tuple)) and task.index is not None:
                v = v[task.index]
            size += len(v) if isinstance(v, str) else len(json.dumps(v, default=str))
        return size

    def work(self, task: Task) -> float:
        """Decode-token equivalents: new tokens plus prompt tokens at prefill speed."""
        if task.kind == "function":
            return 0.0
        return getattr(task.node, "max_new_tokens", 64) + self.prompt_chars(task) / CHARS_PER_TOKEN / PREFILL_RATIO

    def out_bytes(self, task: Task) -> int:
        if task.status == "done":
            return len(json.dumps(task.output, default=str))
        return int(getattr(task.node, "max_new_tokens", 64) * CHARS_PER_TOKEN) if task.kind == "llm" else 1000

    def allowed(self, task: Task, now: float) -> frozenset[str]:
        """Where a task may run: constraints first (gateway, private data, model, function), then
        minus the devices it has already been taken from."""
        node = task.node
        c = self.c
        if node.requires == "gateway":
            return frozenset({GATEWAY}) if c.gateway is not None else frozenset()
        local = [r for r in node.reads() if r in self.graph.local_inputs]
        out: set[str] = set()
        ref = function_ref(getattr(node, "fn", None)) if task.kind == "function" else None
        if task.kind == "function" and not node.private and (c.run_functions_here or not ref):
            out.add(HOST)
        for d in c.available(now):
            if (self.only is not None and d not in self.only) or d in task.excluded:
                continue
            caps = c.devices[d].caps
            assert caps is not None
            if not all(name in caps.data for name in local):
                continue
            if task.kind == "function":
                module = (ref or "").partition(":")[0]
                if not ref or not any(module == p or module.startswith(p + ".") for p in caps.functions):
                    continue
            elif not caps.models or (node.model is not None and node.model not in caps.models):
                continue
            out.add(d)
        return frozenset(out)

    def procs(self, now: float) -> list[Proc]:
        c = self.c
        out: list[Proc] = []
        for d in c.available(now):
            if self.only is not None and d not in self.only:
                continue
            dev = c.devices[d]
            caps = dev.caps
            assert caps is not None
            speed = dev.speed or max(caps.tokens_per_s.values(), default=1.0)
            busy = [self.expected_finish(self.tasks[t], speed) - now for t in dev.running if t in self.tasks]
            ready_at = max(0.0, min(busy)) if len(busy) >= caps.slots else 0.0
            out.append(Proc(d, speed, caps.link_latency_s, caps.link_bytes_per_s, ready_at, caps.slots))
        out.append(Proc(HOST, 1.0, 0.0, float("inf"), 0.0, c.host_slots))
        if c.gateway is not None:
            out.append(Proc(GATEWAY, c.gateway_tokens_per_s, 0.02, 10e6, 0.0, c.gateway_slots))
        return out

    def expected_finish(self, task: Task, speed: float) -> float:
        return task.dispatched_at + self.work(task) / max(speed, 1e-6)

    def jobs(self, now: float) -> tuple[list[Job], dict[str, Done]]:
        """The tasks still to place as HEFT jobs, and where their running or finished
        predecessors are (finish times relative to now)."""
        jobs: list[Job] = []
        done: dict[str, Done] = {}
        up = set(self.c.available(now))
        inputs_at_host = {r for r in self.graph.inputs}
        for name in inputs_at_host:
            done[f"input:{name}"] = Done(HOST, 0.0, len(json.dumps(self.values.get(name), default=str)))
        for task in self.tasks.values():
            deps: list[str] = [f"input:{r}" for r in task.node.reads() if r in inputs_at_host]
            for r in task.node.reads():
                for pid in self.node_tasks.get(r, []):
                    if isinstance(task.node, Map) and r == task.node.over and self.graph[r].kind == "map":
                        if not pid.endswith(f"/{task.index}"):
                            continue
                    deps.append(pid)
            if task.status == "pending":
                jobs.append(Job(task.id, self.work(task), 0.001 if task.kind == "function" else 0.0, tuple(deps),
                                self.out_bytes(task), self.allowed(task, now)))
            elif task.status == "running":
                dev = self.c.devices.get(task.device or "")
                speed = (dev.speed or max(dev.caps.tokens_per_s.values(), default=1.0)) if dev and dev.caps else self.c.gateway_tokens_per_s
                done[task.id] = Done(task.device or HOST, max(0.0, self.expected_finish(task, speed) - now), self.out_bytes(task))
            else:
                where = task.ran_on if task.ran_on in up else HOST
                done[task.id] = Done(where or HOST, 0.0, self.out_bytes(task))
        return jobs, done

    # -- the loop ------------------------------------------------------------------------------

    async def execute(self, deadline_s: float | None) -> RunReport:
        rep = self.report
        try:
            while True:
                self.expand()
                self.complete_nodes()
                if all(n.name in self.values for n in self.graph.nodes):
                    break
                if self.failure:
                    raise GraphRunError(self.failure, rep)
                now = time.monotonic()
                if deadline_s is not None and now - self.t0 > deadline_s:
                    raise GraphRunError(f"graph '{self.graph.name}' missed its deadline of {deadline_s:g} s", rep)
                self.check_devices(now)
                self.check_deadlines(now)
                await self.dispatch(now)
                self.c.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.c.wake.wait(), 0.25)
        except GraphRunError as exc:
            rep.error = str(exc)
            self.finish(completed=False)
            raise
        self.finish(completed=True)
        return rep

    def finish(self, completed: bool) -> None:
        rep = self.report
        for job in self.local_jobs:
            job.cancel()
        for dev in self.c.devices.values():
            dev.running -= set(self.tasks)
        rep.completed = completed
        rep.tasks = len(self.tasks)
        rep.lost = sum(1 for t in self.tasks.values() if t.status != "done")
        rep.duplicates = sum(n - 1 for n in self.applied.values() if n > 1)
        rep.makespan_s = time.monotonic() - self.t0
        rep.outputs = {o: self.values.get(o) for o in self.graph.outputs}

    def check_devices(self, now: float) -> None:
        """Tasks on a device that went offline (last will) or silent go back to be placed again."""
        c = self.c
        for d, dev in c.devices.items():
            if dev.usable(now, c.heartbeat_grace):
                self.lost_devices.discard(d)
                continue
            mine = [t for t in dev.running if t in self.tasks and self.tasks[t].status == "running" and self.tasks[t].device == d]
            if d not in self.lost_devices and (mine or d in {t.device for t in self.tasks.values()}):
                self.lost_devices.add(d)
                why = "went offline" if not dev.online else "stopped sending heartbeats"
                self.event(f"device {d} {why}" + (f"; placing {len(mine)} task(s) again: {', '.join(mine)}" if mine else ""))
            for tid in mine:
                task = self.tasks[tid]
                task.status = "pending"
                task.excluded.add(d)
                self.report.replaced += 1
                dev.running.discard(tid)

    def check_deadlines(self, now: float) -> None:
        for task in self.tasks.values():
            if task.status == "running" and task.deadline_at is not None and now > task.deadline_at:
                self.report.timeouts += 1
                if task.attempt >= self.c.max_attempts:
                    self.failure = f"task {task.id} missed its deadline {task.attempt} times"
                    return
                if not self.allowed(task, now) - {task.device}:
                    # nowhere else can run it (the gateway, the host, the one device with the data):
                    # a second copy there would only queue behind the first
                    self.event(f"{task.id} is past its deadline on {task.device}, the only place that can run it; waiting")
                    task.deadline_at = now + self.deadline(task, 0.0)
                    continue
                self.event(f"{task.id} missed its deadline on {task.device}; placing it again")
                task.status = "pending"
                task.excluded.add(task.device or "")

    def free_slots(self, proc: Proc) -> int:
        if proc.name in (HOST, GATEWAY):
            return proc.slots - self.c.busy[proc.name]
        return proc.slots - len(self.c.devices[proc.name].running)

    async def dispatch(self, now: float) -> None:
        jobs, done = self.jobs(now)
        if not jobs:
            return
        procs = self.procs(now)
        try:
            plan = heft(jobs, procs, done)
        except PlacementError as exc:
            # nothing can take a task now; a device may come back (or the deadline ends the run)
            if str(exc) != self.waiting:
                self.waiting = str(exc)
                self.event(f"waiting: {exc}")
            blocked = {j.name for j in jobs if not j.allowed}
            if len(blocked) == len(jobs):
                return
            plan = heft([j for j in jobs if j.allowed and not (set(j.deps) & blocked)], procs, done)
        # HEFT's estimate once every task is known (maps expanded), before anything ran late
        if not self.report.planned_makespan_s and len(self.node_tasks) == len(self.graph.nodes):
            self.report.planned_makespan_s = round(now - self.t0 + plan.makespan, 3)
        by_proc = {p.name: p for p in procs}
        for name, proc in by_proc.items():
            free = self.free_slots(proc)
            if free <= 0:
                continue
            queue = [s for s in plan.on(name) if self.tasks[s.job].status == "pending"]
            for i, slot in enumerate(queue):
                if free <= 0:
                    break
                task = self.tasks[slot.job]
                if not self.ready(task):
                    continue
                earlier = [s for s in queue[:i] if not self.ready(self.tasks[s.job])]
                # fill a gap only if it ends before the earlier planned (not yet ready) task starts
                if earlier and slot.finish - slot.start > min(s.start for s in earlier):
                    continue
                if await self.send(task, name, now, slot.finish - slot.start):
                    free -= 1

    def deadline(self, task: Task, estimate_s: float) -> float:
        if task.node.deadline_s is not None:
            return task.node.deadline_s
        return max(self.c.min_deadline_s, self.c.deadline_factor * estimate_s)

    async def send(self, task: Task, where: str, now: float, estimate_s: float) -> bool:
        task.attempt += 1
        task.status, task.device, task.dispatched_at = "running", where, now
        deadline = self.deadline(task, estimate_s)
        task.deadline_at = now + deadline
        if task.attempt > 1:
            self.event(f"{task.id} -> {where} (attempt {task.attempt})")
        if where in (HOST, GATEWAY):
            self.c.busy[where] += 1
            job = asyncio.create_task(self.run_here(task, where))
            self.local_jobs.add(job)
            job.add_done_callback(self.local_jobs.discard)
            return True
        assignment = TaskAssignment(
            task_id=task.id, attempt=task.attempt, node=task.node.name, kind=task.kind,  # type: ignore[arg-type]
            inputs={name: self.task_input(task, name, where) for name in self.input_names(task)},
            prompt=self.template(task), model=task.node.model,
            max_new_tokens=getattr(task.node, "max_new_tokens", 64), chat=getattr(task.node, "chat", False),
            ignore_eos=getattr(task.node, "ignore_eos", False),
            function=function_ref(task.node.fn) if task.kind == "function" else None,  # type: ignore[attr-defined]
            kwargs=getattr(task.node, "kwargs", {}) or {}, deadline_s=deadline,
        )
        self.c.devices[where].running.add(task.id)
        try:
            await self.c.publish(self.c.topics.tasks(where), assignment.model_dump_json().encode())
        except Exception as exc:
            self.c.devices[where].running.discard(task.id)
            task.status = "pending"
            task.attempt -= 1
            log.warning("run %s: could not send %s to %s (%s)", self.id, task.id, where, exc)
            return False
        return True


__all__ = ["GraphRun"]
