"""`tandem generate` and `tandem models`, and the command tree: each group's commands live in
their own module (bench, gateway, route/policy, dag/device, playground) and register here."""

from __future__ import annotations

import asyncio
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ...protocols.errors import TandemError
from ...protocols.messages import Constraint
from ..client import DEFAULT_DRAFTER, DEFAULT_TARGET, Client
from . import bench, dag, device, gateway, playground, route
from .common import err, fail, origin_legend, origin_writer

app = typer.Typer(help="tandem: a device model drafts, a cloud model verifies.", no_args_is_help=True, add_completion=False)
gateway_app = typer.Typer(help="Run the cloud gateway.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True)
models_app = typer.Typer(help="Models tandem knows.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.add_typer(route.route_app, name="route")
app.add_typer(route.policy_app, name="policy")
dag.register(app, bench_app)
bench.register(bench_app)
device.register(bench_app)
gateway.register(gateway_app, bench_app)
playground.register(app)


class ModeChoice(str, Enum):
    local = "local"
    cloud = "cloud"
    speculative = "speculative"
    assist = "assist"
    auto = "auto"



def _draft_len(value: str):
    if value == "auto":
        return "auto"
    if value.isdigit() and 0 <= int(value) <= 64:
        return int(value)
    fail(f"--draft-len must be 'auto' or a number from 0 to 64, not '{value}'", code=2)


def _usage_table(record) -> Table:
    u = record.usage
    table = Table(title=f"usage ({record.mode})", show_header=False, box=None)
    rows = [
        ("tokens", len(record.tokens)),
        ("local tokens (drafted)", u.local_tokens),
        ("accepted drafts", u.accepted_tokens),
        ("cloud tokens", u.cloud_tokens),
        ("rounds", u.rounds),
        ("acceptance", f"{u.acceptance_rate:.1%}" if u.tested_tokens else "-"),
        ("bytes up / down", f"{u.bytes_up:,} / {u.bytes_down:,}"),
        ("time to first token", f"{record.ttft_ms:,.0f} ms" if record.ttft_ms is not None else "-"),
        ("wall", f"{u.wall_s:.2f} s ({len(record.tokens) / u.wall_s:.1f} tok/s)" if u.wall_s else "-"),
        ("fallbacks", u.fallbacks),
    ]
    if u.forced_tokens:
        rows.insert(3, ("forced by the grammar", u.forced_tokens))
    for k, v in rows:
        table.add_row(k, str(v))
    return table


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user prompt (rendered with each model's chat template)."),
    mode: ModeChoice = typer.Option(ModeChoice.speculative, help="Who generates."),
    drafter: str = typer.Option(DEFAULT_DRAFTER, help="Device model: a registered name, a path, NAME:int8."),
    target: Optional[str] = typer.Option(None, help=f"Cloud model (in-process gateway; default {DEFAULT_TARGET})."),
    gateway: str = typer.Option("inproc", help="'inproc' (a gateway in this process) or the gateway's URL."),
    max_new_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None),
    draft_len: str = typer.Option("auto", help="Tokens drafted per verify round: a number, or 'auto' (from live acceptance and round-trip time)."),
    raw: bool = typer.Option(False, help="Complete the prompt as raw text, without a chat template."),
    policy: Optional[Path] = typer.Option(None, help="A routing policy (YAML) for --mode auto."),
    tag: list[str] = typer.Option([], "--tag", help="A tag describing the request to the policy (repeatable), e.g. --tag privacy."),
    schema: Optional[Path] = typer.Option(None, help="Hold the answer to this JSON Schema (a .json file), in any mode."),
    regex: Optional[str] = typer.Option(None, help="Hold the answer to this regular expression, in any mode."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    no_color: bool = typer.Option(False, "--no-color", help="Plain text even on a terminal (so does NO_COLOR=1)."),
) -> None:
    """Generate text; streams it to stdout as it is accepted (the usage table goes to stderr). On a
    terminal each piece is coloured by who produced it: a draft the cloud accepted, the cloud's
    own token, or the device alone; piped output is plain text."""

    k = _draft_len(draft_len)
    write = origin_writer(color=not no_color)
    structure = {}
    if schema is not None and regex is not None:
        fail("give --schema or --regex, not both", code=2)
    if schema is not None:
        try:
            structure["response_format"] = json.loads(schema.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fail(f"--schema {schema}: {exc}", code=2)
    if regex is not None:
        structure["constraint"] = Constraint(kind="regex", source=regex)

    async def run():
        async with Client(drafter=drafter, target=target, gateway=gateway, mode=mode.value, draft_len=k, policy=policy) as client:
            gen = client.stream(
                prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=not raw,
                tags=frozenset(tag), **structure,
            )
            async for piece in gen:
                if not as_json:
                    write(piece)
            return gen.record

    try:
        record = asyncio.run(run())
    except TandemError as exc:
        fail(str(exc))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), code=2)
    if as_json:
        print(json.dumps({"text": record.text, "mode": record.mode, "usage": {**record.usage.to_dict(), "ttft_ms": record.ttft_ms},
                          "tokens": len(record.tokens), "finish_reason": record.finish_reason,
                          "decision": record.decision, **({"parsed": record.parsed, "parse_error": record.parse_error}
                                                          if schema is not None else {})}, default=str))
    else:
        sys.stdout.write("\n")
        if write.colored:
            err.print(origin_legend())
        err.print(_usage_table(record))


@models_app.command("list")
def models_list() -> None:
    """Registered model names (paths and NAME:int8 work too)."""
    from ...local_runtime.models import known_models

    for name, about in known_models().items():
        print(f"{name:16s} {about}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
