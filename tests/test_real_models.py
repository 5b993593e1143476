"""The bundled models end to end (slow: they load real weights)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.local_runtime.models import load_model
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client
from tandem.sdk.bench.prompts import load_prompts

from .conftest import run

pytestmark = pytest.mark.slow

SPECBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "specbench" / "question.jsonl"


@pytest.fixture(scope="module")
def smollm_gateway():
    gw = Gateway(load_model("smollm2-135m", progress=False))
    yield gw
    gw.close()


def _prompts(n):
    return load_prompts(SPECBENCH if SPECBENCH.exists() else None, n)


def test_int8_smollm_drafts_for_smollm_losslessly(smollm_gateway):
    async def go():
        async with Client(drafter="smollm2-135m:int8", gateway=InProcessTransport(smollm_gateway), draft_len=5) as c:
            out = []
            for prompt in _prompts(4):
                spec = await c.generate(prompt, max_new_tokens=32)
                cloud = await c.generate(prompt, mode="cloud", max_new_tokens=32)
                out.append((spec, cloud))
            return out

    for spec, cloud in run(go()):
        assert spec.tokens == cloud.tokens
        assert spec.text == cloud.text
        assert spec.usage.acceptance_rate > 0.6


def test_chat_template_is_applied():
    lm = load_model("smollm2-135m", progress=False)
    ids = lm.tokenizer.prompt_tokens("Hi")
    text = lm.tokenizer.decode(ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_cli_generate_json():
    out = subprocess.run(
        [sys.executable, "-m", "tandem.sdk.cli", "generate", "What is 2+2?", "--max-new-tokens", "12", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["mode"] == "speculative" and data["text"]
    assert set(data["usage"]) >= {"local_tokens", "cloud_tokens", "accepted_tokens", "rounds", "bytes_up", "bytes_down", "wall_s", "fallbacks"}
    assert 0 < data["usage"]["ttft_ms"] < data["usage"]["wall_s"] * 1000
