"""Mode predictions and the draft-length rule against exact answers."""

from dataclasses import replace

import pytest

from tandem.local_runtime.speculative import expected_tokens_per_round, optimal_draft_len
from tandem.sdk.auto import choose_mode, predict_cloud_passes_per_token, predict_s_per_token
from tandem.sdk.estimates import DraftLengthController, LinkEstimate


def test_optimal_draft_len_exact():
    # alpha 0.8, 10 ms a draft token, 100 ms a round: rates E(k)/(0.01k+0.1)
    rates = {k: expected_tokens_per_round(0.8, k) / (0.01 * k + 0.1) for k in range(1, 17)}
    assert optimal_draft_len(0.8, 0.01, 0.1, 16) == max(rates, key=rates.get)
    assert optimal_draft_len(0.0, 0.01, 0.1, 16) == 1  # nothing is ever accepted: draft the minimum
    assert optimal_draft_len(1.0, 0.01, 0.1, 16) == 16  # everything is accepted: draft the maximum


def test_longer_round_trips_ask_for_longer_drafts():
    ks = [optimal_draft_len(0.8, 0.01, rtt + 0.05, 32) for rtt in (0.0, 0.05, 0.15, 0.5)]
    assert ks == sorted(ks) and ks[-1] > ks[0]


def test_controller_follows_the_link():
    c = DraftLengthController(k_init=4, k_max=16)
    assert c.next_k() == 4  # nothing measured yet
    for _ in range(20):
        c.observe(k=6, accepted=5, draft_s=0.06, verify_s=0.02)  # ~83% acceptance, fast link
    fast = c.next_k()
    for _ in range(20):
        c.observe(k=6, accepted=5, draft_s=0.06, verify_s=0.5)  # the same, over a slow link
    slow = c.next_k()
    assert slow > fast
    assert 0.75 < c.estimate.alpha < 0.9


def test_predictions_exact():
    e = LinkEstimate(rtt_s=0.1, local_token_s=0.01, cloud_token_s=0.05, verify_s=0.06, prefill_s=0.0,
                  alpha=0.5, escalate_rate=0.25, draft_len=2)
    n = 100
    assert predict_s_per_token("local", e, n) == pytest.approx(0.01)
    assert predict_s_per_token("cloud", e, n) == pytest.approx(0.05 + 0.1 / 100)
    assert predict_s_per_token("speculative", e, n) == pytest.approx((0.02 + 0.06 + 0.1) / 1.75 + 0.1 / 100)
    assert predict_s_per_token("assist", e, n) == pytest.approx(0.01 + 0.25 * 0.15 + 0.1 / 100)
    assert predict_cloud_passes_per_token("speculative", e) == pytest.approx(1 / 1.75)


def test_choice_moves_with_rtt():
    base = dict(local_token_s=0.01, cloud_token_s=0.08, verify_s=0.09, prefill_s=0.0, alpha=0.8)
    near, _ = choose_mode(("cloud", "speculative"), LinkEstimate(rtt_s=0.005, **base))
    far, _ = choose_mode(("cloud", "speculative"), LinkEstimate(rtt_s=0.5, **base))
    assert (near, far) == ("speculative", "cloud")
    cheapest, _ = choose_mode(("cloud", "speculative", "local"), LinkEstimate(rtt_s=0.5, **base), objective="cost")
    assert cheapest == "local"
    with pytest.raises(ValueError):
        choose_mode((), LinkEstimate())


def test_auto_mode_decides_and_learns(tiny_gateway):
    from tandem.protocols.transport import InProcessTransport
    from tandem.sdk import Client

    from .conftest import run

    async def go():
        async with Client(drafter="tiny-llama:int8", gateway=InProcessTransport(tiny_gateway)) as c:
            first = await c.generate("Hello", mode="auto", max_new_tokens=16, chat=False)
            for mode in ("cloud", "speculative"):
                await c.generate("Hello", mode=mode, max_new_tokens=16, chat=False)
            second = await c.generate("Hello", mode="auto", max_new_tokens=16, chat=False)
            return first, second, c.estimate

    first, second, est = run(go())
    for rec in (first, second):
        assert rec.mode in ("cloud", "speculative")
        assert set(rec.decision["predicted"]) == {"cloud", "speculative"}
    assert est.rtt_s < 0.05 and est.alpha > 0.5  # measured in-process: no network, a good drafter


