"""Policy files read from YAML, with a line number, field path and offending value in every
error (`tandem policy check FILE`), and the one edit tandem makes to them (a calibrated
threshold written back in place, comments kept). The policy itself is in policy.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..protocols.errors import PolicyFileError
from .policy import Policy, QueryRouterSpec


@dataclass(frozen=True)
class PolicyIssue:
    line: int | None
    field: str
    message: str
    value: Any = None
    has_value: bool = False

    def format(self, filename: str = "policy") -> str:
        where = f"{filename}:{self.line}" if self.line else filename
        got = f" (got {self.value!r})" if self.has_value else ""
        return f"{where}: {self.field or '<top>'}: {self.message}{got}"


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_map(text: str) -> tuple[Any, dict[tuple, int], list[PolicyIssue]]:
    """Parse YAML into plain data, the 1-based line of every key / item path, and problems the
    pydantic models cannot see (duplicate keys)."""
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[tuple, int] = {}
    issues: list[PolicyIssue] = []

    def walk(n, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in n.value:
                key = k.value
                line = k.start_mark.line + 1
                if key in seen:
                    issues.append(PolicyIssue(line, _field_path(path + (key,)), f"duplicate key (first on line {seen[key]})", key, True))
                seen.setdefault(key, line)
                lines.setdefault(path + (key,), line)
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if node is not None:
        lines[()] = node.start_mark.line + 1
        walk(node, ())
    data = yaml.safe_load(text)
    return data, lines, issues


def _locate(loc: tuple, data: Any, lines: dict[tuple, int]) -> tuple[tuple, int | None]:
    """The path of `loc` through the data (pydantic adds type tags to some locs) and its line,
    falling back to the nearest enclosing key."""
    path: tuple = ()
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur, path = cur[part], path + (part,)
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur, path = cur[part], path + (part,)
        elif isinstance(cur, dict) and isinstance(part, str) and not re.search(r"[\[\]\-]", part):
            path = path + (part,)  # a missing key: report it at its parent
            cur = None
        # anything else is a pydantic type tag (e.g. 'literal[...]'): skip it
    probe = path
    while probe not in lines and probe:
        probe = probe[:-1]
    return path, lines.get(probe)


def check_policy_text(text: str) -> tuple[Policy | None, list[PolicyIssue]]:
    """(the policy, []) when valid, else (None, every problem found)."""
    import yaml

    try:
        data, lines, issues = _line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        return None, [PolicyIssue(line, "", f"not valid YAML: {getattr(exc, 'problem', None) or exc}")]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [PolicyIssue(lines.get(()), "", "a policy file is a mapping (key: value lines)", data, True)]
    rules = data.get("rules")
    if isinstance(rules, list):
        first: dict[Any, int] = {}
        for i, r in enumerate(rules):
            name = r.get("name") if isinstance(r, dict) else None
            if isinstance(name, str):
                if name in first:
                    issues.append(PolicyIssue(
                        lines.get(("rules", i, "name")), f"rules[{i}].name",
                        f"rule name used twice (first by rules[{first[name]}])", name, True,
                    ))
                first.setdefault(name, i)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            path, line = _locate(tuple(e["loc"]), data, lines)
            missing = e["type"] == "missing"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown field"
            if "two rules are named" in msg:
                continue  # reported with its line above
            issues.append(PolicyIssue(line, _field_path(path), msg, None if missing else e.get("input"), not missing))
        return None, sorted(issues, key=lambda i: (i.line or 0))
    if issues:
        return None, issues
    return policy, []


def load_policy(path: str | Path) -> Policy:
    """A validated policy from a YAML file; raises PolicyFileError listing every problem."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    policy, issues = check_policy_text(text)
    if policy is None:
        raise PolicyFileError(str(path), issues)
    return policy


def default_policy() -> Policy:
    """The policy `auto` mode uses when it is given none: no rules; the default query router
    decides, hard queries (score >= 0.5: the strong model is expected to do better) go
    speculative, easy ones stay local; offline is local."""
    from .base import DEFAULT_QUERY_ROUTER

    return Policy(name="default", query_router=QueryRouterSpec(name=DEFAULT_QUERY_ROUTER))


def with_query_router_threshold(text: str, router: str, threshold: float) -> str:
    """A policy file's text with its top-level `query_router` block set to `router` and
    `threshold` (any `cloud_share` dropped; its modes kept), every other line untouched; the block
    is appended when the file has none. The result is validated: PolicyFileError if it is not a
    valid policy.

    The block runs from the line `query_router:` to the next line that starts in column 0 with
    anything but a comment."""
    import yaml

    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"query_router\s*:", ln)), None)
    end = start
    if start is not None:
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
            end += 1
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1  # trailing blank or comment lines belong to what follows
    old = (yaml.safe_load("\n".join(lines[start:end])) or {}).get("query_router") if start is not None else None
    spec = dict(old) if isinstance(old, dict) else {}
    spec.pop("cloud_share", None)
    spec.update(name=router, threshold=round(float(threshold), 6))
    block = ["query_router:"] + [f"  {k}: {json.dumps(v)}" for k, v in spec.items()]
    if start is None:
        new = lines + ([""] if lines and lines[-1].strip() else []) + block
    else:
        new = lines[:start] + block + lines[end:]
    result = "\n".join(new) + "\n"
    policy, issues = check_policy_text(result)
    if policy is None:
        raise PolicyFileError("<policy>", issues)
    return result


__all__ = ["PolicyIssue", "check_policy_text", "load_policy", "default_policy", "with_query_router_threshold"]
