"""Structured output: a grammar (JSON Schema, any JSON object, a regex, or the model's tool-call
envelope) compiled by llguidance into a mask over the vocabulary at each step.

Both sides compile the same `Constraint` with their own tokenizer: the device drafts under the
mask, the gateway masks the target's logits before the accept rule. A `GrammarState` is one
generation's place in its grammar, kept in line with the tokens generated so far by `sync`, which
rolls back to the common prefix and consumes the rest, so a rejected draft costs nothing more than
a rollback. Where the grammar admits exactly one token (`Mask.only`), the drafter appends it
without running its model: a forced draft, which the target, under the same mask, always accepts.

    allowed(x) = 1 if the grammar admits token x next, else 0
    greedy:    argmax_x  logits[x]            over allowed x
    sampling:  p'(x) = p(x) allowed(x) / sum_y p(y) allowed(y)   (then temperature and top-p)

Compiled grammars are cached by (tokenizer, grammar hash), bounded in count and in source bytes;
a session's state is a copy of the cached matcher. Bad grammars raise `GrammarError`, which names
the request parameter and, for a schema, the keyword and its path.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cachetools import LRUCache

from ..protocols.messages import Constraint

MAX_SCHEMA_DEPTH = 16  # nesting of objects/arrays/combinators in a JSON Schema
MAX_SOURCE_BYTES = 64_000  # a schema, regex or tool list as sent
MAX_COMPILE_S = 2.0  # a grammar that takes longer to compile is refused (and not cached)
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


class GrammarError(ValueError):
    """A constraint that cannot be compiled. `param` names the request field it came from,
    `path` the place in a schema; `too_large` marks a grammar over a size or time limit (413)."""

    def __init__(self, message: str, *, param: str = "constraint", path: str | None = None, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.path = path
        self.too_large = too_large


class GrammarViolation(ValueError):
    """Tokens that the grammar does not admit (a device or a request that did not follow it)."""


def _llg():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - the models and gateway extras install it
        raise GrammarError("structured output needs llguidance: pip install 'tandem[models]'") from exc
    return llguidance


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


def parse_tool_calls(text: str, id_prefix: str = "call_") -> tuple[str, list[ToolCall]]:
    """(the text before the first call, the calls) from a model's output in the tool-call
    envelope. `arguments` is the JSON text as the model wrote it. A call that does not parse is
    kept, with its raw text and the error."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
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
        return "json_schema", response_format.model_json_schema()
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
        return "json_schema", schema
    if kind == "json_schema":
        raise GrammarError("response_format.json_schema: give {\"name\": ..., \"schema\": {...}}", param="response_format")
    return "json_schema", response_format  # a bare JSON Schema


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


# -- compiling -----------------------------------------------------------------------------------------


def grammar_source(c: Constraint) -> str:
    """The llguidance grammar for a constraint (after the checks that name what is wrong)."""
    llg = _llg()
    if c.kind == "json_schema":
        check_schema(c.source)
        return llg.LLMatcher.grammar_from_json_schema(c.source, defaults=JSON_OPTIONS)
    if c.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if c.kind == "regex":
        if not isinstance(c.source, str) or not c.source:
            raise GrammarError("regex: give the pattern as a non-empty string", param="regex")
        if len(c.source) > MAX_SOURCE_BYTES:
            raise GrammarError(f"regex: the pattern is over {MAX_SOURCE_BYTES} bytes", param="regex", too_large=True)
        return llg.LLMatcher.grammar_from_regex(c.source)
    if c.kind == "tool_call":
        src = c.source if isinstance(c.source, dict) else {}
        tools = src.get("tools") or []
        check_tools(tools)
        if src.get("name") is not None:
            tools = [t for t in tools if t["name"] == src["name"]]
            if not tools:
                raise GrammarError(f"tool_choice: no tool named '{src['name']}' among the tools", param="tool_choice")
        return llg.LLMatcher.grammar_from_lark(tool_call_lark(tools, bool(src.get("parallel", True))))
    raise GrammarError(f"unknown constraint kind '{c.kind}'")


