"""The link simulator adds delay, caps bandwidth, drops and resets connections, on loopback."""

import time

import httpx
import pytest

from tandem.sdk.bench.linksim import LinkProxy


def _timed_get(client: httpx.Client, path: str = "/healthz") -> float:
    t0 = time.perf_counter()
    assert client.get(path).status_code == 200
    return time.perf_counter() - t0


def test_delay_adds_a_round_trip(tiny_server):
    port = int(tiny_server.rsplit(":", 1)[1])
    with httpx.Client(base_url=tiny_server) as direct:
        base = min(_timed_get(direct) for _ in range(3))
    with LinkProxy(port, delay_ms=40) as link, httpx.Client(base_url=link.url) as client:
        _timed_get(client)  # connection set-up costs its own round trip
        rtt = min(_timed_get(client) for _ in range(3))
    assert rtt >= 0.08  # one request and its reply: 2 x 40 ms
    assert rtt < base + 0.5


def test_bandwidth_cap_slows_large_bodies(tiny_server):
    port = int(tiny_server.rsplit(":", 1)[1])
    size = len(httpx.get(tiny_server + "/openapi.json").content)
    bandwidth = size * 8 / 0.3  # the schema takes 0.3 s to cross the link
    with LinkProxy(port, bandwidth_bps=bandwidth) as link, httpx.Client(base_url=link.url) as client:
        t0 = time.perf_counter()
        assert len(client.get("/openapi.json").content) == size
        elapsed = time.perf_counter() - t0
    assert elapsed >= 0.27


def test_outage_refuses_then_recovers(tiny_server):
    port = int(tiny_server.rsplit(":", 1)[1])
    with LinkProxy(port) as link:
        with httpx.Client(base_url=link.url, timeout=2) as client:
            assert client.get("/healthz").status_code == 200
            link.outage(0.5)
            with pytest.raises(httpx.TransportError):
                client.get("/healthz")
        time.sleep(0.6)
        with httpx.Client(base_url=link.url, timeout=2) as client:
            assert client.get("/healthz").status_code == 200
        assert link.stats.refused + link.stats.resets >= 1


def test_loss_resets_connections(tiny_server):
    port = int(tiny_server.rsplit(":", 1)[1])
    with LinkProxy(port, loss=1.0, seed=1) as link, httpx.Client(base_url=link.url, timeout=2) as client:
        with pytest.raises(httpx.TransportError):
            client.get("/healthz")
        assert link.stats.resets >= 1


def test_scripted_outage_window(tiny_server):
    port = int(tiny_server.rsplit(":", 1)[1])
    with LinkProxy(port, outages=[(0.0, 0.4)]) as link:
        with httpx.Client(base_url=link.url, timeout=2) as client, pytest.raises(httpx.TransportError):
            client.get("/healthz")
        time.sleep(0.5)
        with httpx.Client(base_url=link.url, timeout=2) as client:
            assert client.get("/healthz").status_code == 200
