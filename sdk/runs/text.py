"""Speculative decoding across tokenizers: drafts travel as text.

The device drafts k tokens in its own vocabulary and sends their text (never half a character;
a control token ends the draft, and its end-of-answer token becomes `draft_eos`). The gateway
verifies it against the target's tokenisation and answers with the target's own text, so both
sides agree on the generated text; the device then re-synchronises its cache to it (`resync`).
Greedy only: no lossless cross-vocabulary sampling rule is implemented.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

from ...local_runtime.text import IncrementalDecoder
from ...protocols.errors import TandemError, TokenizerMismatchError
from ...protocols.messages import OpenSession, VerifyTextRequest
from ..usage import ACCEPTED, CLOUD, Piece
from .base import SessionRun
from .link import session_lost


class TextSpeculation(SessionRun):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.sampling.greedy:
            raise TokenizerMismatchError(
                f"drafter '{self.device.name}' and the gateway's model use different tokenizers; speculative "
                "sampling across tokenizers is not supported (no lossless cross-vocabulary rule is implemented). "
                "Use temperature 0, mode 'cloud', or a drafter that shares the target's tokenizer."
            )
        o = self.options
        self.controller = self.draft_controller()
        self.base = o.prompt_ids(self.tok)
        self.engine.append(self.base)
        self.gen: list[int] = []  # the drafter's tokens for `committed`
        self.committed = ""
        self.session_base = 0  # len(committed) when the current session opened (it counts from there)
        self.session_tokens = 0  # target tokens appended in the current session

    def open_msg(self) -> OpenSession:
        return self.options.open_text(self.committed, self.remaining)

    def before_offline(self) -> None:
        self.engine.truncate(len(self.base) + len(self.gen))
        self.decoder = IncrementalDecoder(self.tok.decode, skip_ids=self.tok.special_ids)
        self.decoder.push(self.gen)

    def on_local_token(self, token: int, piece: str) -> None:
        self.gen.append(token)
        self.committed += piece

    def after_rejoin(self) -> None:
        # the new session starts at the last whole character; the drafter re-reads that text
        self._new_session()
        self.engine.truncate(len(self.base))
        self.gen = self.tok.encode(self.committed)
        self.engine.append(self.gen)
        self.decoder = IncrementalDecoder(self.tok.decode, skip_ids=self.tok.special_ids)

    def _new_session(self) -> None:
        self.session_base, self.session_tokens = len(self.committed), 0

    async def round(self) -> AsyncIterator[str]:
        tok, engine, rec = self.tok, self.engine, self.rec
        t0 = time.perf_counter()
        draft = await asyncio.to_thread(self.engine.draft, self.controller.next_k())
        draft_s = time.perf_counter() - t0
        # a control token ends the draft; the drafter's end-of-answer becomes a proposal to stop
        cut = next((i for i, t in enumerate(draft.tokens) if t in tok.special_ids), len(draft.tokens))
        eos = cut < len(draft.tokens) and draft.tokens[cut] in tok.eos_token_ids
        proposed = draft.tokens[:cut]
        text = tok.decode(self.gen + proposed)
        draft_text = text[len(self.committed) :] if text.startswith(self.committed) else tok.decode(proposed)
        if draft_text.endswith("\ufffd"):  # never propose half a character
            draft_text, eos = draft_text.rstrip("\ufffd"), False
        req = VerifyTextRequest(
            session_id=self.session_id, position=self.session_tokens, text_offset=len(self.committed) - self.session_base,
            draft_text=draft_text, draft_eos=eos, draft_tokens=len(proposed),
        )
        t1 = time.perf_counter()
        try:
            result = await self.link.request(req)
        except TandemError as exc:
            if not session_lost(exc):
                raise
            engine.truncate(len(self.base) + len(self.gen))  # re-open after the committed text
            self.session_id = await self.link.open(self.open_msg())
            self._new_session()
            return
        verify_s = time.perf_counter() - t1
        self.committed += result.text
        self.session_tokens += len(result.tokens)
        self.gen = resync(tok, engine, len(self.base), self.gen, proposed, self.committed)
        rec.usage.local_tokens += len(draft.tokens)
        self.account(len(proposed), result.accepted, result.tokens, result.candidates, draft_s, verify_s, self.controller)
        # the part of the target's text that the draft proposed was accepted; the rest is its own
        accepted = len(os.path.commonprefix([result.text, draft_text]))
        if accepted:
            yield Piece(result.text[:accepted], ACCEPTED)
        if accepted < len(result.text):
            yield Piece(result.text[accepted:], CLOUD)
        if result.finished:
            self.finished, rec.finish_reason = True, result.finish_reason


def resync(tok, engine, base: int, gen: list[int], proposed: list[int], committed: str) -> list[int]:
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


__all__ = ["TextSpeculation", "resync"]
