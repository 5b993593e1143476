"""What apps embed: `Client` (async) and `SyncClient` (a thin blocking wrapper).

    async with Client(drafter="smollm2-135m:int8", gateway="http://127.0.0.1:8000") as client:
        gen = client.stream("Why is the sky blue?", max_new_tokens=64)
        async for text in gen:
            print(text, end="", flush=True)
        print(gen.usage)

Modes:
    local        the device model alone
    cloud        the gateway's model alone, streamed (the baseline)
    speculative  the device drafts k tokens, the gateway verifies them in one forward pass;
                 lossless: greedy output equals the target's, sampled output has its distribution
    assist       the device writes; a token router asks the cloud for the tokens it is unsure of
    auto         one of these per query, by the policy's rules or the predicted cost (auto.py)

The client owns the resources (the transport, the device model, one link estimate) and the
choice of mode; each generation is a run of `sdk/runs/` over `RunOptions` and a `GatewayLink`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..local_runtime.models import DEFAULT_DRAFTER, DEFAULT_TARGET
from ..protocols.errors import TandemError
from ..protocols.messages import Constraint, SamplingParams
from ..protocols.operations import GatewayHandler
from ..protocols.transport import InProcessTransport, Transport
from .auto import choose_mode
from .estimates import LinkEstimate
from .structured import LOCAL_ONLY_TAG, Structure
from .runs import (
    AssistRun,
    DeviceModel,
    GatewayLink,
    RunOptions,
    TextSpeculation,
    TokenSpeculation,
    run_cloud,
    run_local,
)
from .generation import Generation
from .usage import GenerationRecord

if TYPE_CHECKING:
    from ..local_runtime.models import LoadedModel
    from ..routing.policy import Policy

Mode = Literal["local", "cloud", "speculative", "assist", "auto"]
MODES: tuple[str, ...] = ("local", "cloud", "speculative", "assist", "auto")



class Client:
    def __init__(
        self,
        *,
        drafter: "str | LoadedModel | None" = DEFAULT_DRAFTER,
        drafter_backend: str | None = None,
        gateway: str | Transport | GatewayHandler = "inproc",
        target: str | None = None,
        mode: Mode = "speculative",
        draft_len: int | Literal["auto"] = "auto",
        max_draft_len: int = 16,
        timeout_s: float = 120.0,
        retries: int = 2,
        fallback: Literal["local", "error"] = "local",
        rejoin_every: int = 16,
        probe_timeout_s: float = 2.0,
        pipeline: bool | None = None,
        auto_modes: tuple[str, ...] = ("cloud", "speculative"),
        objective: Literal["latency", "cost", "weighted"] = "latency",
        cost_weight: float = 0.0,
        token_router: str = "confidence",
        assist_threshold: float = 0.5,
        policy: "str | Path | Policy | None" = None,
        api_key: str | None = None,
        progress: bool = True,
    ) -> None:
        """`draft_len` is a fixed k, or "auto": chosen each round from live acceptance, drafting
        speed and round-trip time (up to `max_draft_len`). `timeout_s` is every request's deadline;
        a request that fails in transit is retried `retries` times (verifies are idempotent).
        `fallback="local"` lets the device go on alone when the gateway is unreachable, trying to
        rejoin every `rejoin_every` tokens (each try waits at most `probe_timeout_s`); "error"
        raises instead. `pipeline` drafts the next block while a verify is in flight (default: on
        for a remote gateway, off in-process where both would share the same cores).
        Mode "auto" picks, per query, the mode among `auto_modes` with the best predicted
        `objective` from what this client has measured (round-trip time, both models' speeds,
        acceptance); see sdk/auto.py. The default choices are the lossless ones.
        Mode "assist" lets the device write and asks the cloud for a token only where
        `token_router` scores the device's own below `assist_threshold` (lossy; see sdk/runs/assist.py).
        `policy` (a YAML file or a routing.policy.Policy) makes "auto" follow its rules: mode,
        draft length, token router and threshold per query, cloud budgets, offline behaviour."""
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        if draft_len != "auto" and not 0 <= int(draft_len) <= 64:
            raise ValueError(f"draft_len must be 'auto' or within 0..64, got {draft_len}")
        if fallback not in ("local", "error"):
            raise ValueError(f"fallback must be 'local' or 'error', got '{fallback}'")
        # a name loads lazily; an already loaded model is used as it is
        self.drafter_name = drafter if isinstance(drafter, str) or drafter is None else drafter.name
        # "NAME@BACKEND" or drafter_backend picks the device engine (see local_runtime.backends)
        from ..local_runtime.backends import split_backend

        self.drafter_name, self.drafter_backend = split_backend(self.drafter_name, drafter_backend)
        self.target_name = target
        self.mode = mode
        self.defaults = RunOptions(
            # an in-process gateway is built from `target` and serves it under its own name
            # (`NAME@llama.cpp` -> NAME, `NAME@auto` -> the choice): nothing to ask it for
            prompt="", target=None if gateway == "inproc" else target, draft_len=draft_len, max_draft_len=max_draft_len, fallback=fallback,
            rejoin_every=rejoin_every, token_router=token_router, assist_threshold=assist_threshold,
        )
        self.retries = retries
        self.fallback = fallback
        self.probe_timeout_s = probe_timeout_s
        self._pipeline = pipeline
        self.auto_modes = tuple(auto_modes)
        self.objective = objective
        self.cost_weight = cost_weight
        if isinstance(policy, (str, Path)):
            from ..routing.policy_files import load_policy

            policy = load_policy(policy)
        self.policy = policy
        self._cloud_log: deque[tuple[float, int]] = deque()  # (time, cloud tokens) for the budgets
        self.estimate = LinkEstimate()
        self.progress = progress
        self._gateway_spec = gateway
        self._timeout_s = timeout_s
        self._api_key = api_key
        self._link: GatewayLink | None = None
        self._owned_gateway = None
        self._drafter = None if isinstance(drafter, str) or drafter is None else drafter
        self.drafter_load_s: float | None = None  # seconds the device model took to load (cold start)

    # -- resources -------------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        return self.link.transport

    @property
    def link(self) -> GatewayLink:
        if self._link is None:
            self._link = GatewayLink(
                self._make_transport(), retries=self.retries, fallback=self.fallback,
                probe_timeout_s=self.probe_timeout_s, estimate=self.estimate,
            )
        return self._link

    def _make_transport(self) -> Transport:
        spec = self._gateway_spec
        if isinstance(spec, Transport):
            return spec
        if isinstance(spec, str) and spec.startswith(("http://", "https://")):
            from ..protocols.http import HttpTransport

            headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else None
            return HttpTransport(spec, timeout_s=self._timeout_s, headers=headers)
        if spec == "inproc":
            from ..remote_gateway.service import Gateway

            self._owned_gateway = Gateway(self.target_name or DEFAULT_TARGET)
            return InProcessTransport(self._owned_gateway)
        if isinstance(spec, str):
            raise ValueError(f"gateway must be 'inproc' or an http(s):// URL, got '{spec}'")
        return InProcessTransport(spec)

    @property
    def pipelining(self) -> bool:
        if self._pipeline is not None:
            return self._pipeline
        return not isinstance(self.transport, InProcessTransport)

    @property
    def drafter(self):
        if self._drafter is None:
            if self.drafter_name is None:
                raise TandemError("this mode needs a device model: pass drafter=NAME")
            from ..local_runtime.backends import load_drafter

            started = time.perf_counter()
            self._drafter = load_drafter(self.drafter_name, self.drafter_backend, progress=self.progress)
            self.drafter_load_s = time.perf_counter() - started
        return self._drafter

    @property
    def device(self) -> DeviceModel:
        return DeviceModel(self.drafter, self.drafter_backend)

    def new_drafter_engine(self):
        """A fresh drafting engine (one sequence) over the device model, on its backend."""
        return self.device.new_engine()

    async def aclose(self) -> None:
        if self._link is not None:
            await self._link.transport.aclose()
        if self._owned_gateway is not None:
            self._owned_gateway.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- generation ------------------------------------------------------------------------------

    def stream(
        self,
        prompt: str | list[dict],
        *,
        mode: Mode | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        draft_len: int | Literal["auto"] | None = None,
        token_router: str | None = None,
        assist_threshold: float | None = None,
        tags: frozenset[str] | set[str] | tuple[str, ...] = (),
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        response_format: type | dict | None = None,
        constraint: Constraint | None = None,
    ) -> Generation:
        """Generate for one prompt (a string, or a conversation: a list of {role, content,
        tool_calls?} messages); iterate the returned Generation for text as it is accepted.
        `tags` describe the request to the policy (e.g. {"private"}) in mode "auto".

        Structured output, in every mode: `tools` ({name, description, parameters}, or OpenAI's
        shape) are rendered into the prompt; `tool_choice` "required" or {"type": "function",
        "function": {"name": ...}} forces calls (grammar-constrained), "auto" lets the model
        choose; `response_format` (a pydantic model class, a JSON Schema, or OpenAI's
        response_format) constrains the answer. Afterwards `gen.tool_calls` and `gen.parsed`.
        `constraint` gives the grammar directly (any `protocols.messages.Constraint`: a regex, ...)."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        structure = Structure.of(prompt, tools, tool_choice, parallel_tool_calls, response_format, constraint)
        d = self.defaults
        options = replace(
            d, prompt=structure.prompt, chat=chat, max_new_tokens=max_new_tokens,
            messages=structure.messages, tools=structure.tools, constraint=structure.constraint,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, seed=seed),
            draft_len=d.draft_len if draft_len is None else draft_len,
            token_router=token_router or d.token_router,
            assist_threshold=d.assist_threshold if assist_threshold is None else assist_threshold,
        )
        tags = frozenset(tags) | structure.tags
        done = lambda rec: (structure.finish(rec), self._observe(rec))  # noqa: E731
        if LOCAL_ONLY_TAG in tags:  # what it carries must not leave the device: no mode or policy overrides this
            gen = Generation("local", lambda rec: self._run("local", options, rec), on_done=done)
            gen.record.decision = {"mode": "local", "why": f"tagged {LOCAL_ONLY_TAG}"}
            return gen
        if mode == "auto":
            return Generation(mode, lambda rec: self._run_auto(rec, options, tags), on_done=done)
        return Generation(mode, lambda rec: self._run(mode, options, rec), on_done=done)

    async def generate(self, prompt: str, **kwargs) -> GenerationRecord:
        return await self.stream(prompt, **kwargs).collect()

    async def _run(self, mode: str, options: RunOptions, rec: GenerationRecord) -> AsyncIterator[str]:
        options = replace(options, pipeline=self.pipelining)
        if mode == "local":
            run = run_local(options, self.device, rec)
        elif mode == "cloud":
            run = run_cloud(options, self.link, rec, self.device if self.drafter_name or self._drafter else None)
        elif mode == "assist":
            text_space = not await self.link.shares_tokenizer(self.drafter.tokenizer.fingerprint)
            run = AssistRun(options, self.link, self.device, rec, text_space=text_space).run()
        else:
            same = await self.link.shares_tokenizer(self.drafter.tokenizer.fingerprint)
            run = (TokenSpeculation if same else TextSpeculation)(options, self.link, self.device, rec).run()
        async for piece in run:
            yield piece

    # -- auto: measure, predict, choose ------------------------------------------------------------

    async def measure_rtt(self) -> float | None:
        """One light round trip to the gateway (GET /v1/info); None when it cannot be reached."""
        return await self.link.measure_rtt()

    async def _run_auto(self, rec: GenerationRecord, options: RunOptions, tags: frozenset[str]) -> AsyncIterator[str]:
        """Decide the mode for this query, then run it. With a policy, its rules decide (tags,
        prompt length, difficulty, budgets, network); a rule whose mode is "auto", or no policy at
        all, leaves the choice to the predictions among the allowed modes."""
        rtt = await self.measure_rtt()
        online = rtt is not None
        decision: dict = {"rtt_ms": None if rtt is None else round(rtt * 1000, 2)}
        mode = None
        allowed, objective, cost_weight = list(self.auto_modes), self.objective, self.cost_weight
        if self.policy is not None:
            from ..routing.policy import RequestContext

            ctx = RequestContext(
                tags=tags, online=online, rtt_ms=None if rtt is None else rtt * 1000,
                cloud_tokens_last_minute=self._cloud_tokens_since(60), cloud_tokens_today=self._cloud_tokens_since(86_400),
            )
            d = self.policy.choose(options.prompt, ctx)
            decision["policy"] = d.model_dump()
            mode = d.mode
            options = replace(
                options,
                draft_len=options.draft_len if d.draft_len is None else d.draft_len,
                token_router=d.token_router or options.token_router,
                assist_threshold=options.assist_threshold if d.threshold is None else d.threshold,
            )
            if mode == "auto":
                o = self.policy.objective
                allowed, objective, cost_weight = list(o.modes), o.kind, o.cost_weight
                mode = None
        if mode is None:
            if not online and self.fallback == "local":
                mode = "local"  # offline: the device alone
                rec.usage.fallbacks += 1
            else:
                mode, table = choose_mode(allowed, self.estimate, objective, cost_weight, options.max_new_tokens)
                decision["predicted"] = table
                decision["objective"] = objective
        decision["estimates"] = self.estimate.to_dict()
        decision["mode"] = mode
        rec.mode = mode
        rec.decision = decision
        async for piece in self._run(mode, options, rec):
            yield piece

    def _cloud_tokens_since(self, seconds: float) -> int:
        cutoff = time.time() - seconds
        return sum(n for t, n in self._cloud_log if t >= cutoff)

    def _observe(self, rec: GenerationRecord) -> None:
        """Fold a finished generation's timings into the link estimate (speculative rounds were
        folded in as they came), and its cloud tokens into the budget log."""
        e, u, n = self.estimate, rec.usage, max(1, len(rec.tokens))
        if u.cloud_tokens or u.accepted_tokens:
            now = time.time()
            self._cloud_log.append((now, u.cloud_tokens + u.accepted_tokens))
            while self._cloud_log and self._cloud_log[0][0] < now - 86_400:
                self._cloud_log.popleft()
        if rec.mode == "local" and u.wall_s > 0:
            e.observe("local_token_s", u.wall_s / n)
        elif rec.mode == "cloud" and u.wall_s > 0:
            # the decode steps after the first piece: the prompt's prefill (paid alike by every
            # mode that asks the cloud) is its own estimate, not spread over the tokens
            after = len(rec.tokens) - rec.first_piece_tokens
            if rec.first_piece_s is not None and after > 0:
                e.observe("cloud_token_s", max(1e-4, (u.wall_s - rec.first_piece_s) / after))
                e.observe("prefill_s", max(0.0, rec.first_piece_s - e.rtt_s))
            else:
                e.observe("cloud_token_s", max(1e-4, (u.wall_s - e.rtt_s) / n))
        elif rec.mode == "assist" and rec.tokens:
            e.observe("escalate_rate", u.rounds / len(rec.tokens))


class SyncClient:
    """Blocking wrapper over `Client` for scripts; same arguments. It runs its own event loop,
    so it cannot be used where one is already running (a notebook, an async app): use the
    async `Client` there (`async with Client(...) as c: await c.generate(...)`)."""

    def __init__(self, **kwargs) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise TandemError(
                "SyncClient cannot run inside a running event loop (a notebook or an async app): "
                "use the async tandem.sdk.Client there, e.g. `async with Client(...) as c: await c.generate(...)`"
            )
        self._runner = asyncio.Runner()
        self._client = Client(**kwargs)

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        gen = self._client.stream(prompt, **kwargs)
        it = gen.__aiter__()
        while True:
            try:
                yield self._runner.run(it.__anext__())
            except StopAsyncIteration:
                return

    def generate(self, prompt: str, **kwargs) -> GenerationRecord:
        return self._runner.run(self._client.generate(prompt, **kwargs))

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Client", "SyncClient", "Generation", "MODES", "DEFAULT_DRAFTER", "DEFAULT_TARGET"]