def token_bytes(tok: Any, n_vocab: int) -> list[bytes]:
    """Each id's bytes as llguidance wants them: byte-level BPE pieces decoded from GPT-2's
    byte alphabet, SentencePiece pieces with their space marker, `<0xNN>` byte tokens as the
    byte, and control tokens (and ids that decode to nothing) as 0xFF + their name, which no
    grammar admits unless it names them. Ids past the tokenizer's (padding rows) are empty."""
    out = [b""] * n_vocab
    byte_level = any("\u0120" in s or "\u010a" in s for s in list(tok.vocab)[:5000])
    alphabet = _bytes_of_unicode() if byte_level else {}
    for piece, i in tok.vocab.items():
        if i >= n_vocab:
            continue
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            out[i] = bytes([int(m[1], 16)])
        elif i in tok.special_ids:
            out[i] = b"\xff" + piece.encode()
        elif byte_level:  # added tokens (e.g. "<tool_call>") are written as their text
            out[i] = bytes(alphabet[ch] for ch in piece) if all(ch in alphabet for ch in piece) else piece.encode()
        elif tok.decode([i]):
            out[i] = piece.replace("\u2581", " ").encode()
        else:  # an id that decodes to no text (a placeholder): never generated under a grammar
            out[i] = b"\xff" + piece.encode()
    return out


def _bytes_of_unicode() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted (character -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _Wrapped:
    """Our tokenizer in the shape llguidance's TokenizerWrapper reads. A tokenizer without an
    end-of-sequence token gets a virtual one past its vocabulary (never in a logits row)."""

    def __init__(self, tok: Any, n_vocab: int) -> None:
        self.tokens = token_bytes(tok, n_vocab)
        if not tok.eos_token_ids:
            self.tokens.append(b"\xff<eos>")
        self.eos_token_id = tok.eot_token_id if tok.eos_token_ids else n_vocab
        self.bos_token_id = tok.bos_token_id
        self.special_token_ids = sorted(i for i in tok.special_ids if i < n_vocab)
        self._encode = tok.encode

    def __call__(self, s: bytes | str) -> list[int]:
        return self._encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)


_lock = threading.Lock()
_tokenizers: LRUCache = LRUCache(maxsize=8)
# compiled matchers by (tokenizer, grammar hash); weighed by their grammar's size
_compiled: LRUCache = LRUCache(maxsize=16 * 2**20, getsizeof=lambda entry: entry[1])
MAX_COMPILED = 64


def ll_tokenizer(tok: Any, n_vocab: int):
    """The llguidance tokenizer for ours (built once per tokenizer and vocabulary width: ~1 s
    for a 150k vocabulary)."""
    key = (tok.fingerprint, n_vocab)
    with _lock:
        hit = _tokenizers.get(key)
    if hit is not None:
        return hit
    llg = _llg()
    wrapped = _Wrapped(tok, n_vocab)
    built = llg.LLTokenizer(llg.TokenizerWrapper(wrapped), n_vocab=len(wrapped.tokens),
                            eos_token=sorted(set(tok.eos_token_ids)) or wrapped.eos_token_id)
    with _lock:
        _tokenizers[key] = built
    return built


def compile_constraint(c: Constraint, tok: Any, n_vocab: int) -> "GrammarState":
    """A fresh state at the start of `c`'s grammar, over `tok` and logits rows of width n_vocab."""
    source = grammar_source(c)
    key = (tok.fingerprint, n_vocab, hashlib.sha256(source.encode()).hexdigest())
    with _lock:
        entry = _compiled.get(key)
    if entry is None:
        llg = _llg()
        t0 = time.perf_counter()
        matcher = llg.LLMatcher(ll_tokenizer(tok, n_vocab), source, log_level=0, limits=llg.LLParserLimits(verbose_errors=False))
        took = time.perf_counter() - t0
        if matcher.is_error():
            raise _compile_error(c, matcher.get_error())
        if took > MAX_COMPILE_S:
            raise GrammarError(f"{_param(c)}: the grammar took {took:.1f} s to compile (limit {MAX_COMPILE_S} s)",
                               param=_param(c), too_large=True)
        entry = (matcher, len(source))
        with _lock:
            while len(_compiled) >= MAX_COMPILED:
                _compiled.popitem()
            _compiled[key] = entry
    return GrammarState(entry[0].deep_copy(), n_vocab, tok.eos_token_ids)


