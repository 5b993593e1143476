"""The device side of speculative decoding: one `SpeculativeRun` per generation.

Token space (drafter and target share a tokenizer):

    open session (prompt ids)                      -> the gateway prefills
    loop: draft k ids -> verify -> keep the accepted prefix + the target's next id

Text space (tokenizers differ): the same loop, but drafts travel as text and the device
re-synchronises its cache to the text the target accepted (see `_resync`).

Around both loops:
- draft length: `DraftLengthController` picks k each round from live acceptance, drafting speed
  and round-trip estimates (or a fixed k);
- pipelining (token space): while a verify is in flight the device keeps drafting as if every
  draft will be accepted; when the target's next token equals the first extra draft, the rest
  of the extra block survives into the next round;
- deadlines and retries: every request has the transport's timeout; a verify whose reply is lost
  is sent again unchanged (the gateway answers a repeated verify with its first reply, so the
  session never advances twice);
- fallback: when the gateway cannot be reached the device goes on alone (when the client allows
  it), counts a fallback, and every `rejoin_every` tokens tries a new session re-prefilled with
  the prompt and everything generated so far; speculation resumes when it answers.
No token is lost or repeated across these switches: the committed sequence only ever grows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..local_runtime.engine import Draft, Engine
from ..local_runtime.text import IncrementalDecoder
from ..protocols.errors import TandemError, TokenizerMismatchError, TransportError, UnknownSessionError
from ..protocols.messages import (
    ChatMessage,
    CloseSession,
    OpenSession,
    SamplingParams,
    SparseDist,
    VerifyRequest,
    VerifyTextRequest,
)
from .control import DraftLengthController, FixedDraftLength
from .usage import GenerationRecord, Round

if TYPE_CHECKING:
    from .client import Client


class SpeculativeRun:
    def __init__(
        self,
        client: "Client",
        rec: GenerationRecord,
        prompt: str,
        chat: bool,
        sampling: SamplingParams,
        max_new_tokens: int,
        draft_len: int | str,
    ) -> None:
        self.client = client
        self.rec = rec
        self.prompt = prompt
        self.chat = chat
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.controller = (
            DraftLengthController(k_max=client.max_draft_len) if draft_len == "auto" else FixedDraftLength(int(draft_len))
        )
        self.lm = client.drafter
        self.tok = self.lm.tokenizer
        self.engine = client.new_drafter_engine()
        self.finished = False
        self.session_id: str | None = None
        transport = client.transport
        self._bytes_at_start = (transport.bytes_up, transport.bytes_down)
        self._generator = None
        if sampling.seed is not None:
            import torch

            self._generator = torch.Generator().manual_seed(sampling.seed)

    # -- shared pieces ---------------------------------------------------------------------------

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.rec.tokens)

    async def _request(self, msg):
        """Send with retries: a lost reply is retried unchanged (verifies are idempotent)."""
        transport = self.client.transport
        attempts = 1 + self.client.retries
        for attempt in range(attempts):
            try:
                return await transport.request(msg)
            except TransportError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)

    async def _open(self, msg: OpenSession, probe: bool) -> str | None:
        """Open a session; None when the gateway cannot be reached and the client may go on alone."""
        try:
            if probe:
                opened = await asyncio.wait_for(self.client.transport.request(msg), self.client.probe_timeout_s)
            else:
                opened = await self._request(msg)
        except (TransportError, asyncio.TimeoutError) as exc:
            if self.client.fallback != "local":
                raise TransportError(f"gateway unreachable and fallback is '{self.client.fallback}': {exc}") from exc
            return None
        return opened.session_id

    def _draft_one(self, k: int) -> Draft:
        s = self.sampling
        return self.engine.draft(k, temperature=s.temperature, top_p=s.top_p, generator=self._generator)

    async def _local_tokens(self, n: int, decoder: IncrementalDecoder) -> AsyncIterator[tuple[int, str]]:
        """The device alone for up to n tokens (the fallback while the gateway is away)."""
        import torch

        from ..local_runtime.sampling import logits_to_probs

        eos = set(self.tok.eos_token_ids)
        for _ in range(n):
            if self.remaining <= 0:
                self.finished, self.rec.finish_reason = True, "length"
                return
            logits = await asyncio.to_thread(self.engine.next_logits)
            if self.sampling.greedy:
                tok = int(torch.argmax(logits))
            else:
                probs = logits_to_probs(logits, self.sampling.temperature, self.sampling.top_p)
                tok = int(torch.multinomial(probs.float(), 1, generator=self._generator))
            self.engine.append([tok])
            self.rec.tokens.append(tok)
            self.rec.usage.local_tokens += 1
            yield tok, decoder.push([tok])
            if tok in eos:
                self.finished, self.rec.finish_reason = True, "eos"
                return

    def _account(self, k: int, accepted: int, emitted: list[int], candidates: int, draft_s: float, verify_s: float) -> None:
        kept = min(accepted, len(emitted))
        u = self.rec.usage
        u.rounds += 1
        u.accepted_tokens += kept
        u.cloud_tokens += len(emitted) - kept
        u.tested_tokens += accepted + (1 if accepted < candidates else 0)
        self.rec.tokens.extend(emitted)
        self.rec.rounds.append(Round(candidates, accepted, len(emitted), draft_s, verify_s))
        self.controller.observe(candidates, accepted, draft_s, verify_s)

    async def _close(self) -> None:
        transport = self.client.transport
        if self.session_id is not None and not self.finished:
            try:
                await transport.request(CloseSession(session_id=self.session_id))
            except TandemError:
                pass
        up, down = self._bytes_at_start
        self.rec.usage.bytes_up += transport.bytes_up - up
        self.rec.usage.bytes_down += transport.bytes_down - down

    # -- token space -----------------------------------------------------------------------------

    async def run_tokens(self) -> AsyncIterator[str]:
        tok, engine, rec = self.tok, self.engine, self.rec
        prompt_ids = tok.prompt_tokens(self.prompt, self.chat)
        engine.append(prompt_ids)
        decoder = IncrementalDecoder(tok.decode, skip_ids=tok.special_ids)
        pipeline = self.client.pipelining
        pre = Draft([], [], None if self.sampling.greedy else [])  # drafts that survived the last round

        def open_msg() -> OpenSession:
            return OpenSession(
                prompt_tokens=prompt_ids + rec.tokens, tokenizer_fingerprint=tok.fingerprint,
                sampling=self.sampling, max_new_tokens=self.remaining, model=self.client.target_name,
            )

        self.session_id = await self._open(open_msg(), probe=False)
        try:
            while not self.finished:
                if self.session_id is None:
                    rec.usage.fallbacks += 1
                    engine.truncate(len(prompt_ids) + len(rec.tokens))
                    pre = Draft([], [], None if self.sampling.greedy else [])
                    while not self.finished and self.session_id is None:
                        async for _, piece in self._local_tokens(self.client.rejoin_every, decoder):
                            if piece:
                                yield piece
                        if not self.finished:
                            self.session_id = await self._open(open_msg(), probe=True)
                    continue
                if self.remaining <= 0:
                    break
                pos = len(prompt_ids) + len(rec.tokens)
                k = max(len(pre.tokens), min(self.controller.next_k(), self.remaining - 1))
                k = max(0, min(k, self.remaining - 1))
                if len(pre.tokens) > k:  # the budget shrank below what survived
                    engine.truncate(pos + k)
                    pre = _head(pre, k)
                t0 = time.perf_counter()
                fresh = await asyncio.to_thread(self._draft_one, k - len(pre.tokens))
                draft = _concat(pre, fresh)
                draft_s = time.perf_counter() - t0
                req = VerifyRequest(
                    session_id=self.session_id, position=pos, draft_tokens=draft.tokens, draft_probs=draft.probs,
                    draft_dists=None if draft.dists is None else [SparseDist(ids=i, probs=p) for i, p in draft.dists],
                )
                t1 = time.perf_counter()
                pending = asyncio.ensure_future(self._request(req))
                extra = await self._draft_while(pending, k + 1) if pipeline and k < self.remaining - 1 else None
                try:
                    result = await pending
                except UnknownSessionError:
                    self.session_id = await self._open(open_msg(), probe=False)  # expired or evicted: re-open
                    engine.truncate(pos)
                    pre = Draft([], [], None if self.sampling.greedy else [])
                    continue
                except TransportError:
                    if self.client.fallback != "local":
                        raise
                    self.session_id = None
                    continue
                verify_s = time.perf_counter() - t1
                kept = min(result.accepted, len(result.tokens))
                survived = (
                    extra is not None and extra.tokens and result.accepted == k and not result.finished
                    and result.next_token == extra.tokens[0]
                )
                if survived:
                    pre = _tail(extra, 1)  # the engine already holds the committed tokens and these
                else:
                    engine.truncate(pos + kept)
                    engine.append(result.tokens[kept:])
                    pre = Draft([], [], None if self.sampling.greedy else [])
                rec.usage.local_tokens += len(fresh.tokens) + (len(extra.tokens) if extra else 0)
                self._account(k, result.accepted, result.tokens, k, draft_s, verify_s)
                if piece := decoder.push(result.tokens):
                    yield piece
                if result.finished:
                    self.finished, rec.finish_reason = True, result.finish_reason
            if tail := decoder.flush():
                yield tail
        finally:
            if rec.finish_reason is None and self.remaining <= 0:
                rec.finish_reason = "length"
            await self._close()

    async def _draft_while(self, pending: asyncio.Future, limit: int) -> Draft:
        """Draft one token at a time until the verify answers (or `limit` tokens)."""
        extra = Draft([], [], None if self.sampling.greedy else [])
        while not pending.done() and len(extra.tokens) < limit:
            extra = _concat(extra, await asyncio.to_thread(self._draft_one, 1))
        return extra

    # -- text space ------------------------------------------------------------------------------

    async def run_text(self) -> AsyncIterator[str]:
        """Speculation across tokenizers: the device drafts in its own tokens and sends their text;
        the gateway verifies it against the target's tokenisation and answers with the target's
        text. Both sides agree on the generated text; the device re-synchronises its cache to it."""
        if not self.sampling.greedy:
            raise TokenizerMismatchError(
                f"drafter '{self.lm.name}' and the gateway's model use different tokenizers; speculative "
                "sampling across tokenizers is not supported (no lossless cross-vocabulary rule is implemented). "
                "Use temperature 0, mode 'cloud', or a drafter that shares the target's tokenizer."
            )
        tok, engine, rec = self.tok, self.engine, self.rec
        base = tok.prompt_tokens(self.prompt, self.chat)
        engine.append(base)
        gen: list[int] = []  # the drafter's tokens for `committed`
        committed = ""
        session_base = 0  # len(committed) when the current session opened (it counts from there)
        session_tokens = 0  # target tokens appended in the current session

        def open_msg() -> OpenSession:
            return OpenSession(
                messages=[ChatMessage(role="user", content=self.prompt)] if self.chat else None,
                prompt_text=None if self.chat else self.prompt,
                resume_text=committed or None,
                sampling=self.sampling, max_new_tokens=self.remaining, model=self.client.target_name,
            )

        self.session_id = await self._open(open_msg(), probe=False)
        try:
            while not self.finished:
                if self.session_id is None:
                    rec.usage.fallbacks += 1
                    engine.truncate(len(base) + len(gen))
                    decoder = IncrementalDecoder(tok.decode, skip_ids=tok.special_ids)
                    decoder.push(gen)
                    while not self.finished and self.session_id is None:
                        async for t, piece in self._local_tokens(self.client.rejoin_every, decoder):
                            gen.append(t)
                            committed += piece
                            if piece:
                                yield piece
                        if not self.finished:
                            # a new session starts at a whole character
                            self.session_id = await self._open(open_msg(), probe=True)
                    session_base, session_tokens = len(committed), 0
                    engine.truncate(len(base))
                    gen = tok.encode(committed)
                    engine.append(gen)
                    continue
                t0 = time.perf_counter()
                draft = await asyncio.to_thread(self._draft_one, self.controller.next_k())
                draft_s = time.perf_counter() - t0
                # a control token ends the draft; the drafter's end-of-answer becomes a proposal to stop
                cut = next((i for i, t in enumerate(draft.tokens) if t in tok.special_ids), len(draft.tokens))
                eos = cut < len(draft.tokens) and draft.tokens[cut] in tok.eos_token_ids
                proposed = draft.tokens[:cut]
                text = tok.decode(gen + proposed)
                draft_text = text[len(committed) :] if text.startswith(committed) else tok.decode(proposed)
                if draft_text.endswith("\ufffd"):  # never propose half a character
                    draft_text, eos = draft_text.rstrip("\ufffd"), False
                req = VerifyTextRequest(
                    session_id=self.session_id, position=session_tokens, text_offset=len(committed) - session_base,
                    draft_text=draft_text, draft_eos=eos, draft_tokens=len(proposed),
                )
                t1 = time.perf_counter()
                try:
                    result = await self._request(req)
                except (TransportError, UnknownSessionError) as exc:
                    if isinstance(exc, TransportError) and self.client.fallback != "local":
                        raise
                    engine.truncate(len(base) + len(gen))
                    self.session_id = None if isinstance(exc, TransportError) else await self._open(open_msg(), probe=False)
                    session_base, session_tokens = len(committed), 0
                    continue
                verify_s = time.perf_counter() - t1
                committed += result.text
                session_tokens += len(result.tokens)
                gen = _resync(tok, engine, len(base), gen, proposed, committed)
                rec.usage.local_tokens += len(draft.tokens)
                self._account(len(proposed), result.accepted, result.tokens, result.candidates, draft_s, verify_s)
                if result.text:
                    yield result.text
                if result.finished:
                    self.finished, rec.finish_reason = True, result.finish_reason
        finally:
            await self._close()


def _resync(tok, engine: Engine, base: int, gen: list[int], proposed: list[int], committed: str) -> list[int]:
    """Roll the drafter back to the last of its tokens whose text is still a prefix of the
    committed text, and append the rest of that text re-tokenised. Returns the new `gen`."""
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


def _concat(a: Draft, b: Draft) -> Draft:
    dists = None if a.dists is None else a.dists + (b.dists or [])
    return Draft(a.tokens + b.tokens, a.probs + b.probs, dists, a.seconds + b.seconds)


def _head(d: Draft, n: int) -> Draft:
    return Draft(d.tokens[:n], d.probs[:n], None if d.dists is None else d.dists[:n])


def _tail(d: Draft, start: int) -> Draft:
    return Draft(d.tokens[start:], d.probs[start:], None if d.dists is None else d.dists[start:])


__all__ = ["SpeculativeRun"]
