"""A loopback TCP proxy that behaves like a bad network link.

    client ──> 127.0.0.1:proxy ──(delay, jitter, bandwidth, loss, outages)──> 127.0.0.1:target

Tests and benchmarks put it between the SDK and a gateway; the machine's own network settings are
never touched. Bytes are forwarded in order in each direction:

- delay: every chunk is delivered `delay_ms` (one way, so RTT = 2 x delay) after it arrived,
  plus up to `jitter_ms` of uniform jitter, never overtaking the chunk before it;
- bandwidth: a chunk of n bytes occupies the link for n / bandwidth seconds;
- loss: TCP hides packet loss as stalls and resets; each chunk is, with probability `loss`,
  followed by a reset of its connection (both sides see the connection drop);
- outages: `outage(seconds)` (or a scripted list of (start_s, duration_s)) refuses new
  connections and resets open ones until it ends.

`LinkProxy` runs on its own event loop in a background thread, so synchronous tests and the
async SDK can both use it:

    with LinkProxy(target_port=8000, delay_ms=25) as link:   # 50 ms RTT
        client = Client(gateway=link.url)

    with LinkProxy.in_front_of("http://10.0.0.5:8000/tandem") as link:   # link.url keeps the path
        ...
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_CHUNK = 64 * 1024


@dataclass
class LinkStats:
    connections: int = 0
    refused: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class LinkConfig:
    delay_ms: float = 0.0  # one way
    jitter_ms: float = 0.0
    loss: float = 0.0  # probability that a chunk is followed by a connection reset
    bandwidth_bps: float | None = None  # bits per second, each direction; None = unlimited
    outages: list[tuple[float, float]] = field(default_factory=list)  # (start_s, duration_s) after start
    seed: int | None = None


class LinkProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", config: LinkConfig | None = None, **kwargs) -> None:
        self.target = (target_host, target_port)
        self.config = config or LinkConfig(**kwargs)
        self.stats = LinkStats()
        self._rng = random.Random(self.config.seed)
        self._down_until = 0.0
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self.port = 0
        self.path = ""  # appended to `url` (a gateway served under a path prefix)

    @classmethod
    def in_front_of(cls, url: str, config: LinkConfig | None = None, **kwargs) -> "LinkProxy":
        """A proxy (not started yet) to the HTTP server at `url`; its `url` has the same path.
        Plain TCP is forwarded, so an https:// server cannot sit behind it (its certificate
        names the server, not 127.0.0.1)."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the link simulator sits in front of an http:// server, not '{url}'")
        proxy = cls(parts.port or 80, parts.hostname, config, **kwargs)
        proxy.path = parts.path.rstrip("/")
        return proxy

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> "LinkProxy":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name="linksim", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("link proxy did not start")
        return self

    def _run(self, sock: socket.socket) -> None:
        self._loop = asyncio.new_event_loop()
        self._t0 = time.monotonic()

        async def main():
            self._stopping = asyncio.Event()
            self._server = await asyncio.start_server(self._handle, sock=sock)
            self._ready.set()
            await self._stopping.wait()
            self._server.close()
            for w in list(self._conns):
                w.transport.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def stop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> "LinkProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- control -----------------------------------------------------------------------------

    def set(self, **changes) -> None:
        """Change delay/jitter/loss/bandwidth while running (takes effect for the next chunk)."""
        for k, v in changes.items():
            if not hasattr(self.config, k):
                raise AttributeError(f"LinkConfig has no setting '{k}'")
            setattr(self.config, k, v)

    def outage(self, seconds: float) -> None:
        """Drop the link now for `seconds`: open connections are reset, new ones refused."""
        self._down_until = time.monotonic() + seconds
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._reset_all)

    def restore(self) -> None:
        """End an outage now (scripted outage windows still apply)."""
        self._down_until = 0.0

    @property
    def down(self) -> bool:
        """Whether the link is down now (an outage, or a scripted outage window)."""
        return self._is_down()

    def _reset_all(self) -> None:
        for w in list(self._conns):
            self.stats.resets += 1
            w.transport.abort()

    def _is_down(self) -> bool:
        now = time.monotonic()
        if now < self._down_until:
            return True
        since = now - self._t0
        return any(start <= since < start + length for start, length in self.config.outages)

    # -- forwarding --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._is_down():
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        self.stats.connections += 1
        self._conns.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, "bytes_up", writer),
                self._pump(up_reader, writer, "bytes_down", up_writer),
            )
        except asyncio.CancelledError:
            # the proxy is shutting down: the connection just ends (asyncio's stream server
            # would otherwise report the cancelled handler as an error at exit)
            pass
        finally:
            for w in (writer, up_writer):
                self._conns.discard(w)
                if not w.is_closing():
                    w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str, other: asyncio.StreamWriter) -> None:
        """Copy src -> dst, each chunk delivered after the link's delay, in order."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            last = 0.0
            while True:
                item = await queue.get()
                if item is None:
                    break
                due, data = item
                due = max(due, last)
                last = due
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._is_down():
                    break
                dst.write(data)
                await dst.drain()
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                if self.config.loss and self._rng.random() < self.config.loss:
                    self.stats.resets += 1
                    dst.transport.abort()
                    other.transport.abort()
                    break

        deliverer = asyncio.ensure_future(deliver())
        busy_until = 0.0
        try:
            while True:
                data = await src.read(_CHUNK)
                if not data or self._is_down():
                    break
                cfg = self.config
                now = time.monotonic()
                if cfg.bandwidth_bps:
                    busy_until = max(busy_until, now) + len(data) * 8 / cfg.bandwidth_bps
                    now = busy_until
                jitter = self._rng.uniform(0, cfg.jitter_ms) if cfg.jitter_ms else 0.0
                await queue.put((now + (cfg.delay_ms + jitter) / 1000.0, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put(None)
            try:
                await deliverer
            except (ConnectionError, OSError):
                pass
            if not dst.is_closing():
                try:
                    dst.write_eof()
                except (OSError, RuntimeError):
                    pass


__all__ = ["LinkProxy", "LinkConfig", "LinkStats"]
