"""MQTT: the topic layout, one reconnecting connection helper, and `MqttTransport`, the
`Transport` that reaches a gateway through a broker (the task-graph messages are in taskgraph.py).

Topics (PREFIX is `tandem`; a device's username on a secured broker is its id, and an ACL lets
it touch only its own subtree, see `broker.device_acl`):

    PREFIX/devices/ID/caps        retained  DeviceCapabilities (models, memory, tokens/s, power)
    PREFIX/devices/ID/presence    retained  Presence; the device's last will sets it offline
    PREFIX/devices/ID/heartbeat             Heartbeat, every few seconds
    PREFIX/devices/ID/tasks       QoS 1     TaskAssignment, coordinator -> device
    PREFIX/devices/ID/results     QoS 1     TaskResult, device -> coordinator
    PREFIX/devices/ID/responses   QoS 1     gateway replies to this device's requests
    PREFIX/gateway/NAME/request   QoS 1     requests to the gateway bridge NAME

Request/response to the gateway is MQTT 5's: the request carries a Response Topic and
Correlation Data property, the bridge publishes its reply (or, for `generate`, each chunk) to that
topic with the same correlation data. On an MQTT 3.1.1 broker (amqtt), which has no properties,
both ride in an `RpcEnvelope` around the message instead. Either way the payloads are the pydantic
messages of `messages.py` as JSON, so sizes and validation match the HTTP transport.

aiomqtt is imported when a connection is opened, so the messages here can be used without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .broker import BrokerURL
from .errors import TransportError, from_reply, gateway_error
from .messages import PROTOCOL_VERSION, ErrorReply, GenerateChunk, GenerateRequest
from .operations import operation_for
from .transport import Transport

if TYPE_CHECKING:
    import aiomqtt

log = logging.getLogger(__name__)

PREFIX = "tandem"
DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_device_id(device_id: str) -> str:
    """Ids become topic levels and broker usernames: no '/', '+', '#' or spaces."""
    if not DEVICE_ID.match(device_id):
        raise ValueError(f"device id '{device_id}' must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return device_id


class Topics:
    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.prefix}/devices/{device_id}/{leaf}"

    def caps(self, device_id: str) -> str:
        return self.device(device_id, "caps")

    def presence(self, device_id: str) -> str:
        return self.device(device_id, "presence")

    def heartbeat(self, device_id: str) -> str:
        return self.device(device_id, "heartbeat")

    def tasks(self, device_id: str) -> str:
        return self.device(device_id, "tasks")

    def results(self, device_id: str) -> str:
        return self.device(device_id, "results")

    def responses(self, device_id: str) -> str:
        return self.device(device_id, "responses")

    def client_responses(self, client_id: str) -> str:
        return f"{self.prefix}/clients/{client_id}/responses"

    def gateway_request(self, name: str) -> str:
        return f"{self.prefix}/gateway/{name}/request"

    def parse_device(self, topic: str) -> tuple[str, str] | None:
        """`PREFIX/devices/ID/LEAF` -> (ID, LEAF)."""
        parts = topic.split("/")
        if len(parts) == 4 and parts[0] == self.prefix and parts[1] == "devices":
            return parts[2], parts[3]
        return None


# ---------------------------------------------------------------------------------------------
# request/response to the gateway


class RpcEnvelope(BaseModel):
    """MQTT 3.1.1 has no Response Topic / Correlation Data properties: carry them around the body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = PROTOCOL_VERSION
    type: Literal["rpc"] = "rpc"
    response_topic: str | None = None
    correlation: str
    body: str


def decode_rpc(message: aiomqtt.Message) -> tuple[str | None, bytes | None, bytes]:
    """(response topic, correlation data, body) of a request or reply, MQTT 5 or enveloped."""
    props = message.properties
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    if correlation is not None:
        return getattr(props, "ResponseTopic", None), bytes(correlation), bytes(message.payload)
    payload = bytes(message.payload)
    if payload.startswith(b'{"version":') and b'"type":"rpc"' in payload[:40]:
        env = RpcEnvelope.model_validate_json(payload)
        return env.response_topic, bytes.fromhex(env.correlation), env.body.encode()
    return None, None, payload


def encode_rpc(protocol: str, body: bytes, correlation: bytes, response_topic: str | None = None) -> tuple[bytes, Any]:
    """The payload and MQTT 5 properties (None under 3.1.1) for a request or a reply."""
    if protocol == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        if response_topic is not None:
            props.ResponseTopic = response_topic
        return body, props
    env = RpcEnvelope(response_topic=response_topic, correlation=correlation.hex(), body=body.decode())
    return env.model_dump_json().encode(), None


