"""Speculative output is the target's: token for token under greedy, in distribution under sampling."""

from collections import Counter

import numpy as np
import pytest
import torch

from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client

from .conftest import assert_speculative_is_target, chi_square_pvalue, run, vocab8_model

PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4", "Once upon a time, in a land far away,"]


# (target, drafter): each architecture drafting for itself, int8 drafts, and across architectures
# (the tiny models share one byte tokenizer)
PAIRS = [
    ("tiny-llama", "tiny-llama:int8"), ("tiny-llama", "tiny-llama-b"), ("tiny-llama", "tiny-llama-c"),
    ("tiny-qwen2", "tiny-qwen2:int8"), ("tiny-qwen2", "tiny-qwen2-b"), ("tiny-llama", "tiny-qwen2-b"),
    ("tiny-llama:w8a8", "tiny-llama"), ("tiny-qwen2:w8a8", "tiny-qwen2-b"),  # the exact int8 target
]


@pytest.mark.parametrize("target_name,drafter", PAIRS)
@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_greedy_speculative_equals_target_alone(tiny_gateway_of, target_name, drafter, draft_len):
    assert_speculative_is_target(tiny_gateway_of(target_name), drafter, PROMPTS, 40, draft_len)


@pytest.mark.parametrize("target_name", ["tiny-llama", "tiny-qwen2"])
def test_int8_drafter_is_mostly_accepted(tiny_gateway_of, target_name):
    async def go():
        gateway = InProcessTransport(tiny_gateway_of(target_name))
        async with Client(drafter=f"{target_name}:int8", gateway=gateway, draft_len=4) as c:
            return await c.generate("The quick brown fox", max_new_tokens=40, chat=False)

    rec = run(go())
    assert rec.usage.acceptance_rate > 0.7
    assert len(rec.tokens) / rec.usage.rounds > 2.0


def test_sampled_speculative_reproduces_target_distribution():
    """Through the real engines, messages and gateway: the joint distribution of the first two
    tokens over 8x8 outcomes equals the target's exact one (chi-square)."""
    target, drafter = vocab8_model(0), vocab8_model(1)
    prompt = [1, 2, 3]
    temperature = 1.0
    with torch.inference_mode():
        p1 = torch.softmax(target.model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        joint = np.zeros((8, 8))
        for a in range(8):
            p2 = torch.softmax(target.model(input_ids=torch.tensor([prompt + [a]])).logits[0, -1].double(), -1)
            joint[a] = (p1[a] * p2).numpy()
    gateway = Gateway(target)

    async def go(n):
        counts = Counter()
        client = Client(drafter=drafter, gateway=InProcessTransport(gateway), draft_len=2, progress=False)
        for seed in range(n):
            rec = await client.generate("bcd", chat=False, max_new_tokens=3, temperature=temperature, seed=seed)
            counts[tuple(rec.tokens[:2])] += 1
        return counts

    N = 3000
    counts = run(go(N))
    observed = np.array([counts[(a, b)] for a in range(8) for b in range(8)], dtype=float)
    expected = joint.reshape(-1) * N
    # pool rare cells so the chi-square approximation holds
    pvalue = chi_square_pvalue(observed, expected)
    assert pvalue > 1e-3, pvalue
    gateway.close()


def test_sampled_speculative_is_reproducible_with_a_seed(tiny_gateway):
    async def go():
        async with Client(drafter="tiny-llama-b", gateway=InProcessTransport(tiny_gateway), draft_len=3) as c:
            a = await c.generate("Hello", max_new_tokens=20, chat=False, temperature=0.8, seed=7)
            b = await c.generate("Hello", max_new_tokens=20, chat=False, temperature=0.8, seed=7)
            return a.tokens, b.tokens

    a, b = run(go())
    assert a == b and len(a) == 20


def test_cloud_and_local_modes(tiny_gateway):
    target = tiny_gateway.lm

    async def go():
        async with Client(drafter="tiny-llama-b", gateway=InProcessTransport(tiny_gateway)) as c:
            return (
                await c.generate("Hi", mode="cloud", max_new_tokens=12, chat=False),
                await c.generate("Hi", mode="local", max_new_tokens=12, chat=False),
            )

    cloud, local = run(go())
    assert cloud.tokens == list(generate_alone(target, target.tokenizer.prompt_tokens("Hi", chat=False), 12))
    drafter = load_model("tiny-llama-b")
    assert local.tokens == list(generate_alone(drafter, drafter.tokenizer.prompt_tokens("Hi", chat=False), 12))
    assert cloud.usage.cloud_tokens == 12 and local.usage.local_tokens == 12
