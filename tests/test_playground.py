"""The playground's server: one generation as server-sent events, the link controls, the errors.
(The page itself is driven in a real browser in test_playground_browser.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from tandem.sdk import Client
from tandem.sdk.bench.launch import serving
from tandem.sdk.bench.linksim import LinkProxy
from tandem.sdk.playground import Playground, create_app
from tandem.sdk.playground.events import summarize
from tandem.sdk.usage import GenerationRecord, Round, Usage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def playground(words_pair, words_server):
    """A playground whose client reaches the readable-text gateway through its own link proxy."""
    target, drafter = words_pair
    with LinkProxy.in_front_of(words_server) as link:
        client = Client(drafter=drafter, gateway=link.url, timeout_s=10, retries=1, probe_timeout_s=0.5,
                        rejoin_every=8, progress=False)
        pg = Playground(client, link, gateway=words_server, target=target.name)
        with serving(create_app(pg), lifespan="on") as url:
            yield url, pg, link


def events(response: httpx.Response):
    """(name, data) for each server-sent event of a streaming response, as they arrive."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


def generate(url: str, **form) -> list[tuple[str, dict]]:
    with httpx.stream("POST", url + "/api/generate", json=form, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))


def test_state_names_the_models_the_modes_and_the_link(playground):
    url, _, _ = playground
    state = httpx.get(url + "/api/state").json()
    assert state["drafter"] == "tiny-words-drafter" and state["target"] == "tiny-words"
    assert state["modes"] == ["local", "cloud", "speculative", "assist", "auto"]
    assert set(state["origins"]) == {"accepted", "cloud", "local"}
    assert state["link"] == {"simulated": True, "rtt_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0, "down": False}
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="output"' in page.text
    for asset in ("playground.js", "playground.css", "favicon.svg"):
        assert httpx.get(f"{url}/static/{asset}").status_code == 200


def test_a_speculative_generation_streams_rounds_pieces_and_usage(playground):
    url, _, _ = playground
    got = generate(url, prompt="tell me", max_new_tokens=60)
    names = [n for n, _ in got]
    assert names[0] == "start" and names[-1] == "done" and "error" not in names
    pieces = [d for n, d in got if n == "piece"]
    rounds = [d for n, d in got if n == "round"]
    done = got[-1][1]
    assert "".join(p["text"] for p in pieces) == done["text"]  # every piece, in order, nothing else
    assert {p["origin"] for p in pieces} == {"accepted", "cloud"}
    assert done["text"] and set(done["text"]) <= set("abcdefghijklmnopqrstuvwxyz .,")
    u = done["usage"]
    assert u["tokens"] == 60 and u["fallbacks"] == 0 and done["finish_reason"] == "length"
    assert u["rounds"] == len(rounds) == rounds[-1]["index"]
    assert sum(r["emitted"] for r in rounds) == 60
    assert u["tokens_per_round"] == pytest.approx(60 / len(rounds))
    assert u["cloud_passes_per_token"] == pytest.approx(len(rounds) / 60)
    assert u["bytes_up"] > 0 and u["bytes_down"] > 0 and u["tokens_per_s"] > 0
    assert 0 < u["acceptance_rate"] <= 1
    assert all(r["k"] == r["accepted"] + r["rejected"] for r in rounds)
    assert done["estimate"]["rounds"] >= len(rounds)


def test_modes_local_and_cloud(playground):
    url, _, _ = playground
    local = generate(url, prompt="tell me", mode="local", max_new_tokens=20)
    assert {d["origin"] for n, d in local if n == "piece"} == {"local"}
    assert local[-1][1]["usage"]["cloud_passes_per_token"] == 0
    assert local[-1][1]["usage"]["cloud_tokens_per_s"] is None  # no cloud run yet: the page says so
    cloud = generate(url, prompt="tell me", mode="cloud", max_new_tokens=20)
    assert {d["origin"] for n, d in cloud if n == "piece"} == {"cloud"}
    u = cloud[-1][1]["usage"]
    assert u["cloud_passes_per_token"] == 1 and u["tokens_per_round"] is None
    # the cloud-alone rate is remembered: every later run's usage (and the state) carries it
    assert u["cloud_tokens_per_s"] == u["tokens_per_s"] > 0
    assert httpx.get(url + "/api/state").json()["cloud_tokens_per_s"] == u["tokens_per_s"]
    spec = generate(url, prompt="tell me", max_new_tokens=20)
    assert all(d["cloud_tokens_per_s"] == u["tokens_per_s"] for n, d in spec if n == "usage")
    assert spec[-1][1]["usage"]["cloud_tokens_per_s"] == u["tokens_per_s"]


def test_auto_reports_its_decision(playground):
    url, _, _ = playground
    got = generate(url, prompt="tell me", mode="auto", max_new_tokens=16)
    decision = next(d for n, d in got if n == "decision")
    assert decision["mode"] in ("cloud", "speculative")
    assert set(decision["predicted"]) == {"cloud", "speculative"} and decision["rtt_ms"] is not None
    policy = str(ROOT / "samples" / "policies" / "offline-first.yaml")
    got = generate(url, prompt="tell me", mode="auto", max_new_tokens=16, policy=policy, tags=["cloud-ok"])
    decision = next(d for n, d in got if n == "decision")
    assert decision["mode"] == "assist" and decision["policy"]["rule"] == "allowed-to-ask"


def test_cutting_the_link_mid_generation_the_device_finishes_and_rejoins(playground):
    url, pg, link = playground
    got, restored = [], False
    with httpx.stream("POST", url + "/api/generate", json={"prompt": "tell me", "max_new_tokens": 160}, timeout=60) as response:
        for name, data in events(response):
            got.append((name, data))
            if name == "round" and data["index"] == 3:
                assert httpx.post(url + "/api/link/cut").json()["down"] is True
            if name == "offline" and not restored:
                restored = True
                assert httpx.post(url + "/api/link/restore").json()["down"] is False
    names = [n for n, _ in got]
    done = got[-1][1]
    assert "offline" in names and "rejoin" in names and names.index("offline") < names.index("rejoin")
    alone = got[names.index("offline"):names.index("rejoin")]
    assert {d["origin"] for n, d in alone if n == "piece"} == {"local"}  # the device alone, in between
    after = got[names.index("rejoin"):]
    assert any(n == "round" for n, _ in after)  # speculation came back
    assert "".join(d["text"] for n, d in got if n == "piece") == done["text"]
    assert done["usage"]["tokens"] == 160 and done["usage"]["fallbacks"] == 1


def test_link_settings_reach_the_proxy(playground):
    url, _, link = playground
    state = httpx.post(url + "/api/link", json={"rtt_ms": 80, "jitter_ms": 10, "loss": 0.01}).json()
    assert state == {"simulated": True, "rtt_ms": 80.0, "jitter_ms": 10.0, "loss": 0.01, "down": False}
    assert link.config.delay_ms == 40 and link.config.jitter_ms == 10 and link.config.loss == 0.01
    bad = httpx.post(url + "/api/link", json={"rtt_ms": -1})
    assert bad.status_code == 400 and "rtt_ms" in bad.json()["error"]


def test_bad_requests_name_what_is_wrong(playground):
    url, _, _ = playground
    r = httpx.post(url + "/api/generate", json={"prompt": "", "mode": "sideways"})
    assert r.status_code == 400 and "prompt" in r.json()["error"] and "mode" in r.json()["error"]
    r = httpx.post(url + "/api/generate", json={"prompt": "x", "mode": "auto", "policy": "no/such/policy.yaml"})
    assert r.status_code == 400 and "policy file not found: no/such/policy.yaml" in r.json()["error"]


def test_one_generation_at_a_time(playground):
    url, _, _ = playground
    started = threading.Event()
    with httpx.stream("POST", url + "/api/generate", json={"prompt": "x", "max_new_tokens": 300}, timeout=60) as response:
        for name, _ in events(response):
            if name == "round":
                started.set()
                second = httpx.post(url + "/api/generate", json={"prompt": "y"})
                assert second.status_code == 409 and "already running" in second.json()["error"]
                break  # the page's Stop: the stream is dropped and the generation ends
    assert started.is_set()
    # the dropped stream released the playground for the next one
    assert generate(url, prompt="x", max_new_tokens=5)[-1][0] == "done"


def test_without_a_simulated_link_the_controls_say_why(words_pair, tiny_gateway):
    pg = Playground(Client(drafter=words_pair[1], gateway=tiny_gateway, progress=False), None, gateway="https://example.org")
    with serving(create_app(pg), lifespan="on") as url:
        assert httpx.get(url + "/api/state").json()["link"] == {"simulated": False}
        r = httpx.post(url + "/api/link/cut")
        assert r.status_code == 409 and "not behind the link simulator" in r.json()["error"]


def test_a_cloud_run_that_ends_on_any_finish_reason_sets_the_cloud_rate(words_pair, tiny_gateway):
    from tandem.sdk.playground.events import Event

    pg = Playground(Client(drafter=words_pair[1], gateway=tiny_gateway, progress=False), None, gateway="inproc")
    for reason, rate in (("eos", 5.0), ("length", 6.0), (None, 7.0)):  # None: the run failed
        usage = {"mode": "cloud", "tokens": 10, "tokens_per_s": rate}
        pg._with_cloud_rate(Event("done", {"finish_reason": reason, "usage": usage}), usage)
    assert pg.cloud_tokens_per_s == 6.0 and usage["cloud_tokens_per_s"] == 6.0


def test_summary_of_a_record():
    rec = GenerationRecord(mode="speculative", tokens=list(range(10)),
                           usage=Usage(accepted_tokens=6, cloud_tokens=4, tested_tokens=8, rounds=4, wall_s=2.0),
                           rounds=[Round(4, 2, 3), Round(2, 2, 3), Round(1, 0, 1), Round(3, 2, 3)])
    s = summarize(rec, moved=(100, 200))
    assert s["tokens_per_round"] == 2.5 and s["cloud_passes_per_token"] == 0.4 and s["tokens_per_s"] == 5.0
    assert s["acceptance_rate"] == 0.75 and (s["bytes_up"], s["bytes_down"]) == (100, 200)
    assert summarize(GenerationRecord(mode="local"))["tokens_per_round"] is None
    assert s["ttft_ms"] is None and summarize(GenerationRecord(mode="cloud", first_piece_s=0.1234))["ttft_ms"] == 123.4