# ---------------------------------------------------------------------------------------------
# connections

_PROTOCOL_SEEN: dict[tuple[str, int], str] = {}


async def open_client(
    broker: str | BrokerURL,
    *,
    identifier: str | None = None,
    will: aiomqtt.Will | None = None,
    persistent: bool = False,
    keepalive: int = 10,
    timeout_s: float = 10.0,
    session_expiry_s: int = 3600,
) -> tuple[aiomqtt.Client, str]:
    """A connected aiomqtt client and the protocol it speaks ("5" or "3.1.1").

    `persistent` keeps the session on the broker (subscriptions and queued QoS 1 messages) while
    the client is away, across a broker restart when the broker persists: clean session off
    (3.1.1) or clean start off with a session expiry (5). It needs a fixed `identifier`.
    Leave the client with `await close_client(client)`.
    """
    try:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TransportError("MQTT needs aiomqtt: pip install 'tandem[mqtt]'") from exc

    url = BrokerURL.parse(broker)
    if persistent and identifier is None:
        raise ValueError("a persistent MQTT session needs a fixed client identifier")
    order = [url.protocol] if url.protocol != "auto" else [_PROTOCOL_SEEN.get((url.host, url.port), "5"), "3.1.1"]
    last: Exception | None = None
    for protocol in dict.fromkeys(order):
        if protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s if persistent else 0
            kwargs: dict[str, Any] = {
                "protocol": aiomqtt.ProtocolVersion.V5, "clean_start": not persistent, "properties": props,
            }
        else:
            kwargs = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": not persistent}
        client = aiomqtt.Client(
            url.host, url.port, username=url.username, password=url.password, identifier=identifier,
            will=will, keepalive=keepalive, timeout=timeout_s,
            # small request/reply packets: Nagle plus delayed ACKs would add ~40 ms to each hop
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)], **kwargs,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            _release_socket(client)
            last = exc
            if protocol == "5" and "protocol version" in str(exc).lower():
                continue  # an MQTT 3.1.1 broker: offer 3.1.1
            break
        _PROTOCOL_SEEN[(url.host, url.port)] = protocol
        return client, protocol
    raise TransportError(f"cannot connect to the MQTT broker at {url.redacted()}: {last}") from last


def _release_socket(client: aiomqtt.Client) -> None:
    """Close the paho socket under an aiomqtt client. aiomqtt leaves it open after a refused
    connection or a broken one; paho's own close also unhooks it from the event loop."""
    with contextlib.suppress(Exception):
        client._client._sock_close()


