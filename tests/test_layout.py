"""The shape of the source tree: modules a newcomer can read whole, and no module reaching into
another's private names. (Import cycles and the arrows between packages are import-linter's
contracts in .importlinter, checked by CI.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocols", "local_runtime", "remote_gateway", "routing", "sdk")
MAX_LINES = 450


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_module_is_longer_than_a_sitting():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def private_imports(source: str) -> list[str]:
    """`from X import _name` lines of one module (module dunders such as `__all__` aside)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return found


def test_the_private_import_check_sees_one():
    assert private_imports("from .run import _Task, Graph\nfrom .x import __all__ as a\n") == ["line 1: from .run import _Task"]


def test_no_module_imports_another_modules_private_names():
    offenders = {str(p.relative_to(ROOT)): hits for p in _modules() if (hits := private_imports(p.read_text()))}
    assert not offenders, offenders
