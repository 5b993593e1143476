"""Task graphs: declaration (Python and YAML), validation errors, and runs over an embedded broker
with in-process device agents on tiny models."""

import asyncio
import contextlib
from pathlib import Path

import pytest

from tandem.sdk.taskgraph import LLM, Function, Graph, GraphError, Map, Reduce
from tandem.sdk.taskgraph.graph import render_prompt, template_fields
from tandem.sdk.taskgraph.spec import load_graph_spec

from .conftest import run

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _problems(exc_info) -> str:
    return "\n".join(exc_info.value.problems)


# -- declaration and validation ----------------------------------------------------------------


def test_python_graph_infers_inputs_and_outputs():
    g = Graph(
        [
            Function("chunks", "tandem.sdk.taskgraph.library:split_chunks", inputs=["doc"], kwargs={"size": 50}),
            Map("notes", over="chunks", prompt="Q: {question}\n{item}"),
            Reduce("answer", over="notes", prompt="{items}\nSo: {question}"),
        ],
        inputs=["doc", "question"],
    )
    assert g["notes"].reads() == ["chunks", "question"]
    assert g["answer"].reads() == ["notes", "question"]
    assert g.outputs == ["answer"]
    assert [n.name for n in g.order()] == ["chunks", "notes", "answer"]
    assert template_fields("{a} {b.x} {a}") == ["a", "b"]
    assert render_prompt("{items}|{q}", {"items": ["x", "y"], "q": 1}) == "x\ny|1"


def test_missing_input_names_the_node_and_suggests():
    with pytest.raises(GraphError) as e:
        Graph([LLM("summary", "Summarise {documnet}")], inputs=["document"])
    assert "node 'summary' reads 'documnet', which is neither a graph input nor a node (did you mean 'document'?)" in _problems(e)


def test_cycle_is_reported_as_a_path():
    with pytest.raises(GraphError) as e:
        Graph([LLM("a", "{c}"), LLM("b", "{a}"), LLM("c", "{b}")])
    assert e.value.problems == ["cycle: a -> b -> c -> a"]
    with pytest.raises(GraphError, match="reads itself"):
        Graph([LLM("a", "{a}")])


def test_every_problem_is_listed_at_once():
    with pytest.raises(GraphError) as e:
        Graph(
            [
                LLM("x", "hello"),
                LLM("x", "again"),
                Map("m", over="nowhere", prompt="no item here"),
                Reduce("r", over="x"),
                LLM("leak", "{secret}"),
                Function("p", lambda secret: secret, inputs=["secret"], private=True, requires="gateway"),
            ],
            local_inputs=["secret"],
            outputs=["missing"],
        )
    text = _problems(e)
    for part in [
        "node name 'x' is used twice",
        "node 'm' reads 'nowhere'",
        "a map prompt must use {item}",
        "a reduce needs exactly one of prompt or fn",
        "node 'r' works over 'x', an LLM call that produces text, not a list",
        "node 'leak' reads device-local data ['secret'] but is not tagged private",
        "node 'p' is private, so it cannot require the cloud gateway",
        "output 'missing' is not a node",
    ]:
        assert part in text, part
    assert str(e.value).startswith("graph 'graph' is invalid (")


def test_private_node_must_read_local_data_and_vice_versa():
    with pytest.raises(GraphError, match="tagged private but reads no device-local input"):
        Graph([LLM("p", "{x}", private=True)], inputs=["x"])
    g = Graph([LLM("p", "Summarise {diary}", private=True)], local_inputs=["diary"])
    assert g["p"].private


def test_inputs_are_checked_at_run_time():
    g = Graph([LLM("a", "{x}")], inputs=["x"])
    with pytest.raises(GraphError, match="input 'x' was not given"):
        g.check_inputs({})
    with pytest.raises(GraphError, match="'y' is not an input of this graph"):
        g.check_inputs({"x": 1, "y": 2})


def test_yaml_sample_loads():
    g = load_graph_spec(SAMPLES / "minions.yaml")
    assert [n.name for n in g.nodes] == ["plan", "chunks", "notes", "answer"]
    assert g["plan"].requires == "gateway" and g["answer"].requires == "gateway"
    assert g["notes"].reads() == ["chunks", "plan"]
    assert g.outputs == ["answer"]


def test_yaml_errors_name_node_and_field():
    text = """
nodes:
  a: {prompt: "hi", max_new_tokens: 0}
  b: {map: a, reduce: a, prompt: "{item}"}
  c: {prompt: "x", colour: red}
"""
    with pytest.raises(GraphError) as e:
        load_graph_spec(text)
    p = _problems(e)
    assert "nodes.a.max_new_tokens: Input should be greater than or equal to 1" in p
    assert "nodes.b: Value error, a node is a map or a reduce, not both" in p
    assert "nodes.c.colour: Extra inputs are not permitted" in p
    with pytest.raises(GraphError, match="not valid YAML"):
        load_graph_spec("nodes: [unclosed")
    with pytest.raises(GraphError, match="cycle: a -> b -> a"):
        load_graph_spec("nodes:\n  a: {prompt: '{b}'}\n  b: {prompt: '{a}'}\n")
    with pytest.raises(GraphError, match="cannot import function 'no.such.module:f'"):
        load_graph_spec("inputs: [x]\nnodes:\n  f: {function: 'no.such.module:f', inputs: [x]}\n")


# -- runs: an embedded broker, in-process device agents on tiny models ---------------------------


