"""Gateway-side commands: `tandem gateway serve|new-key|nginx|protocol|conformance` and `tandem bench gateway`."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ...protocols.errors import TandemError
from .common import add_commands, err, fail


def gateway_serve(
    config: Optional[Path] = typer.Option(None, help="Gateway config file (YAML); see samples/gateway.yaml."),
    model: Optional[str] = typer.Option(None, help="Target model: NAME, NAME:w8a8|bf16|fp32|int8, NAME@llama.cpp, NAME@auto (default from the config)."),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    device: Optional[str] = typer.Option(None, help="Where the torch target runs: cpu, cuda, cuda:N (refused without CUDA)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for the model (default: the cores this process may use)."),
    replica_id: Optional[str] = typer.Option(None, help="This replica's id, the prefix of its session ids (a StatefulSet passes its pod name)."),
) -> None:
    """Serve the gateway over HTTP (uvicorn)."""
    started = time.monotonic()
    from ...remote_gateway.app import serve
    from ...remote_gateway.backends import make_backend
    from ...remote_gateway.config import load_config
    from ...remote_gateway.service import Gateway

    try:
        cfg = load_config(config)
        given = {"model": model, "host": host, "port": port, "device": device, "threads": threads, "replica_id": replica_id}
        cfg = type(cfg).model_validate({**cfg.model_dump(), **{k: v for k, v in given.items() if v is not None}})
        cfg.check_exposure()
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), code=2)
    keys = cfg.keyring()
    try:
        backend = make_backend(cfg.backend, cfg.model, batching=cfg.batching.enabled, device=cfg.device,
                               threads=cfg.threads, max_sessions=cfg.max_sessions, prompt_batch=cfg.prompt_batch)
        gw = Gateway(limits=cfg.limits(), batching=cfg.batching.config(), backend=backend, replica_id=cfg.replica_id)
        gw.load_s = time.monotonic() - started  # the command's start to ready: the target's load included
    except TandemError as exc:
        fail(str(exc))
    auth = f"{len(keys)} API key(s)" if keys.required else "no API keys (auth: none)"
    err.print(f"gateway: serving [bold]{gw.model_name}[/] on http://{cfg.host}:{cfg.port} (replica {gw.replica_id}, {auth})")
    serve(gw, host=cfg.host, port=cfg.port, log_level=cfg.log_level, keys=keys, log_format=cfg.log_format, edge=cfg.edge.limits())


def gateway_new_key(key_id: str = typer.Argument("my-key", help="The id the key will have in the config.")) -> None:
    """Print a new random API key and the config entry that admits it (only its hash)."""
    from ...remote_gateway.auth import hash_key, new_key

    key = new_key()
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print("config entry (under keys:):")
    print(f"  - id: {key_id}\n    sha256: {hash_key(key)}")


def gateway_nginx(
    replica: list[str] = typer.Option([], "--replica", help="A replica's base URL, http://HOST:PORT, or ID=URL to skip asking it (repeat for each)."),
    listen: str = typer.Option("127.0.0.1:8080", help="Where nginx listens: HOST:PORT."),
    dns: Optional[str] = typer.Option(None, help="Find replicas by DNS instead: the headless Service naming each by its pod name (Kubernetes)."),
    pool: Optional[str] = typer.Option(None, help="With --dns: the Service over every replica, for requests without a session."),
    replica_port: int = typer.Option(8000, help="With --dns: the port the replicas listen on."),
    out: Optional[Path] = typer.Option(None, help="Write the config to this file instead of stdout."),
    run: bool = typer.Option(False, "--run", help="Also run nginx with it, in the foreground (Ctrl-C stops it)."),
) -> None:
    """An nginx config that balances gateway replicas, routing each session to the replica that
    holds it (replica ids asked of each replica's /readyz, given as ID=URL, or found by DNS);
    printed, written, or run. deploy/ holds the configs this writes for Docker Compose and
    Kubernetes."""
    from ...remote_gateway.replicas import discover, nginx_config, nginx_config_dns

    host, colon, port = listen.rpartition(":")
    if not colon or not host or not port.isdigit():
        fail(f"--listen must be HOST:PORT, not '{listen}'", code=2)
    if dns is not None:
        if replica or run or not pool:
            fail("--dns takes --pool, and neither --replica nor --run", code=2)
        try:
            text = nginx_config_dns(dns, pool, replica_port, listen)
        except ValueError as exc:
            fail(str(exc), code=2)
        _emit(text, out, f"replicas under {dns}")
        return
    if not replica:
        fail("give --replica (repeat for each) or --dns", code=2)
    named = dict(r.split("=", 1) for r in replica if "=" in r)
    try:
        replicas = {**named, **discover([r for r in replica if "=" not in r])}
    except Exception as exc:  # noqa: BLE001 - any failure to reach a replica ends here
        fail(f"could not ask every replica for its id: {exc}")
    try:
        text = nginx_config(replicas, listen)
    except ValueError as exc:
        fail(str(exc), code=2)
    if out is not None or not run:
        _emit(text, out, ", ".join(f"{r}={u}" for r, u in replicas.items()))
    if run:
        _run_nginx(replicas, host, int(port))


def _emit(text: str, out: Optional[Path], what: str) -> None:
    if out is None:
        print(text, end="")
    else:
        out.write_text(text, encoding="utf-8")
        err.print(f"wrote {out} for {what}")


def _run_nginx(replicas: dict[str, str], host: str, port: int) -> None:
    """nginx in the foreground with the config above (its temporary files in a folder of its own)."""
    from ..bench.launch import NginxProcess

    try:
        lb = NginxProcess(replicas, port, host=host, quiet=False).start()
    except FileNotFoundError as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(f"nginx did not start: {exc}")
    err.print(f"nginx: {lb.url} -> {', '.join(f'{r}={u}' for r, u in replicas.items())} (Ctrl-C stops it)")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and a process manager's SIGTERM stop it, even where this process was started with
    # SIGINT ignored (a shell's background job)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        code = lb.proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        lb.stop()
    if code:
        fail(f"nginx exited with code {code}")


def bench_gateway_cmd(
    sessions: int = typer.Option(32, min=1, max=1024, help="Concurrent sessions."),
    rounds: int = typer.Option(8, min=1, help="Verify rounds per session."),
    waves: int = typer.Option(1, min=1, help="Times the whole load repeats with fresh sessions (a longer run)."),
    draft_len: int = typer.Option(4, min=0, max=64),
    model: str = typer.Option("gemma3-270m", help="Target model."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Many concurrent sessions against one gateway over HTTP, batched vs unbatched in one run."""
    from ..bench.gateway import bench_gateway

    try:
        result = bench_gateway(model=model, sessions=sessions, rounds=rounds, waves=waves, draft_len=draft_len, progress=err.print)
    except TandemError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result))
    else:
        table = Table(title="bench gateway")
        table.add_column("metric")
        table.add_column("value")
        for k, v in result.items():
            table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        Console().print(table)


