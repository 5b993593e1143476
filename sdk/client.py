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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Literal

from ..protocols.errors import TandemError, TokenizerMismatchError
from ..protocols.messages import (
    ChatMessage,
    CloseSession,
    GenerateRequest,
    OpenSession,
    SamplingParams,
    SparseDist,
    VerifyRequest,
    VerifyTextRequest,
)
from ..protocols.transport import GatewayHandler, InProcessTransport, Transport
from .usage import GenerationRecord, Round, Usage

if TYPE_CHECKING:
    from ..local_runtime.models import LoadedModel

Mode = Literal["local", "cloud", "speculative"]
MODES: tuple[str, ...] = ("local", "cloud", "speculative")

DEFAULT_DRAFTER = "smollm2-135m"
DEFAULT_TARGET = "gemma3-270m"
DEFAULT_DRAFT_LEN = 4


class Generation:
    """One generation: iterate it (async) for text as it is accepted; afterwards `text`,
    `tokens` and `usage` hold the whole of it. Tokens already streamed stay in `record` even if
    the generation fails half-way."""

    def __init__(self, mode: str, run: Callable[[GenerationRecord], AsyncIterator[str]]) -> None:
        self.record = GenerationRecord(mode=mode)
        self._run = run
        self._started = False

    def __aiter__(self) -> AsyncIterator[str]:
        if self._started:
            raise TandemError("a Generation can be iterated once")
        self._started = True
        return self._timed()

    async def _timed(self) -> AsyncIterator[str]:
        t0 = time.perf_counter()
        try:
            async for piece in self._run(self.record):
                self.record.text += piece
                yield piece
        finally:
            self.record.usage.wall_s = time.perf_counter() - t0

    async def collect(self) -> GenerationRecord:
        async for _ in self:
            pass
        return self.record

    @property
    def text(self) -> str:
        return self.record.text

    @property
    def tokens(self) -> list[int]:
        return self.record.tokens

    @property
    def usage(self) -> Usage:
        return self.record.usage


