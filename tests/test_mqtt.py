"""MQTT: the transport and gateway bridge (speculation stays lossless over it), the embedded amqtt
broker, and mosquitto with passwords, per-device ACLs and sessions that survive a restart.
Everything on 127.0.0.1; the mosquitto tests start their own broker and are skipped without it."""

import asyncio
import contextlib
import shutil

import pytest

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.broker import BrokerURL
from tandem.protocols.errors import TransportError, UnknownSessionError
from tandem.protocols.messages import CloseSession, OpenSession, SessionOpened
from tandem.protocols.mqtt import MqttTransport, Topics, close_client, decode_rpc, encode_rpc, open_client
from tandem.remote_gateway.mqtt_bridge import MqttBridge
from tandem.sdk import Client
from tandem.sdk.taskgraph.broker import EmbeddedBroker, Mosquitto, device_acl

from .conftest import run

pytestmark = pytest.mark.timeout(120)
needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")

PROMPTS = ["Hello there", "The quick brown fox"]
USERS = {"coordinator": "c-secret", "gateway": "g-secret", "dev-a": "a-secret", "dev-b": "b-secret"}


@pytest.fixture
def mosquitto(tmp_path):
    with Mosquitto(tmp_path / "mosquitto", users=USERS, acl=device_acl()) as broker:
        yield broker


async def _speculate(transport, drafters=("tiny-llama:int8", "tiny-llama-b")):
    out = {}
    for drafter in drafters:
        async with Client(drafter=drafter, gateway=transport, draft_len=3, progress=False) as client:
            out[drafter] = [await client.generate(p, max_new_tokens=24, chat=False) for p in PROMPTS]
        transport = type(transport)(transport.broker, gateway=transport.gateway, device_id=_device(transport), timeout_s=20)
    await transport.aclose()
    return out


def _device(transport):
    return transport.response_topic.split("/")[2] if "/devices/" in transport.response_topic else None


def _check_lossless(target, results):
    for drafter, records in results.items():
        for prompt, rec in zip(PROMPTS, records):
            reference = list(generate_alone(target, target.tokenizer.prompt_tokens(prompt, chat=False), 24))
            assert rec.tokens == reference, (drafter, prompt)
            assert rec.usage.rounds >= 1


def test_broker_url_round_trip():
    url = BrokerURL.parse("mqtt://dev-a:p%40ss@127.0.0.1:1999?protocol=5")
    assert (url.username, url.password, url.port, url.protocol) == ("dev-a", "p@ss", 1999, "5")
    assert BrokerURL.parse(str(url)) == url
    assert "p%40ss" not in url.redacted() and "***" in url.redacted()
    assert BrokerURL.parse("localhost").port == 1883
    with pytest.raises(ValueError, match="mqtt://"):
        BrokerURL.parse("http://x:1")


def test_speculation_is_lossless_over_the_embedded_broker(tiny_gateway):
    """amqtt speaks MQTT 3.1.1: response topic and correlation ride in an envelope."""

    async def go():
        async with EmbeddedBroker() as broker, MqttBridge(tiny_gateway, broker.url) as bridge:
            transport = MqttTransport(broker.url, timeout_s=20)
            info = await transport.info()
            assert transport.protocol == "3.1.1"
            assert info.model == tiny_gateway.model_name
            async with Client(drafter=None, gateway=MqttTransport(broker.url, timeout_s=20), mode="cloud") as cloud:
                streamed = await cloud.generate(PROMPTS[0], max_new_tokens=12, chat=False)
            results = await _speculate(transport)
            return results, streamed, dict(bridge.stats)

    results, streamed, stats = run(go())
    _check_lossless(tiny_gateway.lm, results)
    lm = tiny_gateway.lm
    assert streamed.tokens == list(generate_alone(lm, lm.tokenizer.prompt_tokens(PROMPTS[0], chat=False), 12))
    assert stats["errors"] == 0 and stats["requests"] > 10


def test_assist_is_served_over_the_broker(tiny_gateway):
    """Every operation of the table reaches the gateway through the bridge, `append` included."""

    async def go():
        async with EmbeddedBroker() as broker, MqttBridge(tiny_gateway, broker.url):
            async with Client(drafter="tiny-llama-b", gateway=MqttTransport(broker.url, timeout_s=20), progress=False) as c:
                return await c.generate(PROMPTS[0], mode="assist", assist_threshold=1.1, max_new_tokens=10, chat=False)

    rec = run(go())
    lm = tiny_gateway.lm
    # a threshold above every score asks the cloud for every token: the target's own output
    assert rec.tokens == list(generate_alone(lm, lm.tokenizer.prompt_tokens(PROMPTS[0], chat=False), 10))
    assert rec.usage.rounds == 10 and rec.usage.fallbacks == 0


