"""What a constraint may say, checked before anything compiles it, and what an API call asks
for as one: JSON Schema checks (the keyword and its path, the nesting depth), the model's tool-call
envelope (its schema, its grammar, and reading calls back out of text), and OpenAI-style arguments
(tools, tool_choice, response_format, or a pydantic model) turned into a `Constraint`.

Pure data: no grammar engine here. grammar.py compiles what this module describes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..protocols.errors import GrammarError
from ..protocols.messages import Constraint

MAX_SCHEMA_DEPTH = 16  # nesting of objects/arrays/combinators in a JSON Schema
MAX_SOURCE_BYTES = 64_000  # a schema, regex or tool list as sent
# compact, deterministic JSON the way models write it: {"a": 1, "b": [2, 3]}
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# what a schema may use: llguidance compiles these; annotations are accepted and ignored
SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "format",
    "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minProperties", "maxProperties", "uniqueItems",
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "strict", "readOnly", "writeOnly",
    "deprecated", "x-guidance",
})
# keywords whose value is a map of name -> subschema, or a list of subschemas
_SCHEMA_MAPS = {"properties", "$defs", "definitions"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_SCHEMA_ONE = {"items", "additionalProperties"}
TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")

# -- JSON Schema checks ------------------------------------------------------------------------------


def check_schema(schema: Any, param: str = "response_format") -> None:
    """Refuse what the compiler would choke on or silently ignore, naming the keyword and where
    it is: a schema that is not an object, an unknown keyword, nesting past MAX_SCHEMA_DEPTH."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{param}: a JSON Schema must be an object, not {type(schema).__name__}", param=param)
    if len(json.dumps(schema)) > MAX_SOURCE_BYTES:
        raise GrammarError(f"{param}: the schema is over {MAX_SOURCE_BYTES} bytes", param=param, too_large=True)

    def walk(node: Any, path: str, depth: int) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise GrammarError(f"{param}: {path or '(root)'} must be a schema object", param=param, path=path)
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"{param}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels at {path}", param=param, path=path)
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if key not in SCHEMA_KEYWORDS:
                raise GrammarError(f"{param}: unsupported JSON Schema keyword '{key}' at {here}", param=param, path=here)
            if key in _SCHEMA_MAPS:
                if not isinstance(value, dict):
                    raise GrammarError(f"{param}: {here} must map names to schemas", param=param, path=here)
                for name, sub in value.items():
                    walk(sub, f"{here}.{name}", depth + 1)
            elif key in _SCHEMA_LISTS:
                if not isinstance(value, list):
                    raise GrammarError(f"{param}: {here} must be a list of schemas", param=param, path=here)
                for i, sub in enumerate(value):
                    walk(sub, f"{here}[{i}]", depth + 1)
            elif key in _SCHEMA_ONE and not isinstance(value, bool):
                walk(value, here, depth + 1)

    walk(schema, "", 0)


# -- tool calls: the model's own envelope --------------------------------------------------------------


