"""MQTT brokers for the task graph and the MQTT transport, and the URLs that name them.

    EmbeddedBroker   amqtt in this process (the default): no install, MQTT 3.1.1, anonymous,
                     on a free 127.0.0.1 port. For tests, samples and one-machine runs.
    Mosquitto        the Debian `mosquitto` binary as a child process with a generated config:
                     MQTT 5, username/password, per-device topic ACLs, persistent sessions that
                     survive a restart. What a deployment runs (under its own init system).

A broker URL is `mqtt://[user:password@]host[:port][?protocol=5|3.1.1]`; without `protocol` the
client offers MQTT 5 and falls back to 3.1.1 when the broker refuses it (amqtt speaks 3.1.1 only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .errors import TransportError

Protocol = Literal["auto", "5", "3.1.1"]
DEFAULT_PORT = 1883


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class BrokerURL:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    protocol: Protocol = "auto"

    @classmethod
    def parse(cls, url: str | BrokerURL) -> BrokerURL:
        if isinstance(url, BrokerURL):
            return url
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp"):
            raise ValueError(f"broker URL must start with mqtt:// (got '{url}')")
        if not parts.hostname:
            raise ValueError(f"broker URL names no host: '{url}'")
        protocol = parse_qs(parts.query).get("protocol", ["auto"])[0]
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"broker URL protocol must be 5 or 3.1.1, not '{protocol}'")
        return cls(
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            protocol=protocol,  # type: ignore[arg-type]
        )

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        return replace(self, username=username, password=password)

    def __str__(self) -> str:
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        query = "" if self.protocol == "auto" else f"?protocol={self.protocol}"
        return f"mqtt://{auth}{self.host}:{self.port}{query}"

    def redacted(self) -> str:
        """For logs: the URL without its password."""
        if self.password is None:
            return str(self)
        return str(replace(self, password=None)).replace("@", ":***@", 1)


class EmbeddedBroker:
    """amqtt running in the current event loop, anonymous, on 127.0.0.1 and a free port.

        async with EmbeddedBroker() as broker:
            ... connect to broker.url ...
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker = None

    @property
    def url(self) -> str:
        return str(BrokerURL(self.host, self.port, protocol="3.1.1"))

    async def start(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise TransportError("the embedded broker needs amqtt: pip install 'tandem[mqtt]'") from exc
        # amqtt logs every refused MQTT 5 probe and client drop at ERROR; they are expected here
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        # amqtt's shutdown leaves some client connections open (a session taken over by a
        # reconnecting client, one dropped mid-handshake): keep their writers to close them
        served = broker.stream_connected

        async def stream_connected(reader, writer, listener_name):
            self._writers.add(writer)
            try:
                await served(reader, writer, listener_name=listener_name)
            finally:
                self._writers.discard(writer)
                if not writer.is_closing():  # amqtt returns from some error paths with it open
                    writer.close()

        broker.stream_connected = stream_connected  # type: ignore[method-assign]
        self._writers: set = set()
        await broker.start()
        self._broker = broker
        return self

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            try:
                await asyncio.wait_for(broker.shutdown(), 10.0)
            except asyncio.TimeoutError:
                logging.getLogger(__name__).warning("the embedded broker took over 10 s to shut down; closing its connections")
            writers, self._writers = list(self._writers), set()
            for writer in writers:
                writer.close()
            for writer in writers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def device_acl(admins: tuple[str, ...] = ("coordinator",), gateways: tuple[str, ...] = ("gateway",), prefix: str = "tandem") -> str:
    """A mosquitto ACL file: each device (its username is its id) reads and writes only its own
    subtree `PREFIX/devices/ID/#` and may send requests to gateways; a gateway answers into any
    device's `responses` topic; admins (the coordinator) see all of PREFIX."""
    lines = ["# generated by tandem: per-device topic ACLs", ""]
    for user in admins:
        lines += [f"user {user}", f"topic readwrite {prefix}/#", ""]
    for user in gateways:
        lines += [
            f"user {user}",
            f"topic read {prefix}/gateway/+/request",
            f"topic write {prefix}/devices/+/responses",
            f"topic write {prefix}/clients/+/responses",
            "",
        ]
    lines += [
        "# every authenticated client: its own subtree, and the gateways' request topics",
        f"pattern readwrite {prefix}/devices/%u/#",
        f"pattern write {prefix}/gateway/+/request",
        "",
    ]
    return "\n".join(lines)


class Mosquitto:
    """A mosquitto child process on 127.0.0.1 with a generated config, for tests and one-machine
    setups. With `users` it refuses anonymous clients and applies `acl` (see `device_acl`);
    persistence keeps sessions, subscriptions and queued QoS 1 messages across `restart()`.

        with Mosquitto(tmp_dir, users={"coordinator": "pw", "dev-a": "pw"}, acl=device_acl()) as m:
            m.url("dev-a", "pw")
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        port: int | None = None,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = True,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or shutil.which("mosquitto") or "mosquitto"
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.users = dict(users or {})
        self.acl = acl
        self.persistence = persistence
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"

    def url(self, username: str | None = None, password: str | None = None) -> str:
        if username is not None and password is None:
            password = self.users.get(username)
        return str(BrokerURL("127.0.0.1", self.port, username, password, protocol="5"))

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = [
            f"listener {self.port} 127.0.0.1",
            "set_tcp_nodelay true",
            "user root" if os.geteuid() == 0 else "",  # keep the files of this directory readable
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
        ]
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            # mosquitto_passwd -U hashes a plain `user:password` file in place
            subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True)
            passwd.chmod(0o600)
            conf += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            conf += ["allow_anonymous true"]
        if self.acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text(self.acl)
            acl_path.chmod(0o600)
            conf += [f"acl_file {acl_path}"]
        self.config_path.write_text("\n".join(c for c in conf if c) + "\n")

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        if self.proc is not None:
            return self
        if not self.config_path.exists():
            self._write_config()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise TransportError(f"mosquitto exited at start: {err.strip()} (log: {self.log_path})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TransportError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["DEFAULT_PORT", "BrokerURL", "EmbeddedBroker", "Mosquitto", "device_acl", "free_port"]
