"""The task-graph commands: `tandem device serve` and `tandem bench dag`."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import typer

from ...protocols.errors import TandemError
from .common import err, fail

device_app = typer.Typer(help="Device agents for task graphs (MQTT).", no_args_is_help=True)



@device_app.command("serve")
def device_serve(
    id: str = typer.Option(..., "--id", help="Device id: its topic level and, on a secured broker, its username."),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", help="mqtt://[user:password@]host[:port][?protocol=5|3.1.1]"),
    model: str = typer.Option("smollm2-135m", help="The model this device runs (a registered name, a path, NAME:int8; 'none': functions only)."),
    threads: int = typer.Option(1, min=1, help="torch threads for this device's model."),
    power: str | None = typer.Option(None, help="mains | battery | unknown (default: read from the system)."),
    data: list[str] = typer.Option([], help="Private data held here, NAME=FILE (repeatable); only private nodes read it."),
    functions: list[str] = typer.Option([], help="Module prefixes of functions this device runs (repeatable; default: tandem's library)."),
    heartbeat_s: float = typer.Option(2.0, min=0.05, help="Seconds between heartbeats."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a device agent: announce capabilities, heartbeat, run the tasks sent to this device."""
    from ...protocols.mqtt import check_device_id
    from ..taskgraph.agent import DEFAULT_FUNCTIONS, serve_device

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        check_device_id(id)
    except ValueError as exc:
        fail(str(exc), code=2)
    if power not in (None, "mains", "battery", "unknown"):
        fail(f"--power must be mains, battery or unknown, not '{power}'", code=2)
    held: dict[str, str] = {}
    for item in data:
        name, sep, path = item.partition("=")
        if not sep or not name:
            fail(f"--data takes NAME=FILE, got '{item}'", code=2)
        try:
            held[name] = Path(path).read_text()
        except OSError as exc:
            fail(f"--data {name}: {exc}", code=2)
    err.print(f"device [bold]{id}[/]: model {model}, broker {broker.split('@')[-1]}")
    try:
        serve_device(
            id, broker, model=None if model.lower() == "none" else model, threads=threads, power=power, data=held,
            functions=tuple(functions) or DEFAULT_FUNCTIONS, heartbeat_s=heartbeat_s,
        )
    except (TandemError, ValueError) as exc:
        fail(str(exc))


def bench_dag_cmd(
    devices: int = typer.Option(3, min=1, help="Device agents (one process each)."),
    fail: int = typer.Option(0, min=0, help="Devices killed mid-run (SIGKILL)."),
    model: str = typer.Option("tiny-llama", help="The devices' model (tiny-llama: seconds; smollm2-135m: the real one)."),
    chunks: int = typer.Option(12, min=1, help="Map tasks (document chunks)."),
    tokens: int = typer.Option(160, min=1, help="New tokens per map task."),
    broker: str | None = typer.Option(None, help="An existing broker's URL (default: amqtt in this process)."),
    rounds: int = typer.Option(2, min=1, help="1-device/N-device pairs, in mirrored order (1 N N 1 ...)."),
    timeout_s: float = typer.Option(300.0, min=1.0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A task graph over N device agents on a broker, K of them killed mid-run; against 1 device."""
    from ..bench.dag import bench_dag

    try:
        result = asyncio.run(
            bench_dag(devices=devices, fail=fail, model=model, chunks=chunks, tokens=tokens, broker=broker,
                      rounds=rounds, timeout_s=timeout_s, log=lambda line: err.print(line.strip(), highlight=False))
        )
    except ValueError as exc:
        fail(str(exc), code=2)
    except TandemError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:26s} {json.dumps(v)}")
    if not result["completed"]:
        raise typer.Exit(1)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(device_app, name="device")
    bench_app.command("dag")(bench_dag_cmd)


__all__ = ["bench_dag_cmd", "device_app", "register"]