def check_tools(tools: Sequence[dict], param: str = "tools") -> None:
    """Each tool is {"name", "description"?, "parameters"?}: names are identifiers and distinct,
    parameters a JSON Schema of an object."""
    if not tools:
        raise GrammarError(f"{param}: give at least one tool", param=param)
    seen = set()
    for i, t in enumerate(tools):
        name = t.get("name") if isinstance(t, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise GrammarError(f"{param}[{i}].name: {name!r} is not an identifier ([A-Za-z_][A-Za-z0-9_-]*, up to 64)",
                               param=param, path=f"[{i}].name")
        if name in seen:
            raise GrammarError(f"{param}[{i}].name: '{name}' is given twice", param=param, path=f"[{i}].name")
        seen.add(name)
        check_schema(t.get("parameters") or {"type": "object"}, param=f"{param}[{i}].parameters")


def tool_call_schema(tools: Sequence[dict]) -> dict:
    """One call: {"name": <a tool's name>, "arguments": <its parameters>}, in that order."""
    options = [{
        "type": "object",
        "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def tool_call_lark(tools: Sequence[dict], parallel: bool) -> str:
    """Qwen2.5's envelope (its chat template's): `<tool_call>\\n{json}\\n</tool_call>`, one or
    several (parallel) separated by a newline."""
    schema = {**tool_call_schema(tools), "x-guidance": JSON_OPTIONS}
    calls = 'call ("\\n" call)*' if parallel else "call"
    return (
        f"start: {calls}\n"
        f"call: {json.dumps(TOOL_CALL_OPEN)} body {json.dumps(TOOL_CALL_CLOSE)}\n"
        f"body: %json {json.dumps(schema)}\n"
    )


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text it wrote (OpenAI's shape); `error`
    says why it does not parse, when it does not (the application decides what to do)."""

    id: str
    name: str
    arguments: str
    error: str | None = None

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)


_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*', re.S)
CALL_CLOSE = "</tool_call>"


def call_head(body: str) -> tuple[str, int] | None:
    """(the tool's name, where its arguments start) once a call's text has got that far."""
    m = _HEAD.match(body)
    return (m.group(1), m.end()) if m else None


def call_arguments(raw: str, complete: bool) -> str:
    """The arguments' JSON text within a call's text after `"arguments": `. While the call is
    still streaming, what might be the envelope's end (its closing brace, a partial closing
    tag, trailing space) is held back, so every earlier answer is a prefix of the final one."""
    s = raw.split(CALL_CLOSE, 1)[0] if complete else raw
    if not complete:
        for n in range(len(CALL_CLOSE), 0, -1):
            if s.endswith(CALL_CLOSE[:n]):
                s = s[:-n]
                break
    s = s.rstrip()
    return s[:-1].rstrip() if s.endswith("}") else s


def parse_tool_calls(text: str, id_prefix: str = "call_", names: Sequence[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(the text before the first call, the calls) from a model's output in the tool-call
    envelope. `arguments` is the JSON text as the model wrote it. A call that does not parse is
    kept, with its raw text and the error. Small models sometimes write a call without the
    envelope: an answer that is nothing but {"name": <one of `names`>, "arguments": {...}} (in
    a code fence or not) is read as that call too."""
    start = text.find("<tool_call>")
    if start < 0:
        bare = _bare_call(text, names)
        return (text, []) if bare is None else ("", [ToolCall(f"{id_prefix}{hashlib.sha256(text.encode()).hexdigest()[:16]}", *bare)])
    calls = []
    for i, m in enumerate(_CALL.finditer(text, start)):
        body = m.group(1)
        digest = hashlib.sha256(f"{i}:{body}".encode()).hexdigest()[:16]
        head = call_head(body)
        try:
            if head is None:
                raise ValueError('a call is {"name": ..., "arguments": {...}}')
            args = call_arguments(body[head[1]:] + CALL_CLOSE, complete=True)
            json.loads(args)
            if not body.rstrip().endswith("}"):
                raise ValueError("the call's object is not closed")
            calls.append(ToolCall(f"{id_prefix}{digest}", head[0], args))
        except ValueError as exc:
            calls.append(ToolCall(f"{id_prefix}{digest}", head[0] if head else "", body, error=str(exc)))
    return text[:start].rstrip(), calls


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _bare_call(text: str, names: Sequence[str] | None) -> tuple[str, str] | None:
    """(name, arguments) when the whole answer is one call written without the envelope: a JSON
    object {"name": a known tool, "arguments": {...}}, maybe in a ```json fence (as
    Qwen2.5-Coder often writes it). The arguments are then re-serialised compactly."""
    body = text.strip()
    if m := _FENCE.match(body):
        body = m.group(1)
    if not names or not (body.startswith("{") and body.endswith("}")):
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments", {}), dict):
        return None
    return obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)


# -- what an API call asks for, as a constraint ------------------------------------------------------------


def plain_tools(tools: Sequence[Any] | None) -> list[dict] | None:
    """Tools as {name, description, parameters}, from that shape or OpenAI's
    {"type": "function", "function": {...}}; checked (GrammarError names the tool)."""
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and "function" in t:
            if t.get("type", "function") != "function":
                raise GrammarError(f"tools[{i}].type: only 'function' tools are supported, not {t.get('type')!r}",
                                   param="tools", path=f"[{i}].type")
            t = t["function"]
        if not isinstance(t, dict):
            raise GrammarError(f"tools[{i}]: a tool is an object with a name and parameters", param="tools", path=f"[{i}]")
        out.append({k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None})
    check_tools(out)
    return out


def schema_of(response_format: Any) -> tuple[str, dict | None]:
    """(kind, schema) for a response format: a pydantic model class, a JSON Schema dict, or
    OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}."""
    if response_format is None:
        return "text", None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return "json_schema", closed(response_format.model_json_schema())
    if not isinstance(response_format, dict):
        raise GrammarError("response_format: give a pydantic model class, a JSON Schema or an OpenAI response format",
                           param="response_format")
    kind = response_format.get("type")
    if kind in ("text", "json_object"):
        return kind, None
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        schema = response_format["json_schema"].get("schema")
        if not isinstance(schema, dict):
            raise GrammarError("response_format.json_schema.schema: give the schema as an object", param="response_format")
        return "json_schema", closed(schema) if response_format["json_schema"].get("strict") else schema
    if kind == "json_schema":
        raise GrammarError("response_format.json_schema: give {\"name\": ..., \"schema\": {...}}", param="response_format")
    return "json_schema", response_format  # a bare JSON Schema


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others (what OpenAI's
    strict mode means, and what a pydantic model means): `additionalProperties: false` where unset."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed(v) if k not in ("enum", "const", "default", "examples") else v) for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def constraint_for(*, tools: list[dict] | None = None, tool_choice: Any = None, response_format: Any = None,
                   parallel_tool_calls: bool = True) -> Constraint | None:
    """The constraint an API call asks for. `tool_choice` "required" or a named function forces
    tool calls in the model's envelope; "auto" (the default with tools) and "none" leave the
    output free (calls are parsed from it afterwards); a JSON response format constrains the answer."""
    kind, schema = schema_of(response_format)
    choice = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else tool_choice
    if isinstance(tool_choice, dict) and not isinstance(choice, str):
        raise GrammarError("tool_choice: name the function as {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           param="tool_choice")
    if choice not in (None, "auto", "none", "required") and not isinstance(tool_choice, dict):
        raise GrammarError(f"tool_choice: {tool_choice!r} is not auto, none, required or a named function", param="tool_choice")
    forced = choice == "required" or isinstance(tool_choice, dict)
    if forced and not tools:
        raise GrammarError("tool_choice: it asks for a tool call but no tools are given", param="tool_choice")
    if isinstance(tool_choice, dict) and choice not in {t["name"] for t in tools}:
        raise GrammarError(f"tool_choice: no tool named '{choice}' among the tools", param="tool_choice")
    if forced and kind != "text":
        raise GrammarError("tool_choice: a forced tool call and a JSON response_format cannot both constrain the output",
                           param="tool_choice")
    if forced:
        named = choice if isinstance(tool_choice, dict) else None
        return Constraint(kind="tool_call", source={"tools": tools, "parallel": bool(parallel_tool_calls), "name": named})
    if kind == "json_object":
        return Constraint(kind="json_object")
    if kind == "json_schema":
        check_schema(schema)
        return Constraint(kind="json_schema", source=schema)
    return None


__all__ = [
    "MAX_SCHEMA_DEPTH", "MAX_SOURCE_BYTES", "JSON_OPTIONS", "check_schema", "check_tools", "tool_call_schema",
    "tool_call_lark", "ToolCall", "call_head", "call_arguments", "parse_tool_calls", "CALL_CLOSE", "plain_tools",
    "schema_of", "closed", "constraint_for",
]