def gateway_protocol(
    out: Optional[Path] = typer.Option(None, help="Write it to this file (PROTOCOL.md) instead of stdout."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if --out differs from what would be written."),
) -> None:
    """The wire protocol as Markdown (PROTOCOL.md): operations, JSON Schema of every message, the
    version rule, the error codes; generated from the protocol's own models."""
    from ...protocols.document import render

    text = render()
    if out is None:
        if check:
            fail("--check needs --out FILE", code=2)
        print(text, end="")
    elif check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            fail(f"{out} is out of date: run `tandem gateway protocol --out {out}`")
        err.print(f"{out} is up to date")
    else:
        out.write_text(text, encoding="utf-8")
        err.print(f"wrote {out} ({len(text):,} characters)")


def gateway_conformance(
    url: str = typer.Argument(..., help="The gateway's base URL, e.g. http://127.0.0.1:8000."),
    api_key: Optional[str] = typer.Option(None, envvar="TANDEM_API_KEY", help="A key, when the gateway requires one."),
    timeout_s: float = typer.Option(60.0, min=0.1, help="Seconds to wait for each reply."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Check a gateway against the documented protocol (PROTOCOL.md) over raw HTTP: every
    operation, the replies' schemas, the error codes for bad input. Exit 0 if nothing failed."""
    from ...protocols.conformance import FAIL, PASS, run_conformance

    if not url.startswith(("http://", "https://")):
        fail(f"URL must start with http:// or https://, not '{url}'", code=2)
    report = run_conformance(url, api_key=api_key, timeout_s=timeout_s)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        table = Table(title=f"conformance of {url}")
        for column in ("check", "operation", "result", "detail"):
            table.add_column(column, overflow="fold")
        style = {PASS: "green", FAIL: "bold red"}
        for c in report.checks:
            table.add_row(c.name, c.operation, f"[{style.get(c.result, 'yellow')}]{c.result}[/]", c.detail)
        Console().print(table)
        err.print(f"{report.count(PASS)} passed, {report.count(FAIL)} failed, {report.count('skip')} skipped")
    if not report.passed:
        raise typer.Exit(1)


def register(gateway_app: typer.Typer, bench_app: typer.Typer) -> None:
    add_commands(gateway_app, {"serve": gateway_serve, "new-key": gateway_new_key, "nginx": gateway_nginx,
                               "protocol": gateway_protocol, "conformance": gateway_conformance})
    add_commands(bench_app, {"gateway": bench_gateway_cmd})


__all__ = ["register"]
