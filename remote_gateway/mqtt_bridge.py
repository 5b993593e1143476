"""The gateway's MQTT side: a bridge that takes requests from a broker and calls the `Gateway` core.

Devices that cannot reach the gateway's HTTP port (behind NAT, on a site network) publish to
`PREFIX/gateway/NAME/request`; the bridge answers on the request's Response Topic with its
Correlation Data (MQTT 5), or inside an `RpcEnvelope` on MQTT 3.1.1. `generate` answers with one
message per chunk, the last one `finished`.

QoS 1 delivers at least once, so a request can arrive twice: the bridge remembers the replies
to the last few thousand correlation ids and sends a stored reply again instead of running the
request twice (verify is idempotent in the core too; open and close would not be).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from cachetools import LRUCache
from pydantic import ValidationError

from ..protocols.broker import BrokerURL
from ..protocols.errors import GatewayError, TransportError, gateway_error
from ..protocols.mqtt import PREFIX, Topics, decode_rpc, encode_rpc, reconnecting
from ..protocols.operations import REQUEST_ADAPTER, dispatch, operation_for

if TYPE_CHECKING:
    import aiomqtt

    from .service import Gateway

log = logging.getLogger(__name__)

_REPLAY_MEMORY = 4096


class MqttBridge:
    """Serve `gateway` to the broker until stopped; reconnects when the broker goes away.

        async with MqttBridge(gateway, "mqtt://127.0.0.1:1883", name="default"):
            ...   # devices use MqttTransport(url, gateway="default")
    """

    def __init__(
        self,
        gateway: Gateway,
        broker: str | BrokerURL,
        *,
        name: str = "default",
        prefix: str = PREFIX,
        reconnect_s: float = 0.5,
    ) -> None:
        self.gateway = gateway
        self.broker = BrokerURL.parse(broker)
        self.name = name
        self.topics = Topics(prefix)
        self.reconnect_s = reconnect_s
        self.protocol: str | None = None
        self.stats = {"requests": 0, "replays": 0, "errors": 0}
        self._replies: LRUCache[bytes, list[bytes] | None] = LRUCache(_REPLAY_MEMORY)
        self._runner: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._handlers: set[asyncio.Task] = set()

    async def start(self, timeout_s: float = 10.0) -> MqttBridge:
        self._runner = asyncio.create_task(self.run(), name=f"tandem-mqtt-bridge-{self.name}")
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._runner}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if self._runner in done:
                self._runner.result()  # raises what stopped it
            await self.stop()
            raise TransportError(f"the gateway bridge could not subscribe at {self.broker.redacted()} in {timeout_s} s")
        return self

    async def stop(self) -> None:
        for task in [self._runner, *self._handlers]:
            if task is not None:
                task.cancel()
        for task in [self._runner, *self._handlers]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._runner = None

    async def __aenter__(self) -> MqttBridge:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def run(self) -> None:
        """Connect, subscribe, serve; on a lost broker wait and do it again (persistent session,
        so requests published while the bridge was away are delivered when it is back)."""
        topic = self.topics.gateway_request(self.name)

        async def session(client: aiomqtt.Client, protocol: str) -> None:
            self.protocol = protocol
            await client.subscribe(topic, qos=1)
            self._ready.set()
            async for message in client.messages:
                task = asyncio.create_task(self._handle(client, message))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)

        await reconnecting(
            self.broker, session, name=f"gateway bridge {self.name}", reconnect_s=self.reconnect_s,
            identifier=f"tandem-gateway-{self.name}", persistent=True,
        )

    async def _reply(self, client: aiomqtt.Client, topic: str, correlation: bytes, bodies: list[bytes]) -> None:
        for body in bodies:
            payload, props = encode_rpc(self.protocol or "3.1.1", body, correlation)
            await client.publish(topic, payload, qos=1, properties=props)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        try:
            response_topic, correlation, body = decode_rpc(message)
        except (ValidationError, ValueError):
            log.warning("gateway bridge: dropped a malformed request envelope")
            return
        if response_topic is None or correlation is None:
            log.warning("gateway bridge: dropped a request with no response topic or correlation data")
            return
        if correlation in self._replies:
            stored = self._replies[correlation]
            if stored is not None:  # done before: send the same reply again
                self.stats["replays"] += 1
                await self._reply(client, response_topic, correlation, stored)
            return  # still running: its reply is on the way
        self._replies[correlation] = None
        self.stats["requests"] += 1
        sent: list[bytes] = []
        try:
            try:
                request = REQUEST_ADAPTER.validate_json(body)
            except ValidationError as exc:
                raise gateway_error("bad_request", str(exc)) from exc
            if operation_for(request).streaming:
                async for chunk in await dispatch(self.gateway, request):
                    data = chunk.model_dump_json().encode()
                    sent.append(data)
                    await self._reply(client, response_topic, correlation, [data])
                self._replies[correlation] = sent
                return
            data = (await dispatch(self.gateway, request)).model_dump_json().encode()
        except GatewayError as exc:
            self.stats["errors"] += 1
            data = exc.to_reply().model_dump_json().encode()
        except Exception as exc:  # a bug, not the caller's fault: say so instead of going silent
            log.exception("gateway bridge: request failed")
            self.stats["errors"] += 1
            data = gateway_error("internal", f"{type(exc).__name__}: {exc}").to_reply().model_dump_json().encode()
        self._replies[correlation] = sent + [data]
        with contextlib.suppress(Exception):
            await self._reply(client, response_topic, correlation, [data])


__all__ = ["MqttBridge"]
