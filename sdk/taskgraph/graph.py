"""A task graph: nodes are LLM calls, maps over chunks, reduces and plain Python functions; edges
are the data one node reads from another. Declared in Python or YAML, validated before it runs.

    g = Graph(
        inputs=["document", "question"],
        nodes=[
            Function("chunks", "tandem.sdk.taskgraph.library:split_chunks", inputs=["document"], kwargs={"size": 800}),
            Map("notes", over="chunks", prompt="Facts in this text about {question}:\\n{item}\\n", max_new_tokens=48),
            Reduce("answer", over="notes", prompt="Notes:\\n{items}\\nAnswer {question}:", requires="gateway"),
        ],
        outputs=["answer"],
    )

A prompt is a `str.format` template; its fields are the node's inputs (a map's item is `{item}`,
a reduce's gathered list is `{items}`, joined by newlines). A graph input declared `local` is
data that stays on the device that holds it: only a node tagged `private` may read it, and
such a node runs only on that device.
"""

from __future__ import annotations

import difflib
import graphlib
import importlib
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ...protocols.errors import GraphError

Requires = Literal["gateway"]


def template_fields(template: str) -> list[str]:
    """The field names of a `str.format` template, in order, without repeats."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise ValueError(f"prompt template fields must be named, got '{{{name}}}' in {template!r}")
        if base not in names:
            names.append(base)
    return names


def render_prompt(template: str, values: Mapping[str, Any]) -> str:
    """Fill a prompt template; a list value becomes its elements, one per line."""
    flat = {k: "\n".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    try:
        return template.format_map(flat)
    except KeyError as exc:
        raise ValueError(f"the prompt needs {exc.args[0]!r}, which the task was not given") from None


def function_ref(fn: Callable | str) -> str | None:
    """'module:qualname' when `fn` can be imported by name elsewhere (so a device may run it)."""
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


def resolve_function(ref: str) -> Callable:
    module, _, qualname = ref.partition(":")
    if not module or not qualname:
        raise ValueError(f"a function reference is 'module:name', got '{ref}'")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"'{ref}' is not callable")
    return obj


@dataclass
class Node:
    name: str
    inputs: list[str] = field(default_factory=list)
    private: bool = False
    requires: Requires | None = None
    model: str | None = None
    deadline_s: float | None = None

    kind = "node"

    def reads(self) -> list[str]:
        """Every name this node reads (graph inputs or other nodes)."""
        return list(self.inputs)


@dataclass
class LLM(Node):
    """One LLM call: `prompt` rendered over the node's inputs."""

    prompt: str = ""
    max_new_tokens: int = 64
    chat: bool = False
    ignore_eos: bool = False

    kind = "llm"

    def __init__(self, name: str, prompt: str, *, inputs: Iterable[str] | None = None, max_new_tokens: int = 64,
                 chat: bool = False, ignore_eos: bool = False, private: bool = False, requires: Requires | None = None,
                 model: str | None = None, deadline_s: float | None = None) -> None:
        super().__init__(name, list(inputs) if inputs is not None else template_fields(prompt), private, requires, model, deadline_s)
        self.prompt, self.max_new_tokens, self.chat, self.ignore_eos = prompt, max_new_tokens, chat, ignore_eos


@dataclass
class Map(Node):
    """One LLM call per element of the list `over` produces; `{item}` is the element, other
    fields are inputs shared by every call. Its output is the list of answers, in order."""

    over: str = ""
    prompt: str = ""
    max_new_tokens: int = 64
    chat: bool = False
    ignore_eos: bool = False

    kind = "map"

    def __init__(self, name: str, *, over: str, prompt: str, max_new_tokens: int = 64, chat: bool = False,
                 ignore_eos: bool = False, private: bool = False, requires: Requires | None = None,
                 model: str | None = None, deadline_s: float | None = None) -> None:
        shared = [f for f in template_fields(prompt) if f != "item"]
        super().__init__(name, shared, private, requires, model, deadline_s)
        self.over, self.prompt, self.max_new_tokens, self.chat, self.ignore_eos = over, prompt, max_new_tokens, chat, ignore_eos

    def reads(self) -> list[str]:
        return [self.over, *self.inputs]


