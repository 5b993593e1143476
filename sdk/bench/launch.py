"""Start a gateway on loopback, for the demo, the benchmarks and the tests.

    with GatewayProcess("gemma3-270m") as gw:       # its own process: `tandem gateway serve`
        client = Client(gateway=gw.url)
    with serving(create_app(gateway)) as url:        # uvicorn in a thread of this process
        ...
    with serve_gateway("gemma3-270m") as url:         # the same, for a model name (or a LoadedModel)
        ...

Both take a free 127.0.0.1 port; entering waits until the server answers (a model load takes
tens of seconds), leaving stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ...protocols.broker import free_port


class GatewayProcess:
    """`cores`: the CPU cores the process may run on (sched_setaffinity), with as many compute
    threads (torch, llama.cpp); None leaves both to the machine."""

    def __init__(self, model: str | None = None, *, config: str | Path | None = None, port: int | None = None,
                 quiet: bool = False, ready_timeout_s: float = 600.0, env: dict | None = None,
                 cores: set[int] | None = None) -> None:
        self.model, self.config, self.quiet = model, config, quiet
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.cores = cores
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "GatewayProcess":
        cmd = [sys.executable, "-m", "tandem.sdk.cli", "gateway", "serve", "--port", str(self.port), "--host", "127.0.0.1"]
        if self.model:
            cmd += ["--model", self.model]
        if self.config:
            cmd += ["--config", str(self.config)]
        if self.cores:
            cmd += ["--threads", str(len(self.cores))]
        out = subprocess.DEVNULL if self.quiet else None
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        cores = self.cores
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {self.proc.returncode} before it was ready")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the gateway did not answer within {self.ready_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> "GatewayProcess":
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def serving(app, lifespan: str = "off"):
    """A uvicorn server for `app` on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan=lifespan, access_log=False))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def serve_gateway(model: Any, **gateway_options: Any) -> Iterator[str]:
    """A gateway for `model` (a name or a LoadedModel) served over HTTP by uvicorn in a thread of
    this process, on a free loopback port; yields its URL and closes the gateway afterwards."""
    from ...remote_gateway.app import create_app
    from ...remote_gateway.service import Gateway

    gateway = Gateway(model, **gateway_options)
    try:
        with serving(create_app(gateway)) as url:
            yield url
    finally:
        gateway.close()


__all__ = ["GatewayProcess", "free_port", "serving", "serve_gateway"]
