"""Task graphs in YAML: a pydantic schema for the file, turned into `Graph` nodes.

    name: minions
    inputs: [document, question]
    local_inputs: []                 # data that stays on the device holding it
    nodes:
      chunks:
        function: tandem.sdk.taskgraph.library:split_chunks
        inputs: [document]
        kwargs: {size: 800}
      notes:
        map: chunks                  # one LLM call per chunk
        prompt: "Facts about {question} in:\\n{item}\\n"
        max_new_tokens: 48
      answer:
        reduce: notes                # gather the list
        prompt: "Notes:\\n{items}\\nAnswer {question}:"
        requires: gateway
    outputs: [answer]

A node is an LLM call (`prompt`), a map (`map` + `prompt`), a reduce (`reduce` + `prompt` or
`function`) or a function (`function`). Errors name the node and field (`nodes.notes.map`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...protocols.errors import GraphError
from .graph import LLM, Function, Graph, Map, Node, Reduce


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    map: str | None = Field(None, description="map: the list node or input to work over")
    reduce: str | None = Field(None, description="reduce: the list node or input to gather")
    function: str | None = Field(None, description="'module:name' of a Python function")
    inputs: list[str] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    max_new_tokens: int = Field(64, ge=1, le=32_768)
    chat: bool = False
    ignore_eos: bool = False
    private: bool = False
    requires: Literal["gateway"] | None = None
    model: str | None = None
    deadline_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> NodeSpec:
        if self.map is not None and self.reduce is not None:
            raise ValueError("a node is a map or a reduce, not both")
        if self.map is not None and self.prompt is None:
            raise ValueError("a map needs a prompt (with {item})")
        if self.reduce is not None and (self.prompt is None) == (self.function is None):
            raise ValueError("a reduce needs exactly one of prompt or function")
        if self.map is None and self.reduce is None and (self.prompt is None) == (self.function is None):
            raise ValueError("give a prompt (an LLM call) or a function, or map/reduce over a list")
        return self

    def build(self, name: str) -> Node:
        common = {"private": self.private, "requires": self.requires, "deadline_s": self.deadline_s}
        llm = {"max_new_tokens": self.max_new_tokens, "chat": self.chat, "ignore_eos": self.ignore_eos, "model": self.model}
        if self.map is not None:
            return Map(name, over=self.map, prompt=self.prompt or "", **llm, **common)
        if self.reduce is not None:
            return Reduce(name, over=self.reduce, prompt=self.prompt, fn=self.function, kwargs=self.kwargs, **llm, **common)
        if self.function is not None:
            return Function(name, self.function, inputs=self.inputs or [], kwargs=self.kwargs, **common)
        return LLM(name, self.prompt or "", inputs=self.inputs, **llm, **common)


class GraphSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "graph"
    inputs: list[str] = Field(default_factory=list)
    local_inputs: list[str] = Field(default_factory=list)
    nodes: dict[str, NodeSpec] = Field(min_length=1)
    outputs: list[str] | None = None

    def build(self) -> Graph:
        return Graph(
            [spec.build(name) for name, spec in self.nodes.items()],
            inputs=self.inputs, local_inputs=self.local_inputs, outputs=self.outputs, name=self.name,
        )


def load_graph_spec(source: str | Path) -> Graph:
    """Parse and validate; every problem is raised as one `GraphError`."""
    label = "graph"
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        label = str(path)
        text = path.read_text()
    else:
        text = str(source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GraphError([f"not valid YAML: {exc}"], label) from exc
    if not isinstance(data, dict):
        raise GraphError(["the file must be a mapping with 'nodes' (and 'inputs', 'outputs')"], label)
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()]
        raise GraphError(problems, label) from None
    return spec.build()


__all__ = ["GraphSpec", "NodeSpec", "load_graph_spec"]
