"""The address of an MQTT broker: `mqtt://[user:password@]host[:port][?protocol=5|3.1.1]`.

Without `protocol` a client offers MQTT 5 and falls back to 3.1.1 when the broker refuses it
(amqtt speaks 3.1.1 only). The brokers themselves (amqtt in-process, mosquitto) are started by
`tandem.sdk.taskgraph.broker`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

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


__all__ = ["BrokerURL", "free_port", "DEFAULT_PORT"]
