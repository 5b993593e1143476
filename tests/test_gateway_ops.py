"""Operating the gateway: health and readiness, Prometheus metrics, structured logs, the sample
config, the CLI (`gateway serve` refusals, `gateway new-key`, `bench gateway`), and the vLLM
backend's adapter against a stand-in of vLLM's API."""

import json
import logging
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import GatewayError
from tandem.protocols.messages import OpenSession
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.auth import hash_key
from tandem.remote_gateway.config import load_config
from tandem.remote_gateway.logs import JsonFormatter
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client
from tandem.sdk.cli import app as cli

from .conftest import run, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]


def test_health_readiness_and_metrics(tiny_target):
    gw = Gateway(tiny_target)
    with serve_in_thread(create_app(gw)) as url:
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200 and ready.json()["replica"] == gw.replica_id

        async def go():
            async with Client(drafter="tiny-llama:int8", gateway=url, draft_len=4) as c:
                return await c.generate("Hello", max_new_tokens=12, chat=False)

        run(go())
        httpx.post(url + "/v1/sessions/verify", json={"session_id": f"s_{gw.replica_id}.y", "position": 1, "draft_tokens": [], "draft_probs": []})
        text = httpx.get(url + "/metrics").text
        for line in (
            'tandem_requests_total{route="/v1/sessions",status="200"}',
            'tandem_requests_total{route="/v1/sessions/verify",status="404"}',
            'tandem_errors_total{code="unknown_session"} 1.0',
            'tandem_tokens_total{kind="prompt"}',
            'tandem_verifies_total{kind="tokens"}',
            "tandem_draft_tokens_total",
            "tandem_accepted_tokens_total",
            "tandem_acceptance_ratio_bucket",
            "tandem_verify_batch_size_bucket",
            "tandem_sessions 0.0",
            "tandem_kv_cache_bytes",
            "tandem_request_seconds_bucket",
        ):
            assert line in text, line
        gw.close()  # draining: not ready any more, still alive
        assert httpx.get(url + "/readyz").status_code == 503
        assert httpx.get(url + "/healthz").status_code == 200


def test_access_log_is_structured(tiny_server, caplog):
    with caplog.at_level(logging.INFO, logger="tandem.gateway.access"):
        httpx.get(tiny_server + "/v1/info", headers={"x-tandem-session": "s_a.b"})
        deadline = time.monotonic() + 5  # the line is written once the response has gone out
        while not (records := [r for r in caplog.records if r.name == "tandem.gateway.access" and r.path == "/v1/info"]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert records, caplog.records
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["method"] == "GET" and line["status"] == 200 and line["ms"] >= 0
    assert line["key"] == "anonymous" and line["session"] == "s_a.b" and line["level"] == "info"


def test_sample_config_runs_as_is():
    cfg = load_config(ROOT / "samples" / "gateway.yaml")
    assert cfg.model == "gemma3-270m" and cfg.auth_mode == "keys" and len(cfg.keys) == 2
    cfg.check_exposure()
    ring = cfg.keyring()  # bob's key comes from the environment: absent here, skipped
    assert ring.authenticate("Bearer tdm_demo_alice_change_me").id == "alice"
    assert cfg.batching.enabled and cfg.limits().kv_cache_budget_mb > 0


def test_cli_serve_refuses_an_open_gateway_and_names_config_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["gateway", "serve", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "refusing" in r.output
    bad = tmp_path / "gw.yaml"
    bad.write_text("keys:\n  - id: a\n    sha256: nothex\n")
    r = runner.invoke(cli, ["gateway", "serve", "--config", str(bad)])
    assert r.exit_code == 2 and "keys.0.sha256" in r.output


def test_cli_new_key_prints_a_matching_hash():
    out = CliRunner().invoke(cli, ["gateway", "new-key", "ci"]).output
    key = out.split("): ")[1].split()[0]
    assert key.startswith("tdm_") and f"sha256: {hash_key(key)}" in out and "id: ci" in out


def test_cli_bench_gateway_contract():
    r = CliRunner().invoke(cli, ["bench", "gateway", "--model", "tiny-llama", "--sessions", "6", "--rounds", "3", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for field in ("sessions", "errors", "verify_per_s", "batched_vs_unbatched", "p99_ms", "peak_rss_mb"):
        assert field in result, field
    assert result["sessions"] == 6 and result["errors"] == 0 and result["mismatches"] == 0
    assert result["verify_per_s"] > 0 and result["p99_ms"] > 0 and result["peak_rss_mb"] > 0
    assert result["batched"]["verifies"] == result["unbatched"]["verifies"] == 18


# -- the vLLM backend, against a stand-in of the vLLM API it uses -------------------------------


def _fake_vllm(lm, calls: list):
    """vllm.LLM / SamplingParams / inputs.TokensPrompt, computing prompt logprobs with `lm`."""

    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class TokensPrompt(dict):
        def __init__(self, prompt_token_ids):
            super().__init__(prompt_token_ids=prompt_token_ids)

    class LLM:
        def __init__(self, model, **kw):
            self.model, self.kw = model, kw

        def generate(self, prompts, params, use_tqdm=True):
            calls.append(len(prompts))
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                with torch.inference_mode():
                    logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)

                def top(row):
                    v, i = torch.topk(row, params.kw["prompt_logprobs"])
                    return {int(t): Logprob(float(x)) for x, t in zip(v, i)}

                prompt_lp = [None] + [top(logp[j - 1]) for j in range(1, len(ids))]
                outs.append(types.SimpleNamespace(prompt_logprobs=prompt_lp, outputs=[types.SimpleNamespace(logprobs=[top(logp[-1])])]))
            return outs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    vllm.inputs = inputs
    return vllm, inputs


def test_vllm_backend_adapter(tiny_target, monkeypatch):
    from tandem.remote_gateway.backends import VllmBackend

    calls: list = []
    vllm, inputs = _fake_vllm(tiny_target, calls)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    backend = VllmBackend("tiny-llama")
    assert backend.llm.kw["enable_prefix_caching"] is True
    gw = Gateway(backend=backend)

    async def go():
        async def one(prompt):
            async with Client(drafter="tiny-llama:int8", gateway=InProcessTransport(gw), draft_len=3) as c:
                return await c.generate(prompt, max_new_tokens=10, chat=False)

        import asyncio

        recs = await asyncio.gather(*(one(p) for p in ["Hello", "abc", "1 2 3"]))
        with pytest.raises(GatewayError, match="greedily"):
            await gw.open(OpenSession(prompt_text="x", sampling={"temperature": 0.5}))
        return recs

    try:
        recs = run(go())
    finally:
        gw.close()
    for prompt, rec in zip(["Hello", "abc", "1 2 3"], recs):
        assert rec.tokens == list(generate_alone(tiny_target, tiny_target.tokenizer.prompt_tokens(prompt, chat=False), 10))
    assert max(calls) > 1  # sessions went to vLLM together


def test_vllm_missing_is_a_one_line_error(monkeypatch):
    from tandem.protocols.errors import ModelLoadError
    from tandem.remote_gateway.backends import VllmBackend

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ModelLoadError, match="pip install vllm"):
        VllmBackend("tiny-llama")