class Client:
    def __init__(
        self,
        *,
        drafter: "str | LoadedModel | None" = DEFAULT_DRAFTER,
        gateway: str | Transport | GatewayHandler = "inproc",
        target: str | None = None,
        mode: Mode = "speculative",
        draft_len: int = DEFAULT_DRAFT_LEN,
        timeout_s: float = 120.0,
        api_key: str | None = None,
        progress: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        if not 0 <= draft_len <= 64:
            raise ValueError(f"draft_len must be within 0..64, got {draft_len}")
        # a name loads lazily; an already loaded model is used as it is
        self.drafter_name = drafter if isinstance(drafter, str) or drafter is None else drafter.name
        self.target_name = target
        self.mode = mode
        self.draft_len = draft_len
        self.progress = progress
        self._gateway_spec = gateway
        self._timeout_s = timeout_s
        self._api_key = api_key
        self._transport: Transport | None = None
        self._owned_gateway = None
        self._drafter = None if isinstance(drafter, str) or drafter is None else drafter
        self._same_tokenizer: bool | None = None

    # -- resources -------------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            spec = self._gateway_spec
            if isinstance(spec, Transport):
                self._transport = spec
            elif isinstance(spec, str) and spec.startswith(("http://", "https://")):
                from ..protocols.http import HttpTransport

                headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else None
                self._transport = HttpTransport(spec, timeout_s=self._timeout_s, headers=headers)
            elif spec == "inproc":
                from ..remote_gateway.service import Gateway

                self._owned_gateway = Gateway(self.target_name or DEFAULT_TARGET)
                self._transport = InProcessTransport(self._owned_gateway)
            elif isinstance(spec, str):
                raise ValueError(f"gateway must be 'inproc' or an http(s):// URL, got '{spec}'")
            else:
                self._transport = InProcessTransport(spec)
        return self._transport

    @property
    def drafter(self):
        if self._drafter is None:
            if self.drafter_name is None:
                raise TandemError("this mode needs a device model: pass drafter=NAME")
            from ..local_runtime.models import load_model

            self._drafter = load_model(self.drafter_name, progress=self.progress)
        return self._drafter

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
        if self._owned_gateway is not None:
            self._owned_gateway.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- generation ------------------------------------------------------------------------------

    def stream(
        self,
        prompt: str,
        *,
        mode: Mode | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        draft_len: int | None = None,
    ) -> Generation:
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        k = self.draft_len if draft_len is None else draft_len
        runs = {
            "local": lambda rec: self._run_local(rec, prompt, chat, sampling, max_new_tokens),
            "cloud": lambda rec: self._run_cloud(rec, prompt, chat, sampling, max_new_tokens),
            "speculative": lambda rec: self._run_speculative(rec, prompt, chat, sampling, max_new_tokens, k),
        }
        return Generation(mode, runs[mode])

    async def generate(self, prompt: str, **kwargs) -> GenerationRecord:
        return await self.stream(prompt, **kwargs).collect()

    async def _run_local(self, rec, prompt, chat, sampling, max_new_tokens) -> AsyncIterator[str]:
        from ..local_runtime.engine import generate_alone
        from ..local_runtime.text import IncrementalDecoder

        lm = self.drafter
        tok = lm.tokenizer
        tokens = generate_alone(
            lm, tok.prompt_tokens(prompt, chat), max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
        )
        decoder = IncrementalDecoder(tok.decode, skip_ids=tok.eos_token_ids)
        done = object()
        while (t := await asyncio.to_thread(next, tokens, done)) is not done:
            rec.tokens.append(t)
            rec.usage.local_tokens += 1
            if t in tok.eos_token_ids:
                rec.finish_reason = "eos"
            if piece := decoder.push([t]):
                yield piece
        rec.finish_reason = rec.finish_reason or "length"
        if tail := decoder.flush():
            yield tail

    async def _run_cloud(self, rec, prompt, chat, sampling, max_new_tokens) -> AsyncIterator[str]:
        transport = self.transport
        if chat:
            req = GenerateRequest(
                messages=[ChatMessage(role="user", content=prompt)], sampling=sampling,
                max_new_tokens=max_new_tokens, model=self.target_name,
            )
        else:
            req = GenerateRequest(
                prompt_text=prompt, sampling=sampling, max_new_tokens=max_new_tokens, model=self.target_name
            )
        up, down = transport.bytes_up, transport.bytes_down
        try:
            rec.usage.rounds += 1
            async for chunk in transport.stream(req):
                rec.tokens.extend(chunk.tokens)
                rec.usage.cloud_tokens += len(chunk.tokens)
                if chunk.finished:
                    rec.finish_reason = chunk.finish_reason
                if chunk.text:
                    yield chunk.text
        finally:
            rec.usage.bytes_up += transport.bytes_up - up
            rec.usage.bytes_down += transport.bytes_down - down

    async def _shares_tokenizer(self) -> bool:
        """Whether drafter and target tokenize alike (verify token ids) or not (verify text)."""
        if self._same_tokenizer is None:
            info = await self.transport.info()
            self._same_tokenizer = info.tokenizer_fingerprint == self.drafter.tokenizer.fingerprint
        return self._same_tokenizer

    async def _run_speculative(self, rec, prompt, chat, sampling, max_new_tokens, draft_len) -> AsyncIterator[str]:
        if await self._shares_tokenizer():
            runner = self._run_speculative_tokens
        else:
            runner = self._run_speculative_text
        async for piece in runner(rec, prompt, chat, sampling, max_new_tokens, draft_len):
            yield piece

    async def _run_speculative_tokens(self, rec, prompt, chat, sampling, max_new_tokens, draft_len) -> AsyncIterator[str]:
        import torch

        from ..local_runtime.engine import Engine
        from ..local_runtime.text import IncrementalDecoder

        lm = self.drafter
        tok = lm.tokenizer
        transport = self.transport
        prompt_tokens = tok.prompt_tokens(prompt, chat)
        up, down = transport.bytes_up, transport.bytes_down
        usage = rec.usage
        opened = await transport.request(
            OpenSession(
                prompt_tokens=prompt_tokens, tokenizer_fingerprint=tok.fingerprint, sampling=sampling,
                max_new_tokens=max_new_tokens, model=self.target_name,
            )
        )
        engine = Engine(lm)
        engine.append(prompt_tokens)
        decoder = IncrementalDecoder(tok.decode, skip_ids=opened.eos_token_ids)
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        pos = opened.position
        try:
            while True:
                k = max(0, min(draft_len, max_new_tokens - len(rec.tokens) - 1))
                draft = await asyncio.to_thread(
                    engine.draft, k, temperature=sampling.temperature, top_p=sampling.top_p, generator=generator
                )
                dists = None if draft.dists is None else [SparseDist(ids=i, probs=p) for i, p in draft.dists]
                t0 = time.perf_counter()
                result = await transport.request(
                    VerifyRequest(
                        session_id=opened.session_id, position=pos, draft_tokens=draft.tokens,
                        draft_probs=draft.probs, draft_dists=dists,
                    )
                )
                verify_s = time.perf_counter() - t0
                keep = min(result.accepted, len(result.tokens))
                engine.truncate(pos + keep)
                engine.append(result.tokens[keep:])
                pos = result.position
                rec.tokens.extend(result.tokens)
                rec.rounds.append(Round(k, result.accepted, len(result.tokens), draft.seconds, verify_s))
                usage.rounds += 1
                usage.local_tokens += k
                usage.accepted_tokens += keep
                usage.cloud_tokens += len(result.tokens) - keep
                usage.tested_tokens += result.accepted + (1 if result.accepted < k else 0)
                if piece := decoder.push(result.tokens):
                    yield piece
                if result.finished:
                    rec.finish_reason = result.finish_reason
                    break
        finally:
            if rec.finish_reason is None:
                # stopped early (error or the caller broke off): free the gateway's cache now
                try:
                    await transport.request(CloseSession(session_id=opened.session_id))
                except TandemError:
                    pass
            usage.bytes_up += transport.bytes_up - up
            usage.bytes_down += transport.bytes_down - down
        if tail := decoder.flush():
            yield tail

    async def _run_speculative_text(self, rec, prompt, chat, sampling, max_new_tokens, draft_len) -> AsyncIterator[str]:
        """Speculation across tokenizers: the device drafts in its own tokens, sends the text, and
        the gateway verifies it against the target's tokenisation. Both sides agree on the
        generated *text*; the device re-synchronises its cache to each accepted text (keeping its
        drafted tokens up to the last one that still fits, re-tokenising the rest)."""
        from ..local_runtime.engine import Engine

        if not sampling.greedy:
            raise TokenizerMismatchError(
                f"drafter '{self.drafter.name}' and the gateway's model use different tokenizers; speculative "
                "sampling across tokenizers is not supported (no lossless cross-vocabulary rule is implemented). "
                "Use temperature 0, mode 'cloud', or a drafter that shares the target's tokenizer."
            )
        tok = self.drafter.tokenizer
        transport = self.transport
        up, down = transport.bytes_up, transport.bytes_down
        usage = rec.usage
        opened = await transport.request(
            OpenSession(
                messages=[ChatMessage(role="user", content=prompt)] if chat else None,
                prompt_text=None if chat else prompt,
                sampling=sampling, max_new_tokens=max_new_tokens, model=self.target_name,
            )
        )
        engine = Engine(self.drafter)
        base = tok.prompt_tokens(prompt, chat)
        engine.append(base)
        gen: list[int] = []  # the drafter's tokens for `committed`
        committed = ""
        try:
            while True:
                draft = await asyncio.to_thread(engine.draft, draft_len)
                # a control token ends the draft; the drafter's end-of-answer becomes a proposal to stop
                cut = next((i for i, t in enumerate(draft.tokens) if t in tok.special_ids), len(draft.tokens))
                eos = cut < len(draft.tokens) and draft.tokens[cut] in tok.eos_token_ids
                proposed = draft.tokens[:cut]
                text = tok.decode(gen + proposed)
                draft_text = text[len(committed) :] if text.startswith(committed) else tok.decode(proposed)
                if draft_text.endswith("\ufffd"):  # never propose half a character
                    draft_text, eos = draft_text.rstrip("\ufffd"), False
                t0 = time.perf_counter()
                result = await transport.request(
                    VerifyTextRequest(
                        session_id=opened.session_id, position=len(rec.tokens), text_offset=len(committed), draft_text=draft_text,
                        draft_eos=eos, draft_tokens=len(proposed),
                    )
                )
                verify_s = time.perf_counter() - t0
                committed += result.text
                gen = self._resync(engine, len(base), gen, proposed, committed)

                kept = min(result.accepted, len(result.tokens))
                rec.tokens.extend(result.tokens)
                rec.rounds.append(Round(result.candidates, result.accepted, len(result.tokens), draft.seconds, verify_s))
                usage.rounds += 1
                usage.local_tokens += len(draft.tokens)
                usage.accepted_tokens += kept
                usage.cloud_tokens += len(result.tokens) - kept
                usage.tested_tokens += result.accepted + (1 if result.accepted < result.candidates else 0)
                if result.text:
                    yield result.text
                if result.finished:
                    rec.finish_reason = result.finish_reason
                    break
        finally:
            if rec.finish_reason is None:
                try:
                    await transport.request(CloseSession(session_id=opened.session_id))
                except TandemError:
                    pass
            usage.bytes_up += transport.bytes_up - up
            usage.bytes_down += transport.bytes_down - down

    def _resync(self, engine, base: int, gen: list[int], proposed: list[int], committed: str) -> list[int]:
        """Roll the drafter back to the last of its tokens whose text is still a prefix of the
        committed text, and append the rest of that text re-tokenised. Returns the new `gen`."""
        tok = self.drafter.tokenizer
        j = len(proposed)
        while j > 0:
            text = tok.decode(gen + proposed[:j])
            if committed.startswith(text) and not text.endswith("\ufffd"):
                break
            j -= 1
        keep = gen + proposed[:j]
        rest = committed[len(tok.decode(keep)) :]
        extra = tok.encode(rest) if rest else []
        engine.truncate(base + len(keep))
        engine.append(extra)
        new_gen = keep + extra
        if tok.decode(new_gen) != committed:
            # this text does not survive a split re-tokenisation: take the whole text afresh
            new_gen = tok.encode(committed)
            engine.truncate(base)
            engine.append(new_gen)
        return new_gen


class SyncClient:
    """Blocking wrapper over `Client` for scripts and notebooks; same arguments."""

    def __init__(self, **kwargs) -> None:
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
