"""A chat window in the terminal with tandem embedded (Textual): the SDK as an app embeds it.

    python samples/tui_chat.py [--drafter NAME] [--target NAME] [--gateway URL|inproc] [--mode MODE]

Answers stream in as they are accepted, each piece coloured by who produced it: green, drafted
on this device and accepted by the cloud; bold cyan, the cloud's own token; yellow, this device
alone. The gateway is reached through the project's link simulator, so ctrl+o drops the link the
way a lost network would: the answer goes on on the device (offline fallback) and speculation
rejoins once the link is back. With `--gateway inproc` (the default) a gateway for `--target`
runs in this process on a loopback port.

Keys: enter sends, ctrl+o cuts or restores the link, ctrl+t cycles the mode, ctrl+q quits.
Needs the `tui` extra (Textual).
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Footer, Header, Input, Static

from tandem.sdk import MODES, Client, GenerationRecord, TandemError
from tandem.sdk.bench.launch import serve_gateway
from tandem.sdk.bench.linksim import LinkProxy
from tandem.sdk.client import DEFAULT_DRAFTER, DEFAULT_TARGET
from tandem.sdk.usage import ORIGIN_NAMES, ORIGIN_STYLES


class Turn(Static):
    """One chat turn. An answer keeps its text as a rich `Text`, one styled span per piece."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(classes=role)
        self.text = Text(text)
        self.usage_line = ""

    def on_mount(self) -> None:
        self.update(self.text)

    def add(self, piece: str, origin: str) -> None:
        self.text.append(piece, style=ORIGIN_STYLES.get(origin, ""))
        self.update(self.text)

    def finish(self, line: str, style: str = "dim") -> None:
        self.usage_line = line
        self.update(Text.assemble(self.text, "\n", (line, style)))


def usage_line(rec: GenerationRecord) -> str:
    u, n = rec.usage, len(rec.tokens)
    parts = [rec.mode, f"{n} tokens", f"{u.wall_s:.1f} s"]
    if u.rounds and rec.mode != "cloud":
        parts.append(f"{u.rounds} rounds, {n / u.rounds:.1f} tokens each")
    if u.tested_tokens:
        parts.append(f"acceptance {u.acceptance_rate:.0%}")
    if u.fallbacks:
        parts.append(f"{u.fallbacks} fallback{'s' * (u.fallbacks > 1)} to the device")
    return " · ".join(parts)


class ChatApp(App):
    """The chat. `link` is the simulated network in front of the client's gateway (None: no
    link to cut, e.g. an https:// gateway)."""

    TITLE = "tandem chat"
    CSS = """
    #legend { padding: 0 1; color: $text-muted; }
    #log { padding: 0 1; }
    Turn { margin: 1 0 0 0; }
    Turn.user { color: $text; text-style: bold; }
    Turn.assistant { padding: 0 0 0 2; }
    #status { height: 1; padding: 0 1; background: $panel; }
    #status.offline { background: $warning 30%; }
    #status.cut { background: $error 30%; }
    """
    BINDINGS = [
        ("ctrl+o", "toggle_link", "Cut / restore the link"),
        ("ctrl+t", "next_mode", "Next mode"),
        ("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, client: Client, link: LinkProxy | None = None, *, mode: str = "speculative",
                 max_new_tokens: int = 256, target: str = "") -> None:
        super().__init__()
        self.client = client
        self.link = link
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.target = target
        self.answering = False
        self.fallbacks = 0  # of the answer being written

    def compose(self) -> ComposeResult:
        yield Header()
        legend = Text()
        for origin, name in ORIGIN_NAMES.items():
            legend.append(f"■ {name}   ", style=ORIGIN_STYLES[origin])
        yield Static(legend, id="legend")
        yield VerticalScroll(id="log")
        yield Static(id="status")
        yield Input(placeholder="Ask something; enter sends", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.client.drafter_name} drafts for {self.target or 'the gateway'}"
        self.show_status()
        self.query_one("#prompt", Input).focus()

    async def on_unmount(self) -> None:
        await self.client.aclose()

    # -- status and link -----------------------------------------------------------------------

    def show_status(self) -> None:
        status = self.query_one("#status", Static)
        cut = self.link is not None and self.link.down
        link = "no simulated link" if self.link is None else ("link CUT (ctrl+o restores)" if cut else "link up")
        alone = self.answering and self.fallbacks > 0
        state = "the device goes on alone" if alone else ("answering…" if self.answering else "ready")
        status.update(f"mode {self.mode} · {link} · {state}")
        status.set_class(cut, "cut")
        status.set_class(alone and not cut, "offline")

    def action_toggle_link(self) -> None:
        if self.link is None:
            self.notify("this gateway is not behind the link simulator", severity="warning")
            return
        if self.link.down:
            self.link.restore()
        else:
            self.link.outage(float("inf"))  # until restored
        self.show_status()

    def action_next_mode(self) -> None:
        self.mode = MODES[(MODES.index(self.mode) + 1) % len(MODES)]
        self.show_status()

    # -- chatting --------------------------------------------------------------------------------

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt or self.answering:
            return
        event.input.value = ""
        log = self.query_one("#log", VerticalScroll)
        answer = Turn("assistant")
        await log.mount(Turn("user", prompt), answer)
        self.answer(prompt, answer)

    @work(exclusive=True)
    async def answer(self, prompt: str, turn: Turn) -> None:
        """Stream one answer into `turn`. The SDK falls back to the device by itself when the
        gateway cannot be reached; the app only shows it."""
        log = self.query_one("#log", VerticalScroll)
        self.answering, self.fallbacks = True, 0
        self.show_status()
        gen = self.client.stream(prompt, mode=self.mode, max_new_tokens=self.max_new_tokens)
        try:
            async for piece in gen:
                turn.add(piece, piece.origin)
                if gen.usage.fallbacks != self.fallbacks:
                    self.fallbacks = gen.usage.fallbacks
                    self.show_status()
                log.scroll_end(animate=False)
            turn.finish(usage_line(gen.record))
        except TandemError as exc:
            turn.finish(f"error: {exc}", style="bold red")
        finally:
            self.answering = False
            self.show_status()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default=DEFAULT_DRAFTER, help="the device model")
    ap.add_argument("--target", default=DEFAULT_TARGET, help="the gateway's model (with --gateway inproc)")
    ap.add_argument("--gateway", default="inproc", help="'inproc' or a gateway's URL")
    ap.add_argument("--mode", default="speculative", choices=MODES)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()

    with ExitStack() as stack:
        if args.gateway == "inproc":
            print(f"starting a gateway for {args.target} on loopback ...", flush=True)
            url = stack.enter_context(serve_gateway(args.target))
        else:
            url = args.gateway
        try:
            link = stack.enter_context(LinkProxy.in_front_of(url))
        except ValueError:
            link = None  # https: no simulated link in between
        client = Client(drafter=args.drafter, gateway=link.url if link else url, timeout_s=30, retries=1, probe_timeout_s=1.0)
        print(f"loading {client.drafter_name} ...", flush=True)
        client.drafter  # noqa: B018 - load the device model before the window opens
        target = args.target if args.gateway == "inproc" else ""
        ChatApp(client, link, mode=args.mode, max_new_tokens=args.max_new_tokens, target=target).run()


if __name__ == "__main__":
    main()
