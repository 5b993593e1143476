"""Task graphs: declaration (Python and YAML), validation errors, and runs over an embedded broker
with in-process device agents on tiny models."""

import asyncio
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
