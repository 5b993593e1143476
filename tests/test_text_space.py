"""Speculation across tokenizers: the device drafts text, the gateway verifies it in its own tokens.

Fast tests pair tiny models with two different toy tokenizers; the slow ones use the real
SmolLM2 and Gemma 3 tokenizers (on tiny random weights, so their output runs through every kind
of token: words, pieces, CJK, byte fallback) and then the real models.
"""

import pytest

from tandem.local_runtime.engine import Engine
from tandem.local_runtime.models import LoadedModel, Tokenizer, load_model, tiny_llama
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import TokenizerMismatchError
from tandem.protocols.messages import CloseSession, OpenSession, VerifyTextRequest
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client

from .conftest import run

BIGRAMS = ["th", "he", "in", "er", "an", " t", " a", "e ", "s ", "on", "re", "at", "en", "nd", " w", "or"]


def pair_tokenizer() -> Tokenizer:
    """Bytes plus a few bigrams, longest match first: boundaries unlike the byte tokenizer's."""
    pieces = [bytes([i]) for i in range(256)] + [b.encode() for b in BIGRAMS]
    index = {p: i for i, p in enumerate(pieces)}
    bos, eos = len(pieces), len(pieces) + 1

    def encode(text: str) -> list[int]:
        data, out, i = text.encode("utf-8"), [], 0
        while i < len(data):
            if data[i : i + 2] in index and len(data[i : i + 2]) == 2:
                out.append(index[data[i : i + 2]])
                i += 2
            else:
                out.append(data[i])
                i += 1
        return out

    def decode(ids) -> str:
        return b"".join(pieces[i] for i in ids if i < len(pieces)).decode("utf-8", errors="replace")

    vocab = {f"<{p.hex()}>": i for p, i in index.items()} | {"<bos>": bos, "<eos>": eos}
    return Tokenizer(encode=encode, decode=decode, vocab=vocab, eos_token_ids=[eos], bos_token_id=bos, special_ids=frozenset({bos, eos}))


@pytest.fixture(scope="module")
def pair_drafter() -> LoadedModel:
    tok = pair_tokenizer()
    return LoadedModel("tiny-pair", tiny_llama(5, 64, 2, 4, len(tok.vocab)), tok, "random init")


def reference(target: LoadedModel, prompt: str, n: int) -> tuple[list[int], str]:
    ids = list(generate_alone(target, target.tokenizer.prompt_tokens(prompt, chat=False), n))
    return ids, target.tokenizer.text(ids)


async def _text_session(gateway, prompt, n, drafts):
    """Open a text session and send the given draft texts in turn, each right after what is
    committed; returns the committed text and the target ids."""
    t = InProcessTransport(gateway)
    opened = await t.request(OpenSession(prompt_text=prompt, max_new_tokens=n))
    assert opened.text_space and opened.position == 0
    committed, ids = "", []
    accepted = 0
    for make in drafts:
        r = await t.request(
            VerifyTextRequest(session_id=opened.session_id, position=len(ids), text_offset=len(committed), draft_text=make(committed))
        )
        committed += r.text
        ids += r.tokens
        accepted += r.accepted
        if r.finished:
            break
    _text_session.accepted = accepted
    return committed, ids


def _oracle(full: str, cut: int):
    """A drafter that knows the target's text and proposes the next `cut` characters of it."""
    return lambda committed: full[len(committed) : len(committed) + cut]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8, 13])
def test_gateway_accepts_oracle_drafts_cut_anywhere(text_gateway, cut):
    target = text_gateway.lm
    ids, text = reference(target, "Hello there", 30)
    assert text.isprintable() and len(text) >= 10
    committed, got = run(_text_session(text_gateway, "Hello there", 30, [_oracle(text, cut)] * 60))
    assert got == ids
    assert committed == text
    # the target tokenises the oracle's text as it generated it: most drafts are accepted
    assert _text_session.accepted >= 0.5 * len(ids) * cut / (cut + 1)


def test_wrong_drafts_still_give_the_target_text(text_gateway):
    ids, text = reference(text_gateway.lm, "Hi", 20)
    committed, got = run(_text_session(text_gateway, "Hi", 20, [lambda c: "zzzz qqq"] * 40))
    assert got == ids and committed == text


def test_text_position_is_checked(tiny_gateway):
    async def go():
        t = InProcessTransport(tiny_gateway)
        opened = await t.request(OpenSession(prompt_text="Hi", max_new_tokens=8))
        from tandem.protocols.errors import WrongPositionError

        with pytest.raises(WrongPositionError):
            await t.request(VerifyTextRequest(session_id=opened.session_id, position=0, text_offset=3, draft_text="x"))
        with pytest.raises(WrongPositionError):
            await t.request(VerifyTextRequest(session_id=opened.session_id, position=2, text_offset=0, draft_text="x"))
        await t.request(CloseSession(session_id=opened.session_id))

    run(go())


