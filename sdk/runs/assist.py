"""The `assist` mode: the device writes, and asks the cloud only for the tokens it is unsure of.

    loop: the device model proposes its next token t
          a token router scores t (confidence, entropy, or the learned reward head)
          score >= threshold  -> keep t: it joins the text, nothing travels
          score <  threshold  -> send the device's tokens since the last call (the gateway takes
                                 them as they are) and take the cloud model's next token instead

Lossy by design: the output is the device's except where the router escalated. Cheaper than
speculation (one cloud forward pass per escalation, none for kept tokens); the threshold trades
cloud calls for agreement with the cloud model. With different tokenizers the same happens in
text: the device sends the text of its pending tokens, the gateway tokenises it, and the
cloud's token comes back as text for the device to re-tokenise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ...local_runtime.models import LoadedModel
from ...protocols.errors import TandemError
from ...protocols.messages import AppendRequest, OpenSession
from ..usage import CLOUD, LOCAL, Piece, Round
from .base import SessionRun
from .link import session_lost

# Device tokens that may wait for the next cloud call; past this the device asks anyway, which
# keeps every append small.
MAX_PENDING = 256


class AssistRun(SessionRun):
    """`text_space`: the target tokenises differently (`GatewayLink.shares_tokenizer` said so)."""

    def __init__(self, *args, text_space: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from ...routing.base import get_token_router

        o = self.options
        if o.token_router == "reward" and not isinstance(self.device.model, LoadedModel):
            raise TandemError(
                f"the reward token router reads the device model's hidden state, which the "
                f"'{self.device.backend}' backend does not expose; use a torch drafter or another router"
            )
        self.router = get_token_router(o.token_router)
        self.tap = None
        if o.token_router == "reward":
            from ...routing.token import HiddenStateTap

            self.tap = HiddenStateTap(self.device.model)
        self.text_space = text_space
        self.grammar = None if text_space else o.grammar(self.device)  # across tokenizers: the target's only
        self.base = o.prompt_ids(self.tok)
        self.engine.append(self.base)
        self.pending: list[int] = []  # device tokens the gateway has not seen yet
        self.synced_text = 0  # text space: characters of the device's text the gateway has seen
        self.session_base = 0  # text space: where the current session's own text starts
        self.cloud_position = 0  # text space: target tokens the gateway has generated

    def open_msg(self) -> OpenSession:
        """A session for the prompt plus everything generated so far (a re-open starts there)."""
        if self.text_space:
            return self.options.open_text(self.decoder.text, self.remaining)
        return self.options.open_tokens(self.base, self.rec.tokens, self.tok.fingerprint, self.remaining)

    def after_rejoin(self) -> None:
        self.pending, self.synced_text, self.cloud_position = [], len(self.decoder.text), 0
        self.session_base = self.synced_text

    async def run(self) -> AsyncIterator[str]:
        try:
            async for piece in super().run():
                yield piece
            self.rec.finish_reason = self.rec.finish_reason or ("eos" if self.finished else "length")
        finally:
            if self.tap is not None:
                self.tap.close()
            o = self.options
            self.rec.decision = {**(self.rec.decision or {}), "token_router": o.token_router, "threshold": o.assist_threshold}

    async def round(self) -> AsyncIterator[str]:
        from ...routing.base import TokenContext, token_to_cloud

        engine, rec = self.engine, self.rec
        allowed = self.allowed()
        logits = await asyncio.to_thread(engine.next_logits)
        t = self.choose(logits, allowed)
        score = self.router.score(TokenContext(logits, hidden=self.tap.last_row() if self.tap else None, tokens=engine.tokens), t)
        ask = token_to_cloud(score, self.options.assist_threshold) or len(self.pending) >= MAX_PENDING
        if ask and self.text_space and self.decoder.pending_text():
            ask = False  # the device's text ends mid-character: finish it first
        if not ask:
            engine.append([t])
            self.pending.append(t)
            rec.tokens.append(t)
            rec.usage.local_tokens += 1
            self.tail_origin = LOCAL
            if piece := self.decoder.push([t]):
                yield Piece(piece, LOCAL)
            if t in self.eos:
                self.finished, rec.finish_reason = True, "eos"
            return
        if self.text_space:
            req = AppendRequest(session_id=self.session_id, position=self.cloud_position,
                                text=self.decoder.text[self.synced_text:], text_offset=self.synced_text - self.session_base)
        else:
            req = AppendRequest(session_id=self.session_id, position=len(self.base) + len(rec.tokens) - len(self.pending),
                                tokens=self.pending)
        try:
            res = await self.link.request(req)
        except TandemError as exc:
            if not session_lost(exc):
                raise
            # a new session re-prefilled with everything so far (None: the device writes on alone)
            self.session_id = await self.link.open(self.open_msg())
            self.after_rejoin()
            return
        rec.usage.rounds += 1
        rec.rounds.append(Round(len(self.pending), len(self.pending), len(self.pending) + (res.next_token is not None)))
        self.pending = []
        if self.text_space:
            cloud_ids = self.tok.encode(res.text) if res.text else []
            self.cloud_position = res.position
            self.synced_text = self.session_base + (res.text_offset or 0)
        else:
            cloud_ids = [res.next_token] if res.next_token is not None else []
        engine.append(cloud_ids)
        rec.tokens.extend(cloud_ids)
        rec.usage.cloud_tokens += 1 if res.next_token is not None else 0
        self.tail_origin = CLOUD
        if piece := self.decoder.push(cloud_ids):
            yield Piece(piece, CLOUD)
        if res.finished:
            self.finished, rec.finish_reason = True, res.finish_reason


__all__ = ["AssistRun", "MAX_PENDING"]