@dataclass
class Reduce(Node):
    """Gather the list `over` produces into one result: an LLM call whose `{items}` is the list
    joined by newlines, or a function called with the list (plus `kwargs`)."""

    over: str = ""
    prompt: str | None = None
    fn: Callable | str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    chat: bool = False
    ignore_eos: bool = False

    kind = "reduce"

    def __init__(self, name: str, *, over: str, prompt: str | None = None, fn: Callable | str | None = None,
                 kwargs: Mapping[str, Any] | None = None, max_new_tokens: int = 64, chat: bool = False,
                 ignore_eos: bool = False, private: bool = False, requires: Requires | None = None,
                 model: str | None = None, deadline_s: float | None = None) -> None:
        shared = [f for f in template_fields(prompt) if f != "items"] if prompt else []
        super().__init__(name, shared, private, requires, model, deadline_s)
        self.over, self.prompt, self.fn, self.kwargs = over, prompt, fn, dict(kwargs or {})
        self.max_new_tokens, self.chat, self.ignore_eos = max_new_tokens, chat, ignore_eos

    def reads(self) -> list[str]:
        return [self.over, *self.inputs]


@dataclass
class Function(Node):
    """A plain Python function, called with its inputs as positional arguments in the order of
    `inputs` (plus `kwargs`).
    Given as 'module:name' (or an importable module-level function), devices that allow its
    module may run it; a lambda or closure runs on the host that runs the graph."""

    fn: Callable | str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    kind = "function"

    def __init__(self, name: str, fn: Callable | str, *, inputs: Iterable[str] = (), kwargs: Mapping[str, Any] | None = None,
                 private: bool = False, requires: Requires | None = None, deadline_s: float | None = None) -> None:
        super().__init__(name, list(inputs), private, requires, None, deadline_s)
        self.fn, self.kwargs = fn, dict(kwargs or {})


