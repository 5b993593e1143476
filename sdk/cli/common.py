"""What every command shares: errors to stderr with an exit code, results as JSON or a table."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ...protocols.errors import TandemError
from ..usage import ORIGIN_NAMES, ORIGIN_STYLES

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit: 1 for a failure, 2 for bad input (a file, an option)."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def run(coro: Coroutine) -> Any:
    """Run a command's coroutine; tandem's own errors exit 1 with their message, bad input 2."""
    try:
        return asyncio.run(coro)
    except TandemError as exc:
        fail(str(exc))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), code=2)




def origin_writer(color: bool = True) -> Callable[[str], None]:
    """A function that writes text pieces to stdout as they come, flushing each: coloured by
    origin on a terminal (unless `color` is off or NO_COLOR is set), plain text otherwise."""
    out = Console(highlight=False, soft_wrap=True, no_color=not color or bool(os.environ.get("NO_COLOR")))
    colored = out.is_terminal and not out.no_color

    def write(piece: str) -> None:
        if colored:
            out.print(piece, style=ORIGIN_STYLES.get(getattr(piece, "origin", ""), ""), end="", markup=False)
        else:
            sys.stdout.write(piece)
        sys.stdout.flush()

    write.colored = colored  # type: ignore[attr-defined]
    return write


def origin_legend() -> Text:
    legend = Text()
    for origin, style in ORIGIN_STYLES.items():
        legend.append(f"■ {ORIGIN_NAMES[origin]}  ", style=style)
    return legend


def print_result(result: dict, title: str, as_json: bool) -> None:
    """One JSON object on stdout, or a two-column table for people."""
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    Console().print(table)



def add_commands(app, commands: dict) -> None:
    """Register each function under its command name (`tandem <group> NAME`)."""
    for name, fn in commands.items():
        app.command(name)(fn)


__all__ = ["add_commands", "err", "fail", "run", "print_result", "origin_writer", "origin_legend", "ORIGIN_STYLES"]
