"""Device agents: real `tandem device serve` processes killed or frozen mid-task (their tasks are
placed again and the graph completes, each result applied once), repeated assignments answered
from the stored result, retained capabilities seen by a coordinator that starts later."""

import asyncio
import signal
import subprocess

import pytest

from tandem.protocols.mqtt import Topics, close_client, open_client
from tandem.protocols.taskgraph import TaskAssignment, TaskInput, TaskResult
from tandem.sdk.taskgraph import Coordinator, Function, Graph
from tandem.sdk.taskgraph.agent import DeviceAgent, spawn_agent
from tandem.sdk.taskgraph.broker import EmbeddedBroker

from .conftest import run

pytestmark = pytest.mark.timeout(180)
LIB = "tandem.sdk.taskgraph.library"


def _spawn(device_id: str, url: str) -> subprocess.Popen:
    return spawn_agent(device_id, url, model="none", heartbeat_s=0.3)


def _graph(steps: int = 6, seconds: float = 0.6) -> Graph:
    """`steps` plain functions that each take `seconds` on a device, then one that gathers them."""
    nodes = [Function(f"step{i}", f"{LIB}:pause", kwargs={"value": i, "seconds": seconds}) for i in range(steps)]
    nodes.append(Function("all", f"{LIB}:collect", inputs=[f"step{i}" for i in range(steps)]))
    return Graph(nodes)


async def _interrupt(coord, procs, sig, victims, after_s: float = 0.1):
    """Hit with `sig` a device `after_s` into a task we saw it start, so the task (0.6 s) is
    surely still running when the signal lands (a device about to report a finished task would
    leave nothing to place again)."""
    loop = asyncio.get_running_loop()
    started: dict[tuple[str, frozenset], float] = {}  # (device, its running tasks) -> first seen
    while True:
        now = loop.time()
        for d in procs:
            tasks = frozenset(coord.running_on(d))
            if not tasks or d in victims or procs[d].poll() is not None:
                continue
            if now - started.setdefault((d, tasks), now) >= after_s:
                procs[d].send_signal(sig)
                victims.append(d)
                return d
        await asyncio.sleep(0.01)


def test_devices_lost_mid_task_are_replaced_and_the_graph_completes():
    """Real `tandem device serve` processes. One is killed (its last will marks it offline at
    once), then another is frozen (SIGSTOP: its connection stays open, its heartbeats stop). Both
    times the running task is placed again, the graph completes, and no result is applied twice."""

    async def go():
        async with EmbeddedBroker() as broker:
            procs = {f"dev-{i}": _spawn(f"dev-{i}", broker.url) for i in range(3)}
            victims: list[str] = []
            try:
                async with Coordinator(broker.url, run_functions_here=False) as coord:
                    await coord.wait_for_devices(3, timeout_s=60)
                    reports = []
                    for sig in (signal.SIGKILL, signal.SIGSTOP):
                        hit = asyncio.create_task(_interrupt(coord, procs, sig, victims))
                        reports.append(await coord.run(_graph(), {}, deadline_s=60))
                        assert hit.done(), "the run ended before a device could be interrupted"
                    return reports, victims
            finally:
                for p in procs.values():
                    p.kill()
                    p.wait(timeout=10)

    (killed, frozen), victims = run(go())
    for report in (killed, frozen):
        assert report.completed and report.lost == 0 and report.duplicates == 0
        assert report.replaced >= 1
        assert report.outputs["all"] == list(range(6))
        assert "host" not in report.placements.values()
    assert any(f"device {victims[0]} went offline" in e for e in killed.events), killed.events
    assert any(f"device {victims[1]} stopped sending heartbeats" in e for e in frozen.events), frozen.events


@pytest.mark.slow
def test_bench_dag_with_a_device_killed():
    """The benchmark end to end: LLM tasks on tiny-llama in three device processes, one killed."""
    from tandem.sdk.bench.dag import bench_dag

    result = run(bench_dag(devices=3, fail=1, chunks=6, tokens=48, rounds=1, timeout_s=150))
    assert result["completed"] and result["lost"] == 0 and result["duplicates"] == 0
    assert result["replaced"] >= 1 and len(result["killed"]) == 1
    assert result["outputs_match_one_device"]
    assert result["speedup_vs_one_device"] > 0


def test_a_repeated_assignment_is_answered_from_the_stored_result():
    topics = Topics()

    async def go():
        async with EmbeddedBroker() as broker:
            agent = DeviceAgent("dev-r", broker.url, model=None, heartbeat_s=0.3)
            runner = asyncio.create_task(agent.run())
            client, _ = await open_client(broker.url, identifier="tester")
            try:
                async with asyncio.timeout(20):
                    await agent.connected.wait()
                await client.subscribe(topics.results("dev-r"), qos=1)
                task = TaskAssignment(task_id="run1/f", node="f", kind="function", function=f"{LIB}:word_count",
                                      inputs={"document": TaskInput(value="one two three")})
                forbidden = TaskAssignment(task_id="run1/g", node="g", kind="function", function="os:getcwd")
                results = []
                for t in (task, task, forbidden):  # one at a time: the repeat comes after the first is done
                    await client.publish(topics.tasks("dev-r"), t.model_dump_json().encode(), qos=1)
                    async with asyncio.timeout(10):
                        message = await anext(aiter(client.messages))
                    results.append(TaskResult.model_validate_json(message.payload))
                return results, dict(agent.stats)
            finally:
                await close_client(client)
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)

    results, stats = run(go())
    first, again, refused = results
    assert first.ok and first.output == 3 and not first.replayed
    assert again.ok and again.output == 3 and again.replayed
    assert stats["ran"] == 1 and stats["replayed"] == 1
    assert not refused.ok and refused.error_code == "unsupported" and "does not run functions from 'os'" in refused.error


def test_a_late_coordinator_sees_retained_capabilities():
    async def go():
        async with EmbeddedBroker() as broker:
            agent = DeviceAgent("dev-c", broker.url, model="tiny-llama", threads=2, power="battery",
                                data={"diary": "private"}, heartbeat_s=0.3)
            runner = asyncio.create_task(agent.run())
            try:
                await agent.connected.wait()
                async with Coordinator(broker.url) as coord:
                    up = await coord.wait_for_devices(1, timeout_s=10)
                    return up, coord.devices["dev-c"].caps
            finally:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)

    up, caps = run(go())
    assert up == ["dev-c"]
    assert caps.models == ["tiny-llama"] and caps.tokens_per_s["tiny-llama"] > 0
    assert caps.power == "battery" and caps.data == ["diary"] and caps.memory_mb > 0
    assert caps.functions == [LIB]