class Graph:
    def __init__(
        self,
        nodes: Iterable[Node],
        *,
        inputs: Iterable[str] = (),
        local_inputs: Iterable[str] = (),
        outputs: Iterable[str] | None = None,
        name: str = "graph",
    ) -> None:
        self.name = name
        self.nodes: list[Node] = list(nodes)
        self.inputs: list[str] = list(inputs)
        self.local_inputs: list[str] = list(local_inputs)
        self.outputs: list[str] = list(outputs) if outputs is not None else []
        self.validate()
        if not self.outputs:
            consumed = {r for n in self.nodes for r in n.reads()}
            self.outputs = [n.name for n in self.nodes if n.name not in consumed]

    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    @property
    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def validate(self) -> None:
        """Raise `GraphError` listing every problem: duplicate or unknown names, missing inputs,
        cycles, templates that do not fit their node, private data read by a non-private node."""
        problems: list[str] = []
        names = [n.name for n in self.nodes]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                problems.append(f"node name '{n}' is used twice")
            seen.add(n)
        given = set(self.inputs) | set(self.local_inputs)
        for n in sorted(set(names) & given):
            problems.append(f"'{n}' is both a graph input and a node")
        for n in sorted(set(self.inputs) & set(self.local_inputs)):
            problems.append(f"input '{n}' is declared both plain and local")
        known = given | set(names)
        for node in self.nodes:
            problems += _node_problems(node, known, set(self.local_inputs), self.by_name)
        for out in self.outputs:
            if out not in names:
                problems.append(f"output '{out}' is not a node{_suggest(out, names)}")
        if not problems:
            cycle = _find_cycle(self.nodes)
            if cycle:
                problems.append("cycle: " + " -> ".join(cycle))
        if problems:
            raise GraphError(problems, f"graph '{self.name}'")

    def order(self) -> list[Node]:
        """The nodes in a dependency order (each after everything it reads)."""
        by_name = self.by_name
        return [by_name[name] for name in _sorter(self.nodes).static_order()]

    def check_inputs(self, values: Mapping[str, Any]) -> None:
        missing = [i for i in self.inputs if i not in values]
        extra = [k for k in values if k not in self.inputs]
        problems = [f"input '{m}' was not given" for m in missing]
        problems += [f"'{e}' is not an input of this graph (inputs: {', '.join(self.inputs) or 'none'})" for e in extra]
        if problems:
            raise GraphError(problems, f"the inputs of graph '{self.name}'")

    # -- YAML ----------------------------------------------------------------------------------


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _node_problems(node: Node, known: set[str], local: set[str], by_name: dict[str, Node]) -> list[str]:
    p: list[str] = []
    where = f"node '{node.name}'"
    if not node.name or "/" in node.name or "#" in node.name or "+" in node.name:
        p.append(f"{where}: a name must be non-empty, without '/', '+' or '#'")
    for r in node.reads():
        if r not in known:
            p.append(f"{where} reads '{r}', which is neither a graph input nor a node{_suggest(r, known)}")
        if r == node.name:
            p.append(f"{where} reads itself")
    reads_local = [r for r in node.reads() if r in local]
    if reads_local and not node.private:
        p.append(f"{where} reads device-local data {reads_local} but is not tagged private")
    if node.private and not reads_local:
        p.append(f"{where} is tagged private but reads no device-local input (declare one in local_inputs)")
    if node.private and node.requires == "gateway":
        p.append(f"{where} is private, so it cannot require the cloud gateway")
    if node.requires not in (None, "gateway"):
        p.append(f"{where}: requires must be 'gateway' or nothing, not '{node.requires}'")
    if node.deadline_s is not None and node.deadline_s <= 0:
        p.append(f"{where}: deadline_s must be positive")
    if isinstance(node, (LLM, Map)) and not node.prompt:
        p.append(f"{where} has an empty prompt")
    if isinstance(node, Map):
        fields = template_fields(node.prompt)
        if "item" not in fields:
            p.append(f"{where}: a map prompt must use {{item}} (the element it works on)")
    if isinstance(node, Reduce):
        if (node.prompt is None) == (node.fn is None):
            p.append(f"{where}: a reduce needs exactly one of prompt or fn")
        elif node.prompt is not None and "items" not in template_fields(node.prompt):
            p.append(f"{where}: a reduce prompt must use {{items}} (the gathered list)")
    if isinstance(node, (Map, Reduce)) and node.over in by_name:
        src = by_name[node.over]
        if isinstance(src, (LLM,)) or (isinstance(src, Reduce) and src.prompt is not None):
            p.append(f"{where} works over '{node.over}', an LLM call that produces text, not a list")
    if isinstance(node, (Function, Reduce)) and isinstance(getattr(node, "fn", None), str):
        try:
            resolve_function(node.fn)  # type: ignore[arg-type]
        except (ImportError, AttributeError, ValueError) as exc:
            p.append(f"{where}: cannot import function '{node.fn}': {exc}")
    if isinstance(node, (Function,)) and node.fn is None:
        p.append(f"{where} has no function")
    if isinstance(node, (LLM, Map, Reduce)) and getattr(node, "max_new_tokens", 1) < 1:
        p.append(f"{where}: max_new_tokens must be at least 1")
    return p


def _sorter(nodes: list[Node]) -> graphlib.TopologicalSorter:
    """Each node after the nodes it reads (graph inputs are not nodes, so they do not count)."""
    names = {n.name for n in nodes}
    return graphlib.TopologicalSorter({n.name: [r for r in n.reads() if r in names] for n in nodes})


def _find_cycle(nodes: list[Node]) -> list[str] | None:
    """One cycle as a path of names in data-flow order (producer -> consumer, first == last),
    starting at the node declared first; None when there is none."""
    try:
        _sorter(nodes).prepare()
    except graphlib.CycleError as exc:
        cycle = list(exc.args[1][:-1])
        declared = [n.name for n in nodes]
        start = min(range(len(cycle)), key=lambda i: declared.index(cycle[i]))
        cycle = cycle[start:] + cycle[:start]
        return cycle + cycle[:1]
    return None


__all__ = ["LLM", "Function", "Graph", "Map", "Node", "Reduce", "function_ref", "render_prompt", "resolve_function", "template_fields"]