def _param(c: Constraint) -> str:
    return {"json_schema": "response_format", "json_object": "response_format", "regex": "regex", "tool_call": "tools"}[c.kind]


def _compile_error(c: Constraint, message: str) -> GrammarError:
    too_large = any(w in message.lower() for w in ("limit", "fuel", "too many", "too large", "exceed"))
    return GrammarError(f"{_param(c)}: {message}", param=_param(c), too_large=too_large)


# -- one generation's place in its grammar ---------------------------------------------------------------


@dataclass(frozen=True)
class Mask:
    """What the grammar admits next: `allowed` over the vocabulary, and `only`, the single
    admitted token when there is exactly one (a forced token), else None."""

    allowed: np.ndarray
    only: int | None


class GrammarState:
    def __init__(self, matcher: Any, n_vocab: int, eos: Sequence[int] = ()) -> None:
        self._m = matcher
        self.n_vocab = n_vocab
        self.eos = frozenset(eos)
        self.ended = False  # an end-of-sequence token was taken
        self.tokens: list[int] = []
        self._mask: Mask | None = None

    def sync(self, tokens: Sequence[int]) -> None:
        """Line the state up with `tokens` (everything generated so far): roll back to the
        longest common prefix, consume the rest. Raises GrammarViolation at the first token the
        grammar does not admit (the state then holds the tokens before it). An end-of-sequence
        token is taken where the output is complete, and ends it; the matcher itself never sees
        it, so rolling back over it is only bookkeeping."""
        mine, n = self.tokens, 0
        limit = min(len(mine), len(tokens))
        while n < limit and mine[n] == tokens[n]:
            n += 1
        if n < len(mine):
            undo = len(mine) - n - (1 if self.ended else 0)
            if undo and not self._m.rollback(undo):
                raise RuntimeError(f"the grammar could not roll back {undo} tokens")
            del mine[n:]
            self.ended = False
            self._mask = None
        rest = [int(t) for t in tokens[n:]]
        if rest:
            self._mask = None
        for i, t in enumerate(rest):
            if self.ended:
                raise GrammarViolation(f"token {t} at output position {n + i} follows the end of the output")
            if t in self.eos:
                if not self._m.is_accepting():
                    raise GrammarViolation(f"the output ends at position {n + i} before the grammar is complete")
                self.ended = True
            elif not self._m.try_consume_tokens([t]):
                raise GrammarViolation(f"token {t} at output position {n + i} does not follow the grammar")
            mine.append(t)

    def mask(self) -> Mask:
        if self._mask is None:
            if self.ended:
                allowed = np.zeros(self.n_vocab, dtype=bool)
            else:
                bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
                allowed = np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)
            ids = np.flatnonzero(allowed[: self.n_vocab])
            self._mask = Mask(allowed, int(ids[0]) if len(ids) == 1 else None)
        return self._mask

    @property
    def accepting(self) -> bool:
        """The output so far is complete under the grammar."""
        return bool(self._m.is_accepting())

    @property
    def stopped(self) -> bool:
        """Nothing more can follow (end-of-sequence taken, or the grammar is exhausted)."""
        return self.ended or bool(self._m.is_stopped())


def apply_mask(row: Any, allowed: np.ndarray) -> Any:
    """A logits row (tensor or array) with every token the grammar does not admit at -inf, as a
    float tensor."""
    import torch

    t = row.float() if isinstance(row, torch.Tensor) else torch.from_numpy(np.asarray(row, dtype=np.float32))
    keep = torch.from_numpy(allowed[: t.shape[-1]])
    return torch.where(keep, t, torch.tensor(float("-inf")))


__all__ = [
    "Constraint", "GrammarError", "GrammarViolation", "GrammarState", "Mask", "ToolCall", "compile_constraint",
    "grammar_source", "check_schema", "check_tools", "parse_tool_calls", "tool_call_lark", "apply_mask",
    "token_bytes", "MAX_SCHEMA_DEPTH", "constraint_for", "plain_tools", "schema_of", "call_head", "call_arguments",
    "CALL_CLOSE",
]
