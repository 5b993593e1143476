"""Task graphs spread over devices: declare (graph.py, or YAML: spec.py), validate, place (HEFT:
placement.py), run over MQTT (executor.py: the coordinator; run.py, contents.py: one run), on
device agents (agent.py) reached through a broker (broker.py: amqtt in-process, mosquitto).

    from tandem.sdk.taskgraph import Graph, Map, Reduce, Function, Coordinator

The graph model and placement import nothing heavy; running needs the `mqtt` extra (aiomqtt).
"""

from importlib import import_module

from ...protocols.errors import GraphError, GraphRunError, PlacementError
from .graph import LLM, Function, Graph, Map, Node, Reduce
from .placement import Done, Job, Proc, Schedule, Slot, heft

_LAZY = {
    "Coordinator": ".executor",
    "RunReport": ".record",
    "load_graph_spec": ".spec",
}

__all__ = [
    "LLM",
    "Coordinator",
    "Done",
    "Function",
    "Graph",
    "GraphError",
    "GraphRunError",
    "Job",
    "Map",
    "Node",
    "PlacementError",
    "Proc",
    "Reduce",
    "RunReport",
    "Schedule",
    "Slot",
    "heft",
    "load_graph_spec",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
