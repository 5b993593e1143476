"""Scaling out: gateway replicas behind nginx. Session ids name their replica, the generated
config routes every request of a session to it, and when a replica dies mid-generation its
clients re-open their sessions on a survivor: every answer is still the target's own."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.local_runtime.text import IncrementalDecoder
from tandem.protocols.broker import free_port
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.replicas import discover, nginx_config
from tandem.remote_gateway.service import Gateway
from tandem.remote_gateway.sessions import replica_of
from tandem.sdk import Client
from tandem.sdk.bench import launch
from tandem.sdk.bench.launch import GatewayProcess, NginxProcess, nginx_binary
from tandem.sdk.cli.main import app as cli

from .conftest import run, serve_in_thread

REPLICAS = {"ra": "http://127.0.0.1:8001", "rb": "http://127.0.0.1:8002"}


def test_replica_of():
    assert replica_of("s_r1.abcDEF-_x") == "r1"
    assert replica_of("s_us-east-2.x") == "us-east-2"
    for bad in ("s_nope", "s_.x", "s_r1.", "x_r1.abc", ""):
        assert replica_of(bad) is None


def _blocks(conf: str, kind: str) -> dict[str, list[str]]:
    """name -> the directives of each `kind NAME { ... }` block (one level, no nesting)."""
    found = re.findall(rf"^\s*{kind} (\S+(?: \S+)?) \{{\n(.*?)\n\s*\}}", conf, re.S | re.M)
    return {name: [d.strip() for d in body.splitlines() if d.strip() and not d.strip().startswith("#")]
            for name, body in found}


def test_the_config_routes_each_session_to_its_replica():
    conf = nginx_config(REPLICAS, "127.0.0.1:9000")
    maps = _blocks(conf, "map")
    assert maps["$http_x_tandem_session $tandem_replica"] == ['"~^s_(?<r>[A-Za-z0-9-]+)\\."  $r;', 'default  "";']
    assert maps["$tandem_replica $tandem_upstream"] == [
        "default  tandem_pool;", "ra  tandem_replica_ra;", "rb  tandem_replica_rb;"]
    ups = _blocks(conf, "upstream")
    assert set(ups) == {"tandem_pool", "tandem_replica_ra", "tandem_replica_rb"}
    assert ups["tandem_pool"][:3] == ["least_conn;", "server 127.0.0.1:8001 max_fails=1 fail_timeout=10s;",
                                      "server 127.0.0.1:8002 max_fails=1 fail_timeout=10s;"]
    # a replica's own upstream: it first, every other replica only as a backup
    assert ups["tandem_replica_ra"][:2] == ["server 127.0.0.1:8001 max_fails=1 fail_timeout=10s;",
                                            "server 127.0.0.1:8002 backup;"]
    assert ups["tandem_replica_rb"][:2] == ["server 127.0.0.1:8002 max_fails=1 fail_timeout=10s;",
                                            "server 127.0.0.1:8001 backup;"]
    assert all("keepalive 32;" in u for u in ups.values())
    location = _blocks(conf, "location")["/"]
    for directive in ("proxy_pass http://$tandem_upstream;", "proxy_buffering off;", "proxy_http_version 1.1;",
                      "proxy_next_upstream error timeout http_502 http_503 non_idempotent;"):
        assert any(d.startswith(directive) for d in location), directive
    assert "listen 127.0.0.1:9000;" in conf and "temp_path" not in conf
    assert "proxy_temp_path /x/proxy;" in nginx_config(REPLICAS, temp_dir="/x")


@pytest.mark.parametrize("replicas", [{}, {"r_1": "http://h:1"}, {"ra": "https://h:1"}, {"ra": "http://h:1/v1"}])
def test_the_config_refuses_what_nginx_could_not_route(replicas):
    with pytest.raises(ValueError):
        nginx_config(replicas)


@pytest.fixture(scope="module")
def nginx() -> str:
    try:
        return nginx_binary()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; .ci/run installs it")


def test_nginx_accepts_the_config(nginx, tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(REPLICAS, "127.0.0.1:9000", temp_dir=str(tmp_path)))
    cmd = [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-g", f"pid {tmp_path}/nginx.pid; error_log stderr;"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "syntax is ok" in out.stderr


@pytest.fixture(scope="module")
def two_in_process(tiny_target):
    """Replicas ra and rb as uvicorn threads of this process: {id: url}."""
    a, b = Gateway(tiny_target, replica_id="ra"), Gateway(tiny_target, replica_id="rb")
    with serve_in_thread(create_app(a)) as url_a, serve_in_thread(create_app(b)) as url_b:
        yield {"ra": url_a, "rb": url_b}
    a.close()
    b.close()


def test_cli_writes_the_config_of_the_replicas_it_asks(two_in_process, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    urls = [arg for url in two_in_process.values() for arg in ("--replica", url)]
    printed = CliRunner().invoke(cli, ["gateway", "nginx", *urls, "--listen", "127.0.0.1:9000"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == nginx_config(two_in_process, "127.0.0.1:9000")
    out = tmp_path / "lb.conf"
    assert CliRunner().invoke(cli, ["gateway", "nginx", *urls, "--out", str(out)]).exit_code == 0
    assert out.read_text() == nginx_config(two_in_process)
    assert CliRunner().invoke(cli, ["gateway", "nginx", *urls, "--listen", "9000"]).exit_code == 2

    def missing():
        raise FileNotFoundError("nginx is not installed (Debian/Ubuntu: apt-get install nginx)")

    monkeypatch.setattr(launch, "nginx_binary", missing)
    r = CliRunner().invoke(cli, ["gateway", "nginx", *urls, "--run"])
    assert r.exit_code == 1 and "nginx is not installed" in r.output


def test_cli_runs_nginx_in_front_of_the_replicas(nginx, two_in_process):
    port = free_port()
    urls = [arg for url in two_in_process.values() for arg in ("--replica", url)]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.sdk.cli", "gateway", "nginx", *urls,
                             "--listen", f"127.0.0.1:{port}", "--run"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: a failed stop can take nginx down too
    try:
        deadline, seen = time.monotonic() + 30, set()
        while time.monotonic() < deadline and seen != {"ra", "rb"}:
            try:
                seen.add(httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=2).json()["replica"])
            except httpx.TransportError:
                time.sleep(0.2)
        assert seen == {"ra", "rb"}  # stateless requests spread over both
        chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "temperature": 0,
                "stream": True}
        sse = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat, timeout=30)
        assert sse.status_code == 200 and sse.text.rstrip().endswith("data: [DONE]")  # SSE passes through
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command stops nginx and exits
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its nginx: no leaked pipes into later tests
            proc.communicate(timeout=15)
            raise
    assert proc.returncode == 0, stderr
    assert "nginx: http://127.0.0.1" in stderr


# -- a replica killed mid-generation -------------------------------------------------------------

PROMPTS = ["Hello", "abc", "The fox", "1 2 3"]
N_TOKENS = 24  # per speculative generation
CLOUD_PROMPT, N_CLOUD = "xyz", 80  # long enough to be streaming still when its replica dies
PAUSE_AT = 8  # tokens a generation has before the kill


def _reference(lm, prompt: str, n: int) -> tuple[list[int], str]:
    """The target's own greedy tokens, and their text as one uninterrupted stream decodes it."""
    tok = lm.tokenizer
    tokens = list(generate_alone(lm, tok.prompt_tokens(prompt, chat=False), n))
    decoder = IncrementalDecoder(tok.decode, skip_ids=tok.special_ids)
    return tokens, decoder.push(tokens) + decoder.flush()


