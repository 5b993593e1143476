from __future__ import annotations

import asyncio

import pytest
import torch

torch.set_num_threads(2)


def serve_in_thread(app):
    """A real uvicorn server on 127.0.0.1 (a free port), in a background thread; yields its URL
    (a gateway app with its edge limits, as `tandem gateway serve` runs it)."""
    from tandem.sdk.bench.launch import serving

    return serving(app)


@pytest.fixture(scope="session")
def tiny_target():
    from tandem.local_runtime.models import load_model

    return load_model("tiny-llama", progress=False)


@pytest.fixture(scope="session")
def tiny_gateway(tiny_target):
    from tandem.remote_gateway.service import Gateway

    gw = Gateway(tiny_target)
    yield gw
    gw.close()


@pytest.fixture(scope="session")
def tiny_gateway_of(tiny_gateway):
    """name -> a session-wide gateway serving that tiny model (`tiny_gateway` for tiny-llama)."""
    from tandem.local_runtime.models import load_model
    from tandem.remote_gateway.service import Gateway

    gateways = {"tiny-llama": tiny_gateway}

    def get(name: str) -> Gateway:
        if name not in gateways:
            gateways[name] = Gateway(load_model(name, progress=False))
        return gateways[name]

    yield get
    for name, gw in gateways.items():
        if gw is not tiny_gateway:
            gw.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_gateway):
    from tandem.remote_gateway.app import create_app

    with serve_in_thread(create_app(tiny_gateway)) as url:
        yield url


def assert_speculative_is_target(gateway, drafter, prompts, max_new_tokens: int, draft_len: int, label=None) -> None:
    """Greedy speculative decoding over an in-process gateway gives, for every prompt, exactly
    the tokens of the gateway's model decoding alone, and every token is either an accepted
    draft or the cloud's own; the usage counts the rounds it lists."""
    from tandem.local_runtime.sequence import generate_alone
    from tandem.protocols.transport import InProcessTransport
    from tandem.sdk import Client

    target = gateway.lm

    async def go():
        async with Client(drafter=drafter, gateway=InProcessTransport(gateway), draft_len=draft_len) as c:
            return [await c.generate(p, max_new_tokens=max_new_tokens, chat=False) for p in prompts]

    for prompt, rec in zip(prompts, run(go())):
        reference = list(generate_alone(target, target.tokenizer.prompt_tokens(prompt, chat=False), max_new_tokens))
        assert rec.tokens == reference, (label, prompt)
        assert rec.usage.accepted_tokens + rec.usage.cloud_tokens == len(rec.tokens)
        assert rec.usage.rounds == len(rec.rounds)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def text_gateway():
    """A tiny byte-level target that only ever writes printable ASCII, so its output is text a
    drafter can propose (a random model would mostly emit bytes that are not valid UTF-8)."""
    from tandem.local_runtime.models import LoadedModel, load_model, tiny_llama
    from tandem.remote_gateway.service import Gateway

    lm = load_model("tiny-llama", progress=False)
    model = tiny_llama(0, 64, 2, 4, 320)
    head = torch.nn.Linear(64, 320, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(-1e4)
        head.bias[32:127] = 0.0
        head.bias[257] = -3.0  # end of sequence: possible, not likely
    model.lm_head = head
    gw = Gateway(LoadedModel("tiny-printable", model, lm.tokenizer, "random init"))
    yield gw
    gw.close()


# A tiny pair that writes readable text: lowercase letters, spaces and a little punctuation,
# never an end of sequence (so a generation runs to its budget). The drafter is the target with
# a little noise in its weights: it agrees with the target on most tokens, not all, so one
# speculative answer has accepted drafts, the cloud's corrections and bonus tokens.
WORDS_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"


def words_model(name: str, noise: float = 0.0, noise_seed: int = 5):
    from tandem.local_runtime.models import LoadedModel, byte_tokenizer, tiny_llama

    model = tiny_llama(0, 64, 2, 4, 320)
    head = torch.nn.Linear(64, 320, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(-1e4)
        for c in WORDS_ALPHABET:
            head.bias[ord(c)] = 0.0
        head.bias[ord(" ")] = 1.5  # words of a few letters
        model.lm_head = head
        if noise:
            g = torch.Generator().manual_seed(noise_seed)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return LoadedModel(name, model, byte_tokenizer(320), "random init (lowercase words)")


@pytest.fixture(scope="session")
def words_pair():
    """(target, drafter): the tiny readable-text pair above (same tokenizer: token speculation)."""
    return words_model("tiny-words"), words_model("tiny-words-drafter", noise=0.01)


@pytest.fixture(scope="session")
def words_server(words_pair):
    """A gateway serving the readable-text target over HTTP on loopback."""
    from tandem.remote_gateway.app import create_app
    from tandem.remote_gateway.service import Gateway

    gw = Gateway(words_pair[0])
    with serve_in_thread(create_app(gw)) as url:
        yield url
    gw.close()


def vocab8_model(seed: int):
    """A tiny random model over an 8-token vocabulary (letters a..h, no end of sequence): small
    enough to compare a sampled distribution with the exact one."""
    from tandem.local_runtime.models import LoadedModel, Tokenizer, tiny_llama

    tok = Tokenizer(
        encode=lambda s: [ord(c) - 97 for c in s],
        decode=lambda ids: "".join(chr(97 + i) for i in ids),
        vocab={chr(97 + i): i for i in range(8)},
        eos_token_ids=[],
    )
    model = tiny_llama(seed, hidden=32, layers=1, heads=2, vocab=8, init_range=0.6)
    return LoadedModel(name=f"vocab8-{seed}", model=model, tokenizer=tok, source="random init")


def chi_square_pvalue(observed, expected) -> float:
    """Pearson's test of observed counts against expected ones, with cells expected under 5
    pooled (so the chi-square approximation holds) and impossible cells left out."""
    import numpy as np
    from scipy import stats

    observed, expected = np.asarray(observed, dtype=float), np.asarray(expected, dtype=float)
    keep, rare = expected >= 5, (expected < 5) & (expected > 0)
    obs = np.append(observed[keep], observed[rare].sum())
    exp = np.append(expected[keep], expected[rare].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum())[1])
