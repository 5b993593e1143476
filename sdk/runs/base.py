"""The skeleton every run that talks to a gateway session shares: open, rounds, fallback, rejoin.

    open a session (None: the gateway is away)
    while not finished:
        no session  -> the device alone for `rejoin_every` tokens (counted as a fallback), then
                       try to open a session again, re-prefilled with everything so far
        a session   -> one round of the run's own kind (speculative tokens or text, assist)
    flush the text; close the session

No token is lost or repeated across these switches: the committed sequence only ever grows,
and a new session always starts from it. Subclasses say how to open (`open_msg`), what a round
is (`round`), and how to line their engine up with the committed output before and after the
device went on alone (`before_offline`, `after_rejoin`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from ...local_runtime.text import IncrementalDecoder
from ...protocols.errors import BackendUnavailable
from ...protocols.messages import OpenSession
from ..estimates import DraftLengthController, FixedDraftLength
from ..usage import CLOUD, LOCAL, GenerationRecord, Piece, Round
from .link import GatewayLink
from .options import DeviceModel, RunOptions


class SessionRun(ABC):
    def __init__(self, options: RunOptions, link: GatewayLink, device: DeviceModel, rec: GenerationRecord) -> None:
        self.options = options
        self.link = link
        self.device = device
        self.rec = rec
        self.tok = device.tokenizer
        self.engine = device.new_engine()
        self.sampling = options.sampling
        self.finished = False
        self.tail_origin = CLOUD  # who produced the text still held back when the run ends
        self.session_id: str | None = None
        self.decoder = IncrementalDecoder(self.tok.decode, skip_ids=self.tok.special_ids)
        self.eos = frozenset(self.tok.eos_token_ids)
        self.grammar = None  # the device's copy of a constraint's grammar, where the run drafts under it
        self._generator = None
        if options.sampling.seed is not None:
            import torch

            self._generator = torch.Generator().manual_seed(options.sampling.seed)

    @property
    def remaining(self) -> int:
        return self.options.max_new_tokens - len(self.rec.tokens)

    # -- what a kind of run says -------------------------------------------------------------------

    @abstractmethod
    def open_msg(self) -> OpenSession:
        """A session for the prompt plus everything committed so far."""

    @abstractmethod
    def round(self) -> AsyncIterator[Piece]:
        """One exchange with the session; yields the text it commits, as Pieces."""

    def before_offline(self) -> None:
        """Line the engine up with the committed tokens before the device goes on alone."""

    def on_local_token(self, token: int, piece: str) -> None:
        """A token the device produced alone (already in `rec.tokens` and the engine)."""

    def after_rejoin(self) -> None:
        """A new session opened after the device went on alone."""

    # -- the skeleton --------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[str]:
        if not self.link.rtt_measured:  # the draft length weighs drafting against round trips
            await self.link.measure_rtt()
        with self.link.counting(self.rec.usage):
            # the device prefills its prompt while the gateway prefills the session's
            opening = asyncio.ensure_future(self.link.open(self.open_msg()))
            try:
                await asyncio.to_thread(self.engine.next_logits)
            except BackendUnavailable:
                pass  # an engine that exposes no logits (MLC) prefills when it first drafts
            finally:
                self.session_id = await opening
            try:
                while not self.finished:
                    if self.remaining <= 0:
                        break
                    if self.session_id is None:
                        async for piece in self._offline():
                            yield piece
                        continue
                    async for piece in self.round():
                        yield piece
                if tail := self.decoder.flush():
                    yield Piece(tail, self.tail_origin)
            finally:
                if self.rec.finish_reason is None and self.remaining <= 0:
                    self.rec.finish_reason = "length"
                if not self.finished:
                    await self.link.close(self.session_id)

    async def _offline(self) -> AsyncIterator[str]:
        self.rec.usage.fallbacks += 1
        self.before_offline()
        while not self.finished and self.session_id is None:
            async for token, piece in self.local_tokens(self.options.rejoin_every):
                self.on_local_token(token, piece)
                if piece:
                    yield Piece(piece, LOCAL)
            if not self.finished:
                self.session_id = await self.link.open(self.open_msg(), probe=True)
        if self.session_id is not None:
            self.after_rejoin()

    async def local_tokens(self, n: int) -> AsyncIterator[tuple[int, str]]:
        """The device alone for up to n tokens (greedy or sampled from its own distribution)."""
        for _ in range(n):
            if self.remaining <= 0:
                self.finished, self.rec.finish_reason = True, "length"
                return
            allowed = self.allowed()
            if allowed is not None and not allowed.any():  # the grammar is complete
                self.finished, self.rec.finish_reason = True, "eos"
                return
            logits = await asyncio.to_thread(self.engine.next_logits)
            token = self.choose(logits, allowed)
            self.engine.append([token])
            self.rec.tokens.append(token)
            self.rec.usage.local_tokens += 1
            self.tail_origin = LOCAL
            yield token, self.decoder.push([token])
            if token in self.eos:
                self.finished, self.rec.finish_reason = True, "eos"
                return

    def allowed(self) -> Any:
        """What the grammar admits after the committed tokens (None: no grammar on the device)."""
        if self.grammar is None:
            return None
        self.grammar.sync(self.rec.tokens)
        return self.grammar.mask().allowed

    def choose(self, logits: Any, allowed: Any = None) -> int:
        """The device's own next token: its argmax, or a sample at the run's temperature (over
        what the grammar admits, given `allowed`)."""
        import torch

        from ...local_runtime.grammar import apply_mask
        from ...local_runtime.sampling import logits_to_probs

        if allowed is not None:
            logits = apply_mask(logits, allowed)
        if self.sampling.greedy:
            return int(torch.argmax(logits))
        probs = logits_to_probs(logits, self.sampling.temperature, self.sampling.top_p)
        return int(torch.multinomial(probs.float(), 1, generator=self._generator))

    def draft_controller(self) -> DraftLengthController:
        """k per round: from the link estimate ("auto"), or the fixed k asked for."""
        o, estimate = self.options, self.link.estimate
        if o.draft_len == "auto":
            return DraftLengthController(estimate, k_max=o.max_draft_len, pipeline=o.pipeline)
        return FixedDraftLength(int(o.draft_len), estimate)

    def account(self, k: int, accepted: int, emitted: list[int], candidates: int, draft_s: float, verify_s: float,
                controller=None) -> None:
        """One verify round into the record (and the draft-length controller, when there is one)."""
        kept = min(accepted, len(emitted))
        u = self.rec.usage
        u.rounds += 1
        u.accepted_tokens += kept
        u.cloud_tokens += len(emitted) - kept
        u.tested_tokens += accepted + (1 if accepted < candidates else 0)
        self.rec.tokens.extend(emitted)
        self.rec.rounds.append(Round(candidates, accepted, len(emitted), draft_s, verify_s))
        if controller is not None:
            controller.observe(candidates, accepted, draft_s, verify_s)


__all__ = ["SessionRun"]
