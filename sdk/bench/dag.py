"""`tandem bench dag`: one task graph on 1 device and on N devices, side by side, K of them killed.

Each device is its own process (`tandem device serve`, one torch thread, its own session), so
devices compute in parallel as far as the machine's cores allow. The graph is a map over document chunks:

    chunks (function) -> notes (map: one LLM call per chunk) -> digest (function) -> summary (LLM)

The same graph runs on one device alone and on all N, in the order 1, N, N, 1 (other load on
the machine drifts; the mirrored order cancels a steady drift), and the speedup is the ratio of
the mean makespans. With `fail` > 0 one more N-device run follows in which a device (never the
first) that is running a task is killed (SIGKILL: its connection drops, the broker publishes its
last will) once a third of the map is done, and again for each further failure; that run is
the one whose completion, losses, duplicates and replacements are reported. Greedy decoding of
one model is deterministic, so every run's outputs must equal the one-device outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ...protocols.errors import GraphRunError
from ..taskgraph.agent import spawn_agent, stop_agents
from ..taskgraph.broker import EmbeddedBroker
from ..taskgraph.executor import Coordinator
from ..taskgraph.graph import LLM, Function, Graph, Map, Reduce
from ..taskgraph.record import RunReport

LIBRARY = "tandem.sdk.taskgraph.library"


def bench_graph(tokens: int, chunk_chars: int) -> Graph:
    return Graph(
        [
            Function("chunks", f"{LIBRARY}:split_chunks", inputs=["document"], kwargs={"size": chunk_chars}),
            Map("notes", over="chunks", prompt="Text:\n{item}\nThe key facts of this text:", max_new_tokens=tokens, ignore_eos=True),
            Reduce("digest", over="notes", fn=f"{LIBRARY}:numbered", kwargs={"max_chars": 60}),
            LLM("summary", "Notes:\n{digest}\nSummary:", max_new_tokens=max(8, tokens // 4), ignore_eos=True),
        ],
        inputs=["document"],
        name="bench-dag",
    )


def bench_document(chunks: int, chunk_chars: int) -> str:
    """A deterministic document that splits into exactly `chunks` pieces."""
    sentence = "Device {i} measured {v} tokens per second while the broker relayed task {j}. "
    parts = []
    for c in range(chunks):
        body, k = "", 0
        while len(body) + 90 < chunk_chars * 0.9:
            body += sentence.format(i=c, v=(c * 37 + k * 11) % 97, j=k)
            k += 1
        parts.append(body.strip())
    return "\n\n".join(parts)


async def _killer(coord: Coordinator, procs: dict[str, subprocess.Popen], candidates: list[str], fail: int,
                  map_tasks: int, killed: list[str], log) -> None:
    """Kill `fail` devices, each while it runs a task: the first once a third of the map is done,
    the next after a further third of what is left."""
    threshold = max(1, map_tasks // 3)
    killed_before = len(killed)
    while len(killed) - killed_before < fail:
        done, _ = coord.progress()
        if done >= threshold + 1:  # +1: the chunks function
            victims = [d for d in candidates if d not in killed and coord.running_on(d) and procs[d].poll() is None]
            if victims:
                victim = victims[-1]
                procs[victim].kill()
                killed.append(victim)
                log(f"killed {victim} (SIGKILL) while it ran {sorted(coord.running_on(victim))}")
                threshold = done + max(1, (map_tasks - done) // 3)
        await asyncio.sleep(0.02)


async def bench_dag(
    *,
    devices: int = 3,
    fail: int = 0,
    model: str = "tiny-llama",
    chunks: int = 12,
    tokens: int = 160,
    chunk_chars: int = 600,
    broker: str | None = None,
    heartbeat_s: float = 0.5,
    rounds: int = 2,
    timeout_s: float = 300.0,
    log=lambda line: None,
) -> dict[str, Any]:
    if devices < 1:
        raise ValueError("--devices must be at least 1")
    if not 0 <= fail < devices:
        raise ValueError("--fail must leave at least one device alive (0 <= fail < devices)")
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine bounds the speedup
    graph = bench_graph(tokens, chunk_chars)
    document = bench_document(chunks, chunk_chars)
    embedded = EmbeddedBroker() if broker is None else None
    if embedded is not None:
        await embedded.start()
    url = broker or embedded.url  # type: ignore[union-attr]
    ids = [f"bench-{i}" for i in range(devices)]
    procs: dict[str, subprocess.Popen] = {}
    killed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tandem-bench-dag-") as tmp:
        try:
            for d in ids:
                procs[d] = spawn_agent(d, url, model=model, heartbeat_s=heartbeat_s, log_path=Path(tmp) / f"{d}.log")
            async with Coordinator(url) as coord:
                t0 = time.perf_counter()
                await coord.wait_for_devices(devices, timeout_s=timeout_s, ids=ids)
                log(f"{devices} device(s) up in {time.perf_counter() - t0:.1f} s: "
                    + ", ".join(f"{d} {coord.devices[d].caps.tokens_per_s}" for d in ids))  # type: ignore[union-attr]

                inputs = {"document": document}

                async def one_device() -> RunReport:
                    rep = await coord.run(graph, inputs, devices=ids[:1], deadline_s=timeout_s)
                    log(f"1 device:  {rep.makespan_s:.2f} s for {rep.tasks} tasks")
                    return rep

                async def all_devices(kill: int) -> RunReport:
                    killer = asyncio.create_task(_killer(coord, procs, ids[1:], kill, chunks, killed, log)) if kill else None
                    try:
                        rep = await coord.run(graph, inputs, devices=ids, deadline_s=timeout_s, on_event=log)
                    except GraphRunError as exc:
                        rep = exc.report
                    finally:
                        if killer is not None:
                            killer.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await killer
                    log(f"{devices} devices: {rep.makespan_s:.2f} s" + (f", {kill} killed" if kill else ""))
                    return rep

                # A B B A: the machine's other load drifts; the mirrored order cancels a steady drift
                ones, manys = [], []
                for r in range(rounds):
                    if r % 2 == 0:
                        ones.append(await one_device())
                        manys.append(await all_devices(0))
                    else:
                        manys.append(await all_devices(0))
                        ones.append(await one_device())
                failed = await all_devices(fail) if fail else None
        finally:
            stop_agents(list(procs.values()))
            if embedded is not None:
                await embedded.stop()
    return _summary(ones, manys, failed, devices, fail, killed, model, chunks, tokens, load_before)


def _summary(ones: list[RunReport], manys: list[RunReport], failed: RunReport | None, devices: int, fail: int,
             killed: list[str], model: str, chunks: int, tokens: int, load_before: float) -> dict[str, Any]:
    """The run under test is the one with failures when there is one, else the N-device runs."""
    one_s = sum(r.makespan_s for r in ones) / len(ones)
    many_s = sum(r.makespan_s for r in manys) / len(manys)
    many = failed or manys[-1]
    runs = [failed] if failed else manys
    makespan = many.makespan_s if failed else many_s
    completed = all(r.completed for r in runs)
    return {
        "completed": completed,
        "tasks": many.tasks,
        "lost": sum(r.lost for r in runs),
        "duplicates": sum(r.duplicates for r in runs),
        "replaced": sum(r.replaced for r in runs),
        "makespan_s": round(makespan, 3),
        "speedup_vs_one_device": round(one_s / makespan, 3) if completed and makespan else None,
        "one_device_makespan_s": round(one_s, 3),
        "speedup_no_failure": round(one_s / many_s, 3),
        "one_device_runs_s": [round(r.makespan_s, 3) for r in ones],
        "all_device_runs_s": [round(r.makespan_s, 3) for r in manys],
        "planned_makespan_s": many.planned_makespan_s,
        "outputs_match_one_device": completed and all(r.outputs == ones[0].outputs for r in runs),
        "redundant_results": many.redundant_results,
        "timeouts": many.timeouts,
        "retries": many.retries,
        "devices": devices,
        "fail": fail,
        "killed": killed,
        "tasks_per_device": dict(sorted(Counter(many.placements.values()).items())),
        "busy_s_one_device": ones[0].busy_s,
        "busy_s": many.busy_s,
        "model": model,
        "map_tasks": chunks,
        "tokens_per_map_task": tokens,
        "cpu_cores": os.cpu_count(),
        "load_avg_1m_at_start": load_before,
        "error": many.error,
    }


__all__ = ["bench_dag", "bench_document", "bench_graph"]
