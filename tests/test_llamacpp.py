"""llama.cpp on the bundled SmolLM2 GGUF (slow: loads the real model files)."""

import pytest

from tandem.local_runtime.models import load_tokenizer
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.transport import InProcessTransport
from tandem.sdk import Client

from .conftest import run

pytestmark = pytest.mark.slow

PROMPT = "Explain in two sentences why the sky is blue."


@pytest.fixture(scope="module")
def smol_cpp():
    pytest.importorskip("llama_cpp")
    from tandem.local_runtime.backends import load_drafter

    return load_drafter("smollm2-135m", "llama.cpp", progress=False)


def test_drafts_equal_llama_cpp_own_greedy_generation(smol_cpp):
    prompt = smol_cpp.tokenizer.prompt_tokens(PROMPT)
    native = []
    for tok in smol_cpp.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        native.append(tok)
        if len(native) == 24:
            break
    engine = smol_cpp.new_engine()
    engine.prefill(prompt)
    assert engine.draft(24).tokens == native
    # roll back into the middle and draft again: the cache resumes at the right position
    engine.truncate(len(prompt) + 10)
    assert engine.draft(14).tokens == native[10:24]


def test_speculative_with_a_llama_cpp_drafter_is_lossless():
    """smollm2 on llama.cpp drafting for smollm2 in torch: greedy output equals the target alone."""
    pytest.importorskip("llama_cpp")
    from tandem.local_runtime.models import load_model
    from tandem.remote_gateway.service import Gateway

    target = load_model("smollm2-135m", progress=False)
    gateway = Gateway(target)
    try:
        async def go():
            async with Client(drafter="smollm2-135m@llama.cpp", gateway=InProcessTransport(gateway), draft_len=4,
                              progress=False) as c:
                return await c.generate(PROMPT, max_new_tokens=32)

        rec = run(go())
        tok = load_tokenizer("smollm2-135m", progress=False)
        assert rec.tokens == list(generate_alone(target, tok.prompt_tokens(PROMPT), 32))
        assert rec.usage.acceptance_rate > 0.5  # the same weights, quantised differently
    finally:
        gateway.close()