@pytest.mark.parametrize("draft_len", [1, 4, 7])
@pytest.mark.parametrize("gateway", ["tiny_gateway", "text_gateway"])
def test_client_across_toy_tokenizers_equals_target_alone(request, gateway, pair_drafter, draft_len):
    gateway = request.getfixturevalue(gateway)
    target = gateway.lm
    prompts = ["The weather in the north", "and then", "1234"]

    async def go():
        async with Client(drafter=pair_drafter, gateway=InProcessTransport(gateway), draft_len=draft_len) as c:
            return [await c.generate(p, max_new_tokens=40, chat=False) for p in prompts]

    for p, rec in zip(prompts, run(go())):
        ids, text = reference(target, p, 40)
        assert rec.tokens == ids
        assert rec.text == text


def test_sampling_across_tokenizers_is_refused_clearly(tiny_gateway, pair_drafter):
    async def go():
        async with Client(drafter=pair_drafter, gateway=InProcessTransport(tiny_gateway)) as c:
            await c.generate("x", temperature=0.7, chat=False)

    with pytest.raises(TokenizerMismatchError, match="temperature 0"):
        run(go())


@pytest.fixture(scope="module")
def smol():
    return load_model("tiny-llama@smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def gemma_gateway():
    gw = Gateway(load_model("tiny-llama-b@gemma3-270m", progress=False))
    yield gw
    gw.close()


@pytest.mark.slow
class TestRealTokenizers:
    """Boundary cases with the real SmolLM2 (byte-level BPE) and Gemma 3 (SentencePiece with
    byte fallback) tokenizers."""

    @pytest.mark.parametrize(
        "committed, proposed_text, expect_kept",
        [
            (" world!", " world", " world"),  # draft ends on a word boundary the target kept
            (" wo", " world", ""),  # target cut our last token short: roll back before it
            (" worldly", " world", " world"),  # target went on inside the word
            ("🙂 hi", "🙂", "🙂"),  # a character of two tokens, accepted whole
            ("日本語です", "日本語", "日本語"),  # multi-byte characters split over byte tokens
            ("a  b", "a  b", "a  b"),  # runs of spaces
        ],
    )
    def test_drafterresync(self, smol, committed, proposed_text, expect_kept):
        from tandem.sdk.runs.text import resync

        tok = smol.tokenizer
        engine = Engine(smol)
        base = tok.prompt_tokens("prompt", chat=False)
        proposed = tok.encode(proposed_text)
        engine.append(base + proposed)
        gen = resync(tok, engine, len(base), [], proposed, committed)
        assert tok.decode(gen) == committed
        assert engine.tokens == base + gen
        kept = next(j for j in range(len(proposed), -1, -1) if gen[:j] == proposed[:j])
        assert tok.decode(proposed[:kept]) == expect_kept

    def test_gemma_gateway_oracle_drafts_every_cut(self, gemma_gateway):
        ids, text = reference(gemma_gateway.lm, "Translate: the cat", 40)
        for cut in (1, 2, 3, 4, 6, 9):
            committed, got = run(_text_session(gemma_gateway, "Translate: the cat", 40, [_oracle(text, cut)] * 80))
            assert got == ids and committed == text, cut
            assert _text_session.accepted > 0, cut

    def test_gemma_gateway_drafts_with_odd_characters(self, gemma_gateway):
        """Drafts full of multi-byte characters, special-token strings and odd whitespace are
        judged, never trusted: the text is the target's."""
        ids, text = reference(gemma_gateway.lm, "Hi", 24)
        drafts = ["日本語", "<end_of_turn>", "  \n\t ", "🙂🙂", "é", "<start_of_turn>model\n"]
        committed, got = run(_text_session(gemma_gateway, "Hi", 24, [lambda c, d=d: d for d in drafts * 10]))
        assert got == ids and committed == text

    def test_smol_drafts_for_gemma_target_losslessly(self, smol, gemma_gateway):
        async def go():
            async with Client(drafter=smol, gateway=InProcessTransport(gemma_gateway), draft_len=4) as c:
                return [await c.generate(p, max_new_tokens=32, chat=True) for p in ("Hello", "Count: 1 2 3")]

        target = gemma_gateway.lm
        for p, rec in zip(("Hello", "Count: 1 2 3"), run(go())):
            ids = list(generate_alone(target, target.tokenizer.prompt_tokens(p, chat=True), 32))
            assert rec.tokens == ids
            assert rec.text == target.tokenizer.text(ids)


def test_a_constraint_across_tokenizers_holds_the_target(text_gateway, pair_drafter):
    """Text-space pairs: only the target is constrained; the output is cloud mode's under the
    same grammar, and follows it."""
    from tandem.protocols.messages import Constraint

    constraint = Constraint(kind="regex", source="(the|a) [a-z ]{2,30}\\.")

    async def go():
        async with Client(drafter=pair_drafter, gateway=InProcessTransport(text_gateway), draft_len=4) as c:
            return [await c.generate("The weather", mode=m, max_new_tokens=40, chat=False, constraint=constraint)
                    for m in ("cloud", "speculative")]

    cloud, spec = run(go())
    import re

    assert spec.text == cloud.text and re.fullmatch("(the|a) [a-z ]{2,30}\\.", spec.text), spec.text