@pytest.fixture()
def cluster(nginx, tmp_path):
    """Two gateway processes (replicas ra and rb, the tiny target) behind a private nginx."""
    gateways = {}
    for rid in ("ra", "rb"):
        config = tmp_path / f"{rid}.yaml"
        config.write_text(f"replica_id: {rid}\nlog_level: warning\n")
        gateways[rid] = GatewayProcess("tiny-llama", config=config, quiet=True, ready_timeout_s=45)
    try:
        with ThreadPoolExecutor(2) as pool:  # both load their model at once
            list(pool.map(GatewayProcess.start, gateways.values()))
        assert discover([g.url for g in gateways.values()]) == {rid: g.url for rid, g in gateways.items()}
        with NginxProcess({rid: g.url for rid, g in gateways.items()}) as lb:
            yield lb, gateways
    finally:
        for g in gateways.values():
            g.stop()


async def _sessions(gateways: dict[str, GatewayProcess]) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=5) as http:
        return {rid: (await http.get(g.url + "/healthz")).json()["sessions"] for rid, g in gateways.items()}


async def _kill_one_mid_generation(lb: NginxProcess, gateways: dict[str, GatewayProcess], drafter):
    """Speculative generations through nginx, paused once each has PAUSE_AT tokens (their
    sessions spread over both replicas, nothing in flight); then a cloud-mode stream; the
    replica streaming it is killed (SIGKILL) and everything goes on."""
    paused: set[str] = set()
    resume, streaming = asyncio.Event(), asyncio.Event()

    async def speculative(prompt):
        async with Client(drafter=drafter, gateway=lb.url, draft_len=3, timeout_s=10) as c:
            gen = c.stream(prompt, max_new_tokens=N_TOKENS, chat=False)
            async for _ in gen:
                if len(gen.tokens) >= PAUSE_AT and prompt not in paused:
                    paused.add(prompt)
                    await resume.wait()
            paused.add(prompt)  # also one that finished before it paused
            return gen.record

    async def cloud():
        async with Client(drafter=drafter, gateway=lb.url, timeout_s=10) as c:
            gen = c.stream(CLOUD_PROMPT, mode="cloud", max_new_tokens=N_CLOUD, chat=False)
            async for _ in gen:
                if len(gen.tokens) >= PAUSE_AT:
                    streaming.set()
            return gen.record

    runs = [asyncio.ensure_future(speculative(p)) for p in PROMPTS]
    while len(paused) < len(PROMPTS):
        await asyncio.sleep(0.01)
    held = await _sessions(gateways)
    cloud_run = asyncio.ensure_future(cloud())
    await streaming.wait()
    now = await _sessions(gateways)
    victim = next((rid for rid in now if now[rid] > held[rid]), None)  # the replica streaming the cloud answer
    assert victim is not None, f"the cloud answer ended before a replica could be killed ({held} -> {now})"
    gateways[victim].proc.kill()
    gateways[victim].proc.wait(timeout=10)
    resume.set()
    return await asyncio.gather(*runs), await cloud_run, victim, held


def test_a_replica_killed_mid_generation_loses_nothing(cluster, tiny_target):
    lb, gateways = cluster
    drafter = load_model("tiny-llama-b", progress=False)  # shares the target's tokenizer
    recs, cloud, victim, held = run(asyncio.wait_for(_kill_one_mid_generation(lb, gateways, drafter), 45))
    assert held[victim] > 0, f"no speculative session was on the replica killed ({held})"
    for prompt, rec in zip(PROMPTS, recs):
        tokens, text = _reference(tiny_target, prompt, N_TOKENS)
        assert (rec.tokens, rec.text) == (tokens, text), prompt
        assert rec.usage.fallbacks == 0  # re-opened on the survivor, never the device alone
    tokens, text = _reference(tiny_target, CLOUD_PROMPT, N_CLOUD)
    assert (cloud.tokens, cloud.text) == (tokens, text)
    assert cloud.usage.rounds == 2 and cloud.usage.fallbacks == 0  # cut once, resumed once
    survivor = next(g for rid, g in gateways.items() if rid != victim)
    assert httpx.get(survivor.url + "/healthz", timeout=5).json()["sessions"] == 0  # every session closed