async def close_client(client: aiomqtt.Client) -> None:
    """Disconnect, whatever state the connection is in."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.__aexit__(None, None, None), 3.0)
    _release_socket(client)


async def reconnecting(
    broker: str | BrokerURL,
    session: Callable[[aiomqtt.Client, str], Awaitable[None]],
    *,
    name: str,
    reconnect_s: float = 0.5,
    **connect: Any,
) -> None:
    """Connect (`open_client(broker, **connect)`), run `session(client, protocol)` until the
    connection breaks, wait `reconnect_s`, and do it again, until cancelled. A broker that is down
    or goes away is logged (as `name`) and retried; the client is closed however the session ends.
    With `persistent=True` the broker keeps subscriptions and queued QoS 1 messages meanwhile."""
    while True:
        try:
            client, protocol = await open_client(broker, **connect)
        except TransportError as exc:
            log.warning("%s: %s; retrying", name, exc)
            await asyncio.sleep(reconnect_s)
            continue
        try:
            await session(client, protocol)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker went away
            log.warning("%s lost the broker (%s); reconnecting", name, exc)
        finally:
            await close_client(client)
        await asyncio.sleep(reconnect_s)


# ---------------------------------------------------------------------------------------------
# the transport


class MqttTransport(Transport):
    """The `Transport` interface over a broker, for a device that can reach the broker but not
    the gateway (behind NAT, say). Pair it with `remote_gateway.mqtt_bridge.MqttBridge`.

        transport = MqttTransport("mqtt://127.0.0.1:1883", gateway="default")
        async with Client(drafter="smollm2-135m", gateway=transport) as client: ...

    `device_id` makes replies arrive on that device's own `responses` topic (what a per-device
    ACL allows); otherwise a topic under `PREFIX/clients/` is used.
    """

    def __init__(
        self,
        broker: str | BrokerURL,
        *,
        gateway: str = "default",
        device_id: str | None = None,
        timeout_s: float = 60.0,
        prefix: str = PREFIX,
    ) -> None:
        super().__init__()
        self.broker = BrokerURL.parse(broker)
        self.gateway = gateway
        self.timeout_s = timeout_s
        self.topics = Topics(prefix)
        # unique per transport: a second connection under one client id would push the first off
        self._client_id = f"tandem-rpc-{device_id + '-' if device_id else ''}{uuid.uuid4().hex[:8]}"
        self.response_topic = (
            self.topics.responses(check_device_id(device_id)) if device_id else self.topics.client_responses(self._client_id)
        )
        self._client: aiomqtt.Client | None = None
        self.protocol: str | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[bytes, asyncio.Queue] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def _connection(self) -> aiomqtt.Client:
        if self._closed:
            raise TransportError("transport is closed")
        async with self._lock:
            if self._client is None:
                client, self.protocol = await open_client(self.broker, identifier=self._client_id, timeout_s=self.timeout_s)
                try:
                    await client.subscribe(self.response_topic, qos=1)
                except Exception as exc:
                    await close_client(client)
                    raise TransportError(f"cannot subscribe to {self.response_topic}: {exc}") from exc
                self._client = client
                self._reader = asyncio.create_task(self._read(client), name="tandem-mqtt-rpc-reader")
            return self._client

    async def _read(self, client: aiomqtt.Client) -> None:
        error: Exception | None = None
        try:
            async for message in client.messages:
                try:
                    _, correlation, body = decode_rpc(message)
                except (ValidationError, ValueError):
                    log.warning("dropped a malformed reply on %s", message.topic)
                    continue
                queue = self._pending.get(correlation) if correlation is not None else None
                if queue is not None:
                    self.bytes_down += len(message.payload)
                    queue.put_nowait(body)
        except Exception as exc:  # the connection broke: fail what waits, reconnect on next use
            error = exc
        finally:
            if self._client is client:
                self._client = None
            lost = TransportError(f"lost the MQTT broker at {self.broker.redacted()}: {error}")
            for queue in self._pending.values():
                queue.put_nowait(lost)

    async def _send(self, msg: BaseModel) -> tuple[bytes, asyncio.Queue]:
        client = await self._connection()
        correlation = uuid.uuid4().bytes
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[correlation] = queue
        body = msg.model_dump_json().encode()
        payload, props = encode_rpc(self.protocol or "3.1.1", body, correlation, self.response_topic)
        try:
            await client.publish(self.topics.gateway_request(self.gateway), payload, qos=1, properties=props)
        except Exception as exc:
            self._pending.pop(correlation, None)
            raise TransportError(f"cannot publish to the MQTT broker at {self.broker.redacted()}: {exc}") from exc
        self.bytes_up += len(payload)
        self.round_trips += 1
        return correlation, queue

    async def _next(self, queue: asyncio.Queue, what: str) -> bytes:
        try:
            item = await asyncio.wait_for(queue.get(), self.timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(
                f"gateway '{self.gateway}' did not answer {what} over MQTT within {self.timeout_s:g} s "
                "(is its bridge running?)"
            ) from None
        if isinstance(item, Exception):
            raise item
        return item

    @staticmethod
    def _parse(body: bytes, reply_type: type[BaseModel]) -> Any:
        if body.startswith(b'{"version":') and b'"type":"error"' in body[:40]:
            raise from_reply(ErrorReply.model_validate_json(body))
        try:
            return reply_type.model_validate_json(body)
        except ValidationError:
            try:
                raise from_reply(ErrorReply.model_validate_json(body)) from None
            except ValidationError as exc:
                raise gateway_error("internal", f"malformed reply from the gateway: {body[:200]!r}") from exc

    async def request(self, msg: BaseModel) -> Any:
        correlation, queue = await self._send(msg)
        try:
            return self._parse(await self._next(queue, type(msg).__name__), operation_for(msg).reply)
        finally:
            self._pending.pop(correlation, None)

    async def stream(self, msg: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        correlation, queue = await self._send(msg)
        try:
            while True:
                chunk = self._parse(await self._next(queue, "a generate chunk"), GenerateChunk)
                yield chunk
                if chunk.finished:
                    return
        finally:
            self._pending.pop(correlation, None)

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if client is not None:
            await close_client(client)


__all__ = [
    "PREFIX",
    "MqttTransport",
    "RpcEnvelope",
    "Topics",
    "reconnecting",
    "check_device_id",
    "close_client",
    "decode_rpc",
    "encode_rpc",
    "open_client",
]
