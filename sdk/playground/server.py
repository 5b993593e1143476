"""The playground's web app (FastAPI): the page, one generation at a time as server-sent events,
and the controls of the simulated link between the client and the gateway.

    GET  /                 the page (static/index.html; static/ holds its CSS and JS)
    GET  /api/state        models, gateway, modes, origin names, link settings, defaults
    POST /api/generate     GenerateForm -> text/event-stream of events (events.py)
    POST /api/link         {rtt_ms, jitter_ms, loss} -> link state
    POST /api/link/cut     drop the link until restored: open connections reset, new ones refused
    POST /api/link/restore bring it back

    browser ──HTTP──> playground (Client) ──> LinkProxy (delay, jitter, loss, cut) ──> gateway

The link is the project's link simulator (`sdk/bench/linksim.py`) sitting in front of the
gateway, so cutting it is what a dropped network does to the SDK: the in-flight request fails,
the device goes on alone (`usage.fallbacks`), and speculation rejoins once the link is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...protocols.errors import TandemError
from ..bench.linksim import LinkProxy
from ..client import MODES, Client, Mode
from ..usage import ORIGIN_NAMES
from .events import Event, generation_events

if TYPE_CHECKING:
    from fastapi import FastAPI

STATIC = Path(__file__).with_name("static")


class GenerateForm(BaseModel):
    """What the page asks for: the arguments of `Client.stream`, and the policy file for auto."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=20_000)
    mode: Mode = "speculative"
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=0)
    chat: bool = True
    draft_len: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field("auto", description="tokens drafted per round, or 'auto'")
    policy: str = Field("", description="a routing policy file for mode auto ('' for none: the cost model decides)")
    tags: list[str] = Field(default_factory=list, max_length=16, description="what the request is, to the policy")


class LinkForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rtt_ms: float | None = Field(None, ge=0, le=5000)
    jitter_ms: float | None = Field(None, ge=0, le=5000)
    loss: float | None = Field(None, ge=0, le=0.5, description="probability that a chunk resets its connection")


