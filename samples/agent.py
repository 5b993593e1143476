"""A device-side agent: the model calls tools that run here, on the device, and answers from their
results. The gateway verifies what the device drafts (speculative mode), tool calls included.

    python samples/agent.py [--question TEXT] [--folder DIR] [--mode MODE] [--gateway URL|inproc]

Three tools:
    calculator   evaluates arithmetic (parsed, never eval'd)
    list_files   the files in one sandboxed folder
    read_file    a file from that folder; marked local_only: once the agent has read a file, every
                 later turn runs on the device alone (what the file says never reaches the gateway)

Tool calls print as they run; the model's text is coloured by who produced it (drafted and
accepted, chosen by the cloud model, or written on the device alone).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import operator
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from tandem.sdk import Client
from tandem.sdk.agent import Agent, tool
from tandem.sdk.cli.common import origin_legend, origin_writer
from tandem.sdk.client import DEFAULT_DRAFTER, DEFAULT_TARGET

console = Console(stderr=True)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv, ast.USub: operator.neg}


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as 1234 * 5678 or (2 + 3) ** 2 / 4."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / // % ** are allowed")

    return str(ev(ast.parse(expression, mode="eval").body))


def sandbox_tools(folder: Path):
    root = folder.resolve()

    def inside(name: str) -> Path:
        path = (root / name).resolve()
        if root not in path.parents and path != root:
            raise ValueError(f"'{name}' is outside the agent's folder")
        return path

    @tool
    def list_files() -> list[str]:
        """List the files the agent may read."""
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    @tool(local_only=True)
    def read_file(name: str) -> str:
        """Read a text file from the agent's folder (at most 4000 characters)."""
        return inside(name).read_text(encoding="utf-8", errors="replace")[:4000]

    return [list_files, read_file]


def example_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tandem-agent-"))
    (folder / "invoice.txt").write_text("Invoice 2291\n3 licences at 149.50 EUR each\nDiscount: 10%\n", encoding="utf-8")
    (folder / "notes.md").write_text("Meeting moved to Thursday 10:00.\n", encoding="utf-8")
    return folder


async def main_async(args) -> None:
    folder = Path(args.folder) if args.folder else example_folder()
    write = origin_writer()

    def on_step(step) -> None:
        sys.stdout.write("\n")
        status = f"[red]{step.error}[/]" if step.error else f"[green]{step.result[:120]!r}[/]"
        console.print(f"[bold magenta]tool[/] {step.name}({step.arguments}) -> {status}  [dim]({step.seconds:.2f} s)[/]")

    async with Client(drafter=args.drafter, target=args.target, gateway=args.gateway) as client:
        agent = Agent(client, [calculator, *sandbox_tools(folder)], mode=args.mode, max_steps=args.max_steps,
                      max_new_tokens=args.max_new_tokens, on_text=lambda piece, mode: write(piece), on_step=on_step)
        console.print(f"[bold]question:[/] {args.question}\n[bold]folder:[/] {folder}")
        result = await agent.run(args.question)
    sys.stdout.write("\n")
    if write.colored:
        console.print(origin_legend())
    u = result.usage
    local = f", on the device alone from turn {result.local_only_from} (a local_only tool ran)" if result.local_only_from else ""
    console.print(f"{result.turns} turns, {len(result.trace)} tool calls, stopped: {result.stopped}{local} | "
                  f"{u.local_tokens} drafted, {u.accepted_tokens} accepted, {u.forced_tokens} forced by the grammar, "
                  f"{u.cloud_tokens} from the cloud | {u.wall_s:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", default="How much do 3 licences at 149.50 EUR each cost after a 10% discount? Use the calculator.")
    ap.add_argument("--folder", help="The folder read_file may read (default: a temporary one with two example files).")
    ap.add_argument("--drafter", default=DEFAULT_DRAFTER)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--gateway", default="inproc", help="A running gateway's URL, or 'inproc' to start one in this process.")
    ap.add_argument("--mode", default="speculative", choices=["local", "cloud", "speculative", "assist", "auto"])
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
