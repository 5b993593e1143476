"""`tandem playground`: the hybrid loop live in a browser, on 127.0.0.1.

    browser -> playground (a Client) -> link simulator -> gateway (in this process, or at --gateway URL)

With `--gateway inproc` the gateway for `--target` is served by uvicorn in a thread of this
process on a loopback port, so the simulated link can sit between it and the client, as it
does in front of a remote http:// gateway.
"""

from __future__ import annotations

import socket
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer

from ...protocols.errors import TandemError
from ..client import DEFAULT_DRAFTER, DEFAULT_TARGET
from .common import err, fail


def playground_cmd(
    gateway: str = typer.Option("inproc", help="'inproc' (a gateway for --target in this process, on loopback) or a gateway's URL."),
    drafter: str = typer.Option(DEFAULT_DRAFTER, help="Device model: a registered name, a path, NAME:int8, NAME@BACKEND."),
    target: Optional[str] = typer.Option(None, help=f"The gateway's model (inproc: default {DEFAULT_TARGET}; a URL: the model to ask it for)."),
    policy: Optional[Path] = typer.Option(None, help="A routing policy (YAML) for mode auto; the page can name another."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port on 127.0.0.1 (0: any free one)."),
    rtt_ms: float = typer.Option(0.0, min=0.0, help="Round-trip time the simulated link adds at the start."),
) -> None:
    """Serve the playground: type a prompt, watch each token coloured by who produced it, the
    verify rounds, the draft length and acceptance, auto's decision, and cut the link to watch
    the device carry on alone and rejoin."""
    import uvicorn

    from ..bench.launch import serve_gateway
    from ..bench.linksim import LinkProxy
    from ..client import Client
    from ..playground import Playground, create_app

    if policy is not None:
        from ...routing.policy_files import load_policy

        try:
            load_policy(policy)
        except (TandemError, ValueError, FileNotFoundError) as exc:
            fail(f"policy {policy}: {exc}", code=2)
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another with --port", code=2)

    with ExitStack() as stack:
        try:
            if gateway == "inproc":
                name = target or DEFAULT_TARGET
                err.print(f"loading the gateway's model ({name}) ...")
                url = stack.enter_context(serve_gateway(name))
                label, ask_for = f"in-process gateway ({url})", None
            elif gateway.startswith(("http://", "https://")):
                url, label, ask_for = gateway, gateway, target
            else:
                fail(f"--gateway must be 'inproc' or an http(s):// URL, not '{gateway}'", code=2)
            try:
                link = stack.enter_context(LinkProxy.in_front_of(url, delay_ms=rtt_ms / 2))
            except ValueError as exc:
                link = None
                err.print(f"[yellow]note:[/] {exc}; the page's link controls are off")
            client = Client(drafter=drafter, target=ask_for, gateway=link.url if link else url, policy=policy,
                            timeout_s=30.0, retries=1, probe_timeout_s=1.0)
            err.print(f"loading the device model ({client.drafter_name}) ...")
            client.drafter  # noqa: B018 - load it now, not on the first click
        except TandemError as exc:
            fail(str(exc))
        playground = Playground(client, link, gateway=label, target=target if gateway != "inproc" else name, policy=policy)
        server = uvicorn.Server(uvicorn.Config(create_app(playground), log_level="warning"))
        print(f"playground: http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        err.print("Ctrl+C stops it.")
        server.run(sockets=[sock])
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("playground")(playground_cmd)


__all__ = ["register"]