@contextlib.asynccontextmanager
async def _cluster(agents, gateway=None, **coordinator):
    """An amqtt broker, the given agents running, a coordinator (and a gateway bridge) on it."""
    from tandem.protocols.mqtt import MqttTransport
    from tandem.remote_gateway.mqtt_bridge import MqttBridge
    from tandem.sdk.taskgraph import Coordinator
    from tandem.sdk.taskgraph.agent import DeviceAgent
    from tandem.sdk.taskgraph.broker import EmbeddedBroker

    async with EmbeddedBroker() as broker:
        running = [DeviceAgent(d, broker.url, threads=2, heartbeat_s=0.3, **kw) for d, kw in agents.items()]
        tasks = [asyncio.create_task(a.run()) for a in running]
        bridge = await MqttBridge(gateway, broker.url).start() if gateway is not None else None
        transport = MqttTransport(broker.url, timeout_s=30) if gateway is not None else None
        try:
            async with Coordinator(broker.url, gateway=transport, **coordinator) as coord:
                await coord.wait_for_devices(len(agents), timeout_s=30)
                yield coord, {a.device_id: a for a in running}
        finally:
            if bridge is not None:
                await bridge.stop()
            if transport is not None:
                await transport.aclose()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_constraints_place_private_and_cloud_nodes(tiny_gateway):
    """Private data never leaves the device that holds it; a node that requires the cloud runs
    on the gateway (through the MQTT bridge); plain lambdas run on the host."""
    g = Graph(
        [
            Function("chunks", "tandem.sdk.taskgraph.library:split_chunks", inputs=["doc"], kwargs={"size": 25}),
            Map("notes", over="chunks", prompt="Note: {item}", max_new_tokens=12),
            LLM("mine", "Diary: {diary}", private=True, max_new_tokens=8),
            Reduce("answer", over="notes", prompt="{items}\nAnswer:", requires="gateway", max_new_tokens=8),
            Function("both", lambda answer, mine: [answer, mine], inputs=["answer", "mine"]),
        ],
        inputs=["doc"],
        local_inputs=["diary"],
        outputs=["both", "notes"],
    )
    agents = {"dev-a": {"model": "tiny-llama", "data": {"diary": "my secret diary"}}, "dev-b": {"model": "tiny-llama-b"}}

    async def go():
        async with _cluster(agents, gateway=tiny_gateway) as (coord, running):
            report = await coord.run(g, {"doc": "One two three four. Five six seven eight. Nine ten."})
            return report, {d: a.lm for d, a in running.items()}

    report, lms = run(go())
    where = {t.split("/", 1)[1]: d for t, d in report.placements.items()}
    assert where["mine"] == "dev-a" and where["answer"] == "gateway"
    assert where["chunks"] == "host" and where["both"] == "host"
    assert {where[n] for n in where if n.startswith("notes/")} <= {"dev-a", "dev-b"}
    answer, mine = report.outputs["both"]
    assert isinstance(answer, str) and isinstance(mine, str)
    # each map note is exactly what the model of the device that ran it writes
    from tandem.local_runtime.sequence import generate_alone
    from tandem.sdk.taskgraph.library import split_chunks

    for i, chunk in enumerate(split_chunks("One two three four. Five six seven eight. Nine ten.", 25)):
        lm = lms[where[f"notes/{i}"]]
        tok = lm.tokenizer
        expected = tok.text(generate_alone(lm, tok.prompt_tokens(f"Note: {chunk}", chat=False), 12))
        assert report.outputs["notes"][i] == expected


def test_inputs_a_device_holds_travel_as_references():
    """b reads a's output on the same device: sent as a reference. A device that has dropped it
    (keep_results=0) says so and gets the value; the results are the same."""
    g = Graph([LLM("a", "Start: {x}", max_new_tokens=10), LLM("b", "Then: {a}", max_new_tokens=10)], inputs=["x"],
              outputs=["a", "b"])

    async def go(keep):
        async with _cluster({"dev": {"model": "tiny-llama", "keep_results": keep}}) as (coord, _):
            return await coord.run(g, {"x": "hello"})

    kept, dropped = run(go(2048)), run(go(0))
    assert kept.outputs == dropped.outputs
    assert not any("no longer holds an input" in e for e in kept.events)
    assert any("dev no longer holds an input" in e for e in dropped.events)


def test_deadlines_replace_slow_tasks_and_bound_the_run():
    """A task past its deadline is placed again elsewhere while the first attempt goes on; the
    first result to arrive wins. A run past its own deadline fails with a report."""
    from tandem.sdk.taskgraph import GraphRunError

    def nap(seconds, deadline):
        return Graph([Function("nap", "tandem.sdk.taskgraph.library:pause", kwargs={"value": seconds, "seconds": seconds},
                               deadline_s=deadline)])

    agents = {"dev-0": {"model": None}, "dev-1": {"model": None}}

    async def go():
        async with _cluster(agents, run_functions_here=False) as (coord, _):
            rescued = await coord.run(nap(0.8, 0.3), {})
            with pytest.raises(GraphRunError, match="missed its deadline of 1 s") as e:
                await coord.run(nap(2.0, 0.3), {}, deadline_s=1)
            only = await coord.run(nap(0.05, 5), {}, devices=["dev-1"])
            return rescued, e.value.report, only

    rescued, failed, only = run(go())
    assert rescued.completed and rescued.outputs == {"nap": 0.8} and rescued.timeouts >= 1
    assert any("missed its deadline on dev-" in e for e in rescued.events)
    assert not failed.completed and failed.lost == 1 and failed.timeouts >= 1
    assert only.outputs == {"nap": 0.05} and set(only.placements.values()) == {"dev-1"}