class _PageError(Exception):
    """What the page asked for cannot be done; answered as {"error": message} with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Defaults:
    mode: str = "speculative"
    max_new_tokens: int = 128
    temperature: float = 0.0
    prompt: str = "Explain in a few sentences why the sky is blue."


class Playground:
    """What the page drives: one `Client`, the simulated link in front of its gateway (None when
    the gateway cannot sit behind one, e.g. https), and one generation at a time.

    `gateway` and `target` are labels for the page; `policy` is the file offered for mode auto."""

    def __init__(
        self,
        client: Client,
        link: LinkProxy | None,
        *,
        gateway: str,
        target: str | None = None,
        policy: str | Path | None = None,
        defaults: Defaults | None = None,
    ) -> None:
        self.client = client
        self.link = link
        self.gateway = gateway
        self.target = target
        self.policy = str(policy) if policy else ""
        self.defaults = defaults or Defaults()
        self._busy = asyncio.Lock()
        self._policies: dict[tuple[str, float], Any] = {}
        # the rate of the last finished cloud-mode run on this gateway (tokens/s, None before one):
        # the usage panel shows it beside every other mode's, the baseline a hybrid run must beat
        self.cloud_tokens_per_s: float | None = None

    # -- state and link ---------------------------------------------------------------------------

    async def state(self) -> dict[str, Any]:
        if self.target is None:
            try:
                self.target = (await asyncio.wait_for(self.client.transport.info(), 2.0)).model
            except (TandemError, asyncio.TimeoutError):
                pass  # unreachable for now: the page shows the gateway, and asks again next time
        return {
            "drafter": self.client.drafter_name,
            "target": self.target,
            "gateway": self.gateway,
            "modes": list(MODES),
            "origins": ORIGIN_NAMES,
            "policy": self.policy,
            "busy": self._busy.locked(),
            "link": self.link_state(),
            "defaults": vars(self.defaults),
            "cloud_tokens_per_s": self.cloud_tokens_per_s,
        }

    def link_state(self) -> dict[str, Any]:
        if self.link is None:
            return {"simulated": False}
        c = self.link.config
        return {"simulated": True, "rtt_ms": 2 * c.delay_ms, "jitter_ms": c.jitter_ms, "loss": c.loss, "down": self.link.down}

    def _need_link(self) -> LinkProxy:
        if self.link is None:
            raise _PageError(f"the gateway ({self.gateway}) is not behind the link simulator (only http:// gateways can be)", 409)
        return self.link

    def set_link(self, form: LinkForm) -> dict[str, Any]:
        link = self._need_link()
        changes = {"delay_ms": None if form.rtt_ms is None else form.rtt_ms / 2, "jitter_ms": form.jitter_ms, "loss": form.loss}
        link.set(**{k: v for k, v in changes.items() if v is not None})
        return self.link_state()

    def cut(self) -> dict[str, Any]:
        self._need_link().outage(float("inf"))
        return self.link_state()

    def restore(self) -> dict[str, Any]:
        self._need_link().restore()
        return self.link_state()

    # -- generation -------------------------------------------------------------------------------

    def _load_policy(self, path: str) -> Any:
        """The policy in `path` (None for ''), loaded again whenever the file changes."""
        if not path.strip():
            return None
        from ...routing.policy_files import load_policy

        file = Path(path).expanduser()
        if not file.is_file():
            raise _PageError(f"policy file not found: {path}")
        key = (str(file.resolve()), file.stat().st_mtime)
        if key not in self._policies:
            try:
                self._policies[key] = load_policy(file)
            except (TandemError, ValueError) as exc:
                raise _PageError(f"policy {path}: {exc}") from exc
        return self._policies[key]

    def generate(self, form: GenerateForm) -> AsyncIterator[Event]:
        """One generation's events; refused (409) while another one runs. (Two
        requests racing past the check run one after the other: the lock is taken by the stream.)"""
        if self._busy.locked():
            raise _PageError("a generation is already running: stop it first", 409)
        policy = self._load_policy(form.policy) if form.mode == "auto" else None
        return self._events(form, policy)

    async def _events(self, form: GenerateForm, policy: Any) -> AsyncIterator[Event]:
        async with self._busy:
            if form.mode == "auto":
                self.client.policy = policy
            gen = self.client.stream(
                form.prompt, mode=form.mode, max_new_tokens=form.max_new_tokens, temperature=form.temperature,
                seed=form.seed, chat=form.chat, draft_len=form.draft_len, tags=frozenset(form.tags),
            )
            events = generation_events(gen, estimate=self.client.estimate.to_dict, transport=self.client.transport)
            async for event in events:
                usage = {"usage": event.data, "done": event.data.get("usage")}.get(event.name)
                if usage is not None:
                    self._with_cloud_rate(event, usage)
                yield event

    def _with_cloud_rate(self, event: Event, usage: dict[str, Any]) -> None:
        """Remember a finished cloud run's rate; give every usage summary the last one known."""
        if event.name == "done" and usage.get("mode") == "cloud" and event.data.get("finish_reason") is not None:
            if usage.get("tokens") and usage.get("tokens_per_s"):
                self.cloud_tokens_per_s = usage["tokens_per_s"]
        usage["cloud_tokens_per_s"] = self.cloud_tokens_per_s

    async def aclose(self) -> None:
        await self.client.aclose()


def create_app(playground: Playground) -> "FastAPI":
    """The web app for `playground` (FastAPI, from the `gateway` extra)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await playground.aclose()

    app = FastAPI(title="tandem playground", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.playground = playground
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(_PageError)
    async def on_error(request: Request, exc: _PageError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = lambda e: ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"  # noqa: E731
        return JSONResponse({"error": "; ".join(f"{where(e)}: {e.get('msg')}" for e in exc.errors()[:5])}, status_code=400)

    # the Response classes are imported here, so the routes that return them name no response model
    @app.get("/", include_in_schema=False, response_model=None)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/api/state")
    async def state() -> dict:
        return await playground.state()

    @app.post("/api/generate", response_model=None)
    async def generate(form: GenerateForm) -> StreamingResponse:
        events = playground.generate(form)

        async def body() -> AsyncIterator[str]:
            async for event in events:
                yield event.sse()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/api/link")
    async def link(form: LinkForm) -> dict:
        return playground.set_link(form)

    @app.post("/api/link/cut")
    async def cut() -> dict:
        return playground.cut()

    @app.post("/api/link/restore")
    async def restore() -> dict:
        return playground.restore()

    return app


__all__ = ["Playground", "GenerateForm", "LinkForm", "Defaults", "create_app", "STATIC"]