def test_cloud_steps_are_measured_apart_from_the_prefill(tiny_gateway):
    """A cloud stream's per-token estimate counts the decode steps after the first piece; the
    time to it (the prompt's prefill) goes to the prefill estimate instead of being spread over
    the tokens, which made long prompts look like a slow cloud."""
    import asyncio

    from tandem.protocols.transport import InProcessTransport
    from tandem.sdk import Client

    from .conftest import run

    class SlowPrefill(InProcessTransport):
        async def stream(self, msg):
            await asyncio.sleep(0.5)  # as if the gateway prefilled a long prompt
            async for chunk in super().stream(msg):
                yield chunk

    async def go():
        async with Client(drafter="tiny-llama:int8", gateway=SlowPrefill(tiny_gateway)) as c:
            rec = await c.generate("Hello", mode="cloud", max_new_tokens=12, chat=False)
            return rec, c.estimate

    rec, est = run(go())
    assert rec.first_piece_s is not None and 0.5 <= rec.first_piece_s <= rec.usage.wall_s
    assert 0 < rec.first_piece_tokens < len(rec.tokens)
    decode = (rec.usage.wall_s - rec.first_piece_s) / (len(rec.tokens) - rec.first_piece_tokens)
    assert est.cloud_token_s == pytest.approx(0.5 * LinkEstimate().cloud_token_s + 0.5 * decode)
    assert est.prefill_s > 0.5 * LinkEstimate().prefill_s + 0.2


def test_auto_mode_offline_runs_locally():
    from tandem.sdk import Client

    from .conftest import run

    async def go():
        async with Client(drafter="tiny-llama", gateway="http://127.0.0.1:9", probe_timeout_s=0.5) as c:
            return await c.generate("Hello", mode="auto", max_new_tokens=8, chat=False)

    rec = run(go())
    assert rec.mode == "local" and rec.usage.fallbacks == 1 and len(rec.tokens) == 8


def test_auto_follows_a_policy_file(tiny_gateway, tmp_path):
    from tandem.protocols.transport import InProcessTransport
    from tandem.sdk import Client

    from .conftest import run

    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\n"
        "defaults: {mode: speculative, draft_len: 3}\n"
        "rules:\n"
        "  - name: private-stays-home\n"
        "    when: {tags_any: [privacy]}\n"
        "    mode: local\n"
        "  - name: ask-when-unsure\n"
        "    when: {tags_any: [cheap]}\n"
        "    mode: assist\n"
        "    token_router: {name: confidence, threshold: 0.2}\n"
    )

    async def go():
        async with Client(drafter="tiny-llama:int8", gateway=InProcessTransport(tiny_gateway), policy=policy) as c:
            return [await c.generate("Hello", mode="auto", max_new_tokens=10, chat=False, tags=t)
                    for t in ({"privacy"}, {"cheap"}, set())]

    private, cheap, plain = run(go())
    assert private.mode == "local" and private.usage.rounds == 0
    assert private.decision["policy"]["rule"] == "private-stays-home"
    assert cheap.mode == "assist" and cheap.decision["token_router"] == "confidence" and cheap.decision["threshold"] == 0.2
    assert plain.mode == "speculative" and plain.decision["policy"]["draft_len"] == 3


def test_policy_auto_uses_the_objective(tiny_gateway, tmp_path):
    from tandem.protocols.transport import InProcessTransport
    from tandem.sdk import Client

    from .conftest import run

    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\n"
        "defaults: {mode: auto}\n"
        "objective: {kind: cost, modes: [cloud, speculative, assist]}\n"
    )

    async def go():
        async with Client(drafter="tiny-llama:int8", gateway=InProcessTransport(tiny_gateway), policy=policy) as c:
            return await c.generate("Hello", mode="auto", max_new_tokens=10, chat=False)

    rec = run(go())
    assert rec.decision["objective"] == "cost"
    assert set(rec.decision["predicted"]) == {"cloud", "speculative", "assist"}
    passes = {m: p["cloud_passes_per_token"] for m, p in rec.decision["predicted"].items()}
    assert rec.mode == min(passes, key=passes.get)


def test_break_even_rtt_is_where_the_predictions_cross():
    from tandem.sdk.auto import break_even_rtt_s

    e = LinkEstimate(local_token_s=0.01, cloud_token_s=0.08, verify_s=0.09, alpha=0.8, prefill_s=0.0)
    rtt = break_even_rtt_s(e)
    assert rtt is not None and 0 < rtt < 2.0
    below, above = replace(e, rtt_s=rtt * 0.9), replace(e, rtt_s=rtt * 1.1)
    assert predict_s_per_token("speculative", below) < predict_s_per_token("cloud", below)
    assert predict_s_per_token("speculative", above) > predict_s_per_token("cloud", above)
    # a drafter as slow as the target never wins; a free, perfect drafter still wins at 2 s
    assert break_even_rtt_s(replace(e, local_token_s=0.08, alpha=0.3)) == 0.0
    assert break_even_rtt_s(replace(e, local_token_s=0.0, alpha=0.999, verify_s=0.08), max_rtt_s=0.01) is None
