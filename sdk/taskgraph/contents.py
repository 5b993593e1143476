"""What a task is given: its prompt template, its inputs (by reference to what a device already
holds, or by value), and running it here (a function on the host, an LLM call on the gateway).
A mixin of the run (run.py), which holds the tasks and the values."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ...protocols.taskgraph import (
    TaskInput,
    TaskResult,
)
from .graph import Map, Reduce, render_prompt, resolve_function
from .record import GATEWAY, Task

class TaskContents:
    def template(self, task: Task) -> str | None:
        return getattr(task.node, "prompt", None) if task.kind == "llm" else None

    def input_names(self, task: Task) -> list[str]:
        node = task.node
        if isinstance(node, Map):
            return ["item", *node.inputs]
        if isinstance(node, Reduce):
            return ["items", *node.inputs]
        return list(node.inputs)

    def _source(self, task: Task, name: str) -> str:
        node = task.node
        if isinstance(node, Map) and name == "item":
            return node.over
        if isinstance(node, Reduce) and name == "items":
            return node.over
        return name

    def task_input(self, task: Task, name: str, where: str) -> TaskInput:
        """An input as the device will get it: a reference to what it already holds, or the value."""
        src = self._source(task, name)
        if src in self.graph.local_inputs:
            return TaskInput(local=src)
        index = task.index if isinstance(task.node, Map) and name == "item" else None

        def held(tid: str) -> bool:
            t = self.tasks[tid]
            return not task.inline and t.ran_on == where

        ids = self.node_tasks.get(src)
        if ids is None:  # a graph input
            value = self.values[src]
            return TaskInput(value=value[index] if index is not None else value)
        if self.graph[src].kind == "map":
            if index is not None:
                tid = ids[index]
                return TaskInput(ref=tid) if held(tid) else TaskInput(value=self.tasks[tid].output)
            return TaskInput(items=[TaskInput(ref=t) if held(t) else TaskInput(value=self.tasks[t].output) for t in ids])
        tid = ids[0]
        if held(tid):
            return TaskInput(ref=tid, index=index)
        value = self.values[src]
        return TaskInput(value=value[index] if index is not None else value)

    def local_values(self, task: Task) -> dict[str, Any]:
        out = {}
        for name in self.input_names(task):
            value = self.values[self._source(task, name)]
            out[name] = value[task.index] if isinstance(task.node, Map) and name == "item" else value
        return out

    async def run_here(self, task: Task, where: str) -> None:
        """A function on the host, or an LLM call on the cloud gateway."""
        t0 = time.perf_counter()
        attempt = task.attempt
        try:
            values = self.local_values(task)
            tokens = 0
            if where == GATEWAY:
                rec = await self.c.cloud_client().generate(
                    render_prompt(self.template(task) or "", values), mode="cloud",
                    max_new_tokens=getattr(task.node, "max_new_tokens", 64), chat=getattr(task.node, "chat", False),
                )
                output, tokens = rec.text, len(rec.tokens)
            else:
                fn = task.node.fn  # type: ignore[attr-defined]
                fn = resolve_function(fn) if isinstance(fn, str) else fn
                output = await asyncio.to_thread(fn, *values.values(), **(getattr(task.node, "kwargs", {}) or {}))
            result = TaskResult(task_id=task.id, attempt=attempt, device_id=where, ok=True, output=output,
                                tokens=tokens, seconds=time.perf_counter() - t0)
        except asyncio.CancelledError:
            self.c.busy[where] -= 1
            raise
        except Exception as exc:
            result = TaskResult(task_id=task.id, attempt=attempt, device_id=where, ok=False,
                                error=f"{type(exc).__name__}: {exc}", error_code="failed")
        self.on_result(result)
        self.c.wake.set()


__all__ = ["TaskContents"]