def test_gateway_errors_and_silence_map_to_the_error_tree(tiny_gateway):
    async def go():
        async with EmbeddedBroker() as broker:
            silent = MqttTransport(broker.url, gateway="nobody", timeout_s=0.3)
            with pytest.raises(TransportError, match="gateway 'nobody' did not answer"):
                await silent.info()
            await silent.aclose()
            async with MqttBridge(tiny_gateway, broker.url):
                t = MqttTransport(broker.url, timeout_s=10)
                with pytest.raises(UnknownSessionError):
                    await t.request(CloseSession(session_id="no-such-session"))
                await t.aclose()
            with pytest.raises(TransportError, match="closed"):
                await t.info()

    run(go())


def test_bridge_answers_a_repeated_request_once(tiny_gateway):
    """QoS 1 may deliver a request twice. While the first is running a copy is dropped (its reply
    is on the way); after it, a copy gets the stored reply. Either way one session is opened and
    every reply is the same."""

    async def go():
        async with EmbeddedBroker() as broker, MqttBridge(tiny_gateway, broker.url) as bridge:
            topics = Topics()
            client, protocol = await open_client(broker.url, identifier="raw-requester")
            try:
                await client.subscribe(topics.client_responses("raw"), qos=1)
                opened_before = tiny_gateway.stats["opened"]
                body = OpenSession(prompt_text="Hello", max_new_tokens=4).model_dump_json().encode()
                payload, props = encode_rpc(protocol, body, b"corr-1", topics.client_responses("raw"))
                replies = []

                async def collect(n, wait_s):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            async for message in client.messages:
                                replies.append(decode_rpc(message))
                                if len(replies) == n:
                                    return

                # two copies at once (the second is dropped if the first is still running, answered
                # from the stored reply if not), then one more after the first reply
                for _ in range(2):
                    await client.publish(topics.gateway_request("default"), payload, qos=1, properties=props)
                await collect(1, 10.0)
                await collect(2, 1.0)
                first_round = len(replies)
                await client.publish(topics.gateway_request("default"), payload, qos=1, properties=props)
                await collect(first_round + 1, 10.0)
            finally:
                await close_client(client)
            return replies, tiny_gateway.stats["opened"] - opened_before, dict(bridge.stats)

    replies, opened, stats = run(go())
    assert len(replies) in (2, 3) and all(r == replies[0] for r in replies)
    _, correlation, body = replies[0]
    assert correlation == b"corr-1" and SessionOpened.model_validate_json(body).session_id
    assert opened == 1 and stats["requests"] == 1 and stats["replays"] == len(replies) - 1


@needs_mosquitto
def test_speculation_is_lossless_over_mosquitto_mqtt5(tiny_gateway, mosquitto):
    """MQTT 5 request/response: Response Topic and Correlation Data properties; the device's
    replies arrive on its own subtree, which is all its ACL lets it read."""

    async def go():
        async with MqttBridge(tiny_gateway, mosquitto.url("gateway")) as bridge:
            transport = MqttTransport(mosquitto.url("dev-a"), device_id="dev-a", timeout_s=20)
            await transport.info()
            assert transport.protocol == "5" and bridge.protocol == "5"
            assert transport.response_topic == "tandem/devices/dev-a/responses"
            return await _speculate(transport)

    _check_lossless(tiny_gateway.lm, run(go()))


@needs_mosquitto
def test_device_cannot_read_another_devices_topics(mosquitto):
    """Per-device ACLs: dev-a reads and writes only tandem/devices/dev-a/#. (mosquitto 2.0 grants
    a subscription it may not serve and then never delivers on it; newer ones refuse it.)"""
    topics = Topics()

    async def drain(client, seconds):
        got = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for message in client.messages:
                    got.append((str(message.topic), message.payload))
        return got

    async def go():
        # no credentials, or wrong ones: refused outright
        with pytest.raises(TransportError, match="[Nn]ot authori[sz]ed"):
            await open_client(mosquitto.url())
        with pytest.raises(TransportError, match="[Nn]ot authori[sz]ed|[Bb]ad user"):
            await open_client(str(BrokerURL.parse(mosquitto.url("dev-a")).with_credentials("dev-a", "wrong")))
        coord, _ = await open_client(mosquitto.url("coordinator"))
        dev_a, _ = await open_client(mosquitto.url("dev-a"))
        try:
            await coord.subscribe(topics.results("dev-b"), qos=1)
            await dev_a.subscribe(topics.tasks("dev-b"), qos=1)
            await dev_a.subscribe("tandem/devices/+/caps", qos=1)  # a wildcard over every device
            await dev_a.subscribe("tandem/#", qos=1)
            await dev_a.subscribe(topics.tasks("dev-a"), qos=1)
            await coord.publish(topics.tasks("dev-b"), b"for b only", qos=1)
            await coord.publish(topics.caps("dev-b"), b"b's caps", qos=1, retain=True)
            await coord.publish(topics.tasks("dev-a"), b"for a", qos=1)
            await dev_a.publish(topics.results("dev-b"), b"forged by a", qos=1)
            seen_by_a = await drain(dev_a, 1.0)
            seen_by_coord = await drain(coord, 0.3)
        finally:
            await close_client(dev_a)
            await close_client(coord)
        return seen_by_a, seen_by_coord

    seen_by_a, seen_by_coord = run(go())
    assert seen_by_a == [("tandem/devices/dev-a/tasks", b"for a")] * len(seen_by_a) and seen_by_a
    assert seen_by_coord == []


