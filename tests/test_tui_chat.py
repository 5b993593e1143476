"""The Textual chat sample (samples/tui_chat.py), driven by Textual's own test pilot: answers
stream in coloured by origin, and with the link cut the device answers alone."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tandem.sdk import Client
from tandem.sdk.bench.linksim import LinkProxy
from tandem.sdk.usage import ORIGIN_STYLES

from .conftest import run

pytest.importorskip("textual", reason="the chat sample needs the tui extra (Textual)")

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "tui_chat.py"


def load_sample():
    spec = importlib.util.spec_from_file_location("tui_chat", SAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tui_chat", module)
    spec.loader.exec_module(module)
    return module


def origins(turn) -> set[str]:
    """The origins of the styled spans in an answer."""
    by_style = {style: origin for origin, style in ORIGIN_STYLES.items()}
    return {by_style[str(span.style)] for span in turn.text.spans}


async def ask(app, pilot, prompt: str):
    from textual.widgets import Input

    app.query_one("#prompt", Input).value = prompt
    await pilot.press("enter")
    await pilot.pause()
    return app.query("Turn.assistant").last()


def test_the_chat_streams_coloured_answers_and_falls_back_offline(words_pair, words_server):
    sample = load_sample()
    _, drafter = words_pair

    async def go():
        with LinkProxy.in_front_of(words_server) as link:
            client = Client(drafter=drafter, gateway=link.url, timeout_s=10, retries=1, probe_timeout_s=0.5,
                            rejoin_every=8, progress=False)
            app = sample.ChatApp(client, link, max_new_tokens=60, target="tiny-words")
            async with app.run_test(size=(110, 40)) as pilot:
                # online: a speculative answer, drafts accepted and the cloud's own tokens
                turn = await ask(app, pilot, "tell me about the sea")
                await app.workers.wait_for_complete()
                assert origins(turn) == {"accepted", "cloud"}
                assert len(turn.text.plain) > 0 and "speculative · 60 tokens" in turn.usage_line
                assert "link up" in str(app.query_one("#status").render())

                # cut mid-answer: what is left comes from the device alone, nothing is lost
                link.set(delay_ms=30)
                turn = await ask(app, pilot, "and the hills")
                for _ in range(1000):  # a few verify rounds in, then the cut
                    if len(turn.text.spans) >= 3:
                        break
                    await pilot.pause(0.02)
                await pilot.press("ctrl+o")
                assert link.down and "link CUT" in str(app.query_one("#status").render())
                await app.workers.wait_for_complete()
                assert {"accepted", "local"} <= origins(turn)
                assert "60 tokens" in turn.usage_line and "1 fallback to the device" in turn.usage_line

                # offline from the start: the device answers alone
                turn = await ask(app, pilot, "still there?")
                await app.workers.wait_for_complete()
                assert origins(turn) == {"local"} and "1 fallback" in turn.usage_line

                # restored: speculation again
                await pilot.press("ctrl+o")
                link.set(delay_ms=0)
                assert not link.down
                turn = await ask(app, pilot, "welcome back")
                await app.workers.wait_for_complete()
                assert "accepted" in origins(turn) and "fallback" not in turn.usage_line

                await pilot.press("ctrl+t")  # the next mode, and the status says so
                assert app.mode == "assist" and "mode assist" in str(app.query_one("#status").render())

    run(go())
