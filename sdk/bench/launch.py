"""Start a gateway on loopback, for the demo, the benchmarks and the tests.

    with GatewayProcess("gemma3-270m") as gw:       # its own process: `tandem gateway serve`
        client = Client(gateway=gw.url)
    with serving(create_app(gateway)) as url:        # uvicorn in a thread of this process
        ...
    with serve_gateway("gemma3-270m") as url:         # the same, for a model name (or a LoadedModel)
        ...
    with NginxProcess({"ra": url_a, "rb": url_b}) as lb:  # nginx in front of replicas
        client = Client(gateway=lb.url)

Each takes a free 127.0.0.1 port; entering waits until the server answers (a model load takes
tens of seconds), leaving stops it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ...protocols.broker import free_port


def stop_process(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Ask a child process to stop with `sig`; kill it if it has not within `grace_s`."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


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
        stop_process(self.proc, signal.SIGINT, 15)

    def __enter__(self) -> "GatewayProcess":
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def nginx_binary() -> str:
    """The nginx executable: on PATH, or in the sbin folders a non-root PATH often lacks (where
    Debian's package puts it). FileNotFoundError if it is not installed."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("nginx", path=search)
    if found is None:
        raise FileNotFoundError("nginx is not installed (Debian/Ubuntu: apt-get install nginx)")
    return found


class NginxProcess:
    """A private nginx in front of gateway `replicas` (id -> base URL) on `host:port` (a free
    loopback port by default), configured by `remote_gateway.replicas.nginx_config` (extra
    keyword arguments go to it). Everything it writes stays in a folder of its own: the config,
    the pid file, the temporary files, the error log (`log`, or this process's stderr when
    `quiet` is off). Entering waits until the port accepts connections; leaving stops it
    (SIGTERM: nginx's fast shutdown, then SIGKILL) and removes the folder.

    Started as root, nginx runs its workers as `nobody`; the folder is made readable to them, and
    nginx gives them the temporary folders it creates in it."""

    def __init__(self, replicas: dict[str, str], port: int | None = None, *, host: str = "127.0.0.1",
                 quiet: bool = True, ready_timeout_s: float = 10.0, **config_options: Any) -> None:
        self.replicas, self.host, self.quiet = dict(replicas), host, quiet
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self.config_options = {"worker_processes": 1, **config_options}
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> str:
        """What nginx wrote to its error log so far (empty when it goes to stderr)."""
        path = self.dir / "error.log" if self.dir else None
        return path.read_text(errors="replace") if path and path.is_file() else ""

    def start(self) -> "NginxProcess":
        from ...remote_gateway.replicas import nginx_config

        binary = nginx_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-nginx-"))
        self.dir.chmod(0o755)
        conf = self.dir / "nginx.conf"
        conf.write_text(nginx_config(self.replicas, f"{self.host}:{self.port}", temp_dir=str(self.dir),
                                     **self.config_options), encoding="utf-8")
        cmd = [binary, "-p", str(self.dir), "-c", str(conf), "-g", f"daemon off; pid {self.dir}/nginx.pid; error_log stderr;"]
        log = open(self.dir / "error.log", "wb") if self.quiet else None
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            if log is not None:
                log.close()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = self.log.strip()
                self.stop()
                raise RuntimeError(f"nginx exited with code {self.proc.returncode} before it was ready: {said}")
            try:
                socket.create_connection((self.host.strip("[]"), self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not accept connections on {self.url} within {self.ready_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, signal.SIGTERM, 5)  # nginx: fast shutdown (what its own Ctrl-C does)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "NginxProcess":
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def serving(app, lifespan: str = "off"):
    """A uvicorn server for `app` on a free loopback port, in a thread; yields its URL. A gateway
    app (`create_app`) is served with its edge limits, as `tandem gateway serve` serves it."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    options = {"log_level": "error", "lifespan": lifespan, "access_log": False}
    edge = getattr(getattr(app, "state", None), "edge", None)
    if edge is not None:
        from ...remote_gateway.edge import uvicorn_config

        config = uvicorn_config(app, edge, **options)
    else:
        config = uvicorn.Config(app, **options)
    server = uvicorn.Server(config)
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


__all__ = ["GatewayProcess", "NginxProcess", "free_port", "nginx_binary", "serving", "serve_gateway"]
