"""Speculative decoding in token space (drafter and target share a tokenizer).

    open session (prompt ids)                      -> the gateway prefills
    round: draft k ids -> verify -> keep the accepted prefix + the target's next id

- draft length: the controller picks k each round from the link estimate (or a fixed k);
- pipelining: while a verify is in flight the device keeps drafting as if every draft will be
  accepted; when the target's next token equals the first extra draft, the rest of the extra
  block survives into the next round;
- a session that is lost (expired, evicted, or its replica gone: `session_lost`) is re-opened
  where it was; a gateway that cannot be reached hands over to the device alone (base.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ...local_runtime.draft import Draft
from ...protocols.errors import TandemError
from ...protocols.messages import OpenSession, SparseDist, VerifyRequest
from ..usage import ACCEPTED, CLOUD, Piece
from .base import SessionRun
from .link import session_lost


MAX_FORCED_DRAFT = 32  # drafts in one verify when a grammar forces some of them (the gateway's default limit)


class TokenSpeculation(SessionRun):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        self.controller = self.draft_controller()
        self.prompt_ids = o.prompt_ids(self.tok)
        self.engine.append(self.prompt_ids)
        self.grammar = o.grammar(self.device)
        self.pre = self._no_draft()  # drafts that survived the last round (pipelining)

    def _no_draft(self) -> Draft:
        return Draft.empty(sampled=not self.sampling.greedy)

    @property
    def position(self) -> int:
        return len(self.prompt_ids) + len(self.rec.tokens)

    def open_msg(self) -> OpenSession:
        return self.options.open_tokens(self.prompt_ids, self.rec.tokens, self.tok.fingerprint, self.remaining)

    def before_offline(self) -> None:
        self.engine.truncate(self.position)
        self.pre = self._no_draft()

    def _draft(self, k: int) -> Draft:
        """k drafts after everything in the engine; under a grammar, forced tokens come free on
        top of k, up to what one verify may carry."""
        s = self.sampling
        if self.grammar is None:
            return self.engine.draft(k, temperature=s.temperature, top_p=s.top_p, generator=self._generator)
        self.grammar.sync(self.engine.tokens[len(self.prompt_ids) :])
        room = min(self.link.max_draft_tokens or MAX_FORCED_DRAFT, MAX_FORCED_DRAFT, self.remaining - 1)
        return self.engine.draft(min(k, room), temperature=s.temperature, top_p=s.top_p, generator=self._generator,
                                 grammar=self.grammar, max_len=room)

    async def _draft_while(self, pending: asyncio.Future, limit: int) -> Draft:
        """Draft one token at a time until the verify answers (or `limit` tokens)."""
        extra = self._no_draft()
        while not pending.done() and len(extra) < limit:
            extra = extra + await asyncio.to_thread(self._draft, 1)
        return extra

    async def round(self) -> AsyncIterator[str]:
        engine, rec, pos = self.engine, self.rec, self.position
        k = max(len(self.pre), min(self.controller.next_k(), self.remaining - 1))
        k = max(0, min(k, self.remaining - 1))
        if len(self.pre) > k:  # the budget shrank below what survived
            engine.truncate(pos + k)
            self.pre = self.pre.head(k)
        t0 = time.perf_counter()
        fresh = await asyncio.to_thread(self._draft, k - len(self.pre))
        draft = self.pre + fresh
        draft_s = time.perf_counter() - t0
        req = VerifyRequest(
            session_id=self.session_id, position=pos, draft_tokens=draft.tokens, draft_probs=draft.probs,
            draft_dists=None if draft.dists is None else [SparseDist(ids=i, probs=p) for i, p in draft.dists],
        )
        t1 = time.perf_counter()
        pending = asyncio.ensure_future(self.link.request(req))
        extra = await self._draft_while(pending, k + 1) if self.options.pipeline and k < self.remaining - 1 else None
        try:
            result = await pending
        except TandemError as exc:
            if not session_lost(exc):
                raise
            engine.truncate(pos)  # re-open where it was (None: the device goes on alone)
            self.pre = self._no_draft()
            self.session_id = await self.link.open(self.open_msg())
            return
        verify_s = time.perf_counter() - t1
        kept = min(result.accepted, len(result.tokens))
        survived = (
            extra is not None and extra.tokens and result.accepted == len(draft) and not result.finished
            and result.next_token == extra.tokens[0]
        )
        if survived:
            self.pre = extra.tail(1)  # the engine already holds the committed tokens and these
        else:
            engine.truncate(pos + kept)
            engine.append(result.tokens[kept:])
            self.pre = self._no_draft()
        rec.usage.local_tokens += len(fresh) + (len(extra) if extra else 0)
        rec.usage.forced_tokens += sum(draft.forced[:kept])
        self.account(len(draft), result.accepted, result.tokens, len(draft), draft_s, verify_s, self.controller)
        # the accepted drafts, then the target's own token(s), each coloured by who produced it
        for tokens, origin in ((result.tokens[:kept], ACCEPTED), (result.tokens[kept:], CLOUD)):
            if tokens:
                self.tail_origin = origin
                if piece := self.decoder.push(tokens):
                    yield Piece(piece, origin)
        if result.finished:
            self.finished, rec.finish_reason = True, result.finish_reason


__all__ = ["TokenSpeculation"]