@needs_mosquitto
def test_persistent_session_survives_a_broker_restart(mosquitto):
    """A device's subscription and the QoS 1 task queued for it while it was away outlive a
    mosquitto restart; so does its retained announcement."""
    topics = Topics()

    async def go():
        dev, _ = await open_client(mosquitto.url("dev-a"), identifier="tandem-device-dev-a", persistent=True)
        await dev.subscribe(topics.tasks("dev-a"), qos=1)
        await dev.publish(topics.caps("dev-a"), b"caps of a", qos=1, retain=True)
        await close_client(dev)

        mosquitto.restart()

        coord, _ = await open_client(mosquitto.url("coordinator"))
        await coord.publish(topics.tasks("dev-a"), b"queued while away", qos=1)
        await coord.subscribe(topics.caps("dev-a"), qos=1)
        async with asyncio.timeout(5):
            caps = await anext(aiter(coord.messages))
        await close_client(coord)

        # back, without subscribing again: the broker kept the session and its queue
        dev, _ = await open_client(mosquitto.url("dev-a"), identifier="tandem-device-dev-a", persistent=True)
        try:
            async with asyncio.timeout(5):
                message = await anext(aiter(dev.messages))
        finally:
            await close_client(dev)
        return caps, message

    caps, message = run(go())
    assert caps.payload == b"caps of a" and caps.retain
    assert (str(message.topic), message.payload) == ("tandem/devices/dev-a/tasks", b"queued while away")


@needs_mosquitto
def test_a_graph_completes_across_a_broker_restart(tmp_path, tiny_target):
    """Devices and coordinator reconnect to their persistent sessions; tasks and results queued
    meanwhile are delivered; each task's result is applied once and the outputs are right."""
    from tandem.sdk.taskgraph import Coordinator, Function, Graph, Map, Reduce
    from tandem.sdk.taskgraph.agent import DeviceAgent

    lib = "tandem.sdk.taskgraph.library"
    graph = Graph(
        [
            Function("items", f"{lib}:split_chunks", inputs=["text"], kwargs={"size": 12}),
            Map("notes", over="items", prompt="{item}", max_new_tokens=48, ignore_eos=True),
            Reduce("all", over="notes", fn=f"{lib}:join"),
        ],
        inputs=["text"],
    )
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    broker = Mosquitto(tmp_path / "mosquitto")

    async def go():
        broker.start()
        agents = [DeviceAgent(f"dev-{i}", broker.url(), model="tiny-llama", threads=2, heartbeat_s=0.3, reconnect_s=0.2)
                  for i in range(2)]
        runners = [asyncio.create_task(a.run()) for a in agents]
        try:
            async with Coordinator(broker.url(), heartbeat_grace=30, reconnect_s=0.2) as coord:
                await coord.wait_for_devices(2, timeout_s=30)
                job = asyncio.create_task(coord.run(graph, {"text": text}, deadline_s=60))
                while coord.progress()[0] < 2:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(broker.restart)
                return await job
        finally:
            for r in runners:
                r.cancel()
            await asyncio.gather(*runners, return_exceptions=True)

    try:
        report = run(go())
    finally:
        broker.stop()
    assert report.completed and report.lost == 0 and report.duplicates == 0
    tok = tiny_target.tokenizer
    from tandem.local_runtime.sequence import generate_alone as alone
    from tandem.sdk.taskgraph.library import split_chunks

    expected = [tok.text(alone(tiny_target, tok.prompt_tokens(c, chat=False), 48, eos_token_ids=[])) for c in split_chunks(text, 12)]
    assert report.outputs["all"] == "\n".join(expected)
