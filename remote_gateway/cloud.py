"""Cloud mode: the target decodes alone (`/v1/generate`, and every OpenAI chat completion).

A generation is a session like any other: opened first (so limits and bad requests answer
before streaming starts), then decoded one step at a time as `append` requests with no tokens.
The steps go through the batcher, where the steps of every streaming session share one forward
pass with each other and with devices' verifies (iteration-level batching), and the session
counts against the same caps and budgets as a device's.

Budget: the prompt and `max_new_tokens` are reserved from the key's token budget up front (or
what is left of it: the generation then stops there, finish_reason `length`), and what is not
generated is given back at the end (limits.py). A session evicted mid-generation is re-opened
where it was (its re-prefill is charged as a debt: the gateway forced it). A caller that goes
away closes the session at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from ..local_runtime.text import IncrementalDecoder
from ..protocols.errors import GatewayError, SessionEvictedError
from ..protocols.messages import (
    AppendRequest, AppendResult, CloseSession, GenerateChunk, GenerateRequest, OpenSession, SessionClosed, SessionOpened,
)
from .auth import Principal
from .limits import RateLimiter


class SessionHost(Protocol):
    """What cloud mode needs of a gateway (service.py's `Gateway` is one): the sessions a device
    uses, opened from a prompt already in tokens, and the key budgets."""

    limiter: RateLimiter
    lm: Any  # tokenizer: the fingerprint, decode and control ids

    def prompt_of(self, req: GenerateRequest) -> list[int]: ...

    async def open_prompt(
        self, req: OpenSession, principal: Principal, prompt: list[int], *, charge: Literal["strict", "none", "debt"]
    ) -> SessionOpened: ...

    async def append(self, req: AppendRequest, principal: Principal | None = None, *, charge: bool = True) -> AppendResult: ...

    async def close_session(self, req: CloseSession, principal: Principal | None = None) -> SessionClosed: ...


async def generate(gw: SessionHost, req: GenerateRequest, principal: Principal) -> AsyncIterator[GenerateChunk]:
    prompt = gw.prompt_of(req)  # whatever form the prompt came in, a token session decodes it
    granted = gw.limiter.reserve(principal, len(prompt), req.max_new_tokens)
    open_req = OpenSession(
        prompt_tokens=prompt, tokenizer_fingerprint=gw.lm.tokenizer.fingerprint, sampling=req.sampling,
        max_new_tokens=granted, model=req.model, constraint=req.constraint,
    )
    try:
        opened = await gw.open_prompt(open_req, principal, prompt, charge="none")
    except BaseException:
        gw.limiter.refund(principal, len(prompt) + granted)
        raise
    return _decode(gw, open_req, opened, principal, req.top_logprobs)


async def _decode(
    gw: SessionHost, open_req: OpenSession, opened: SessionOpened, principal: Principal, top_logprobs: int | None
) -> AsyncIterator[GenerateChunk]:
    tok = gw.lm.tokenizer
    decoder = IncrementalDecoder(tok.decode, skip_ids=tok.special_ids)
    sid, pos, generated, finished = opened.session_id, opened.position, [], False
    try:
        while not finished:
            step = AppendRequest(session_id=sid, position=pos, tokens=[], top_logprobs=top_logprobs)
            try:
                r = await gw.append(step, principal, charge=False)  # reserved up front
            except SessionEvictedError:
                resumed = open_req.model_copy(update={"resume_tokens": list(generated)})
                opened = await gw.open_prompt(resumed, principal, list(open_req.prompt_tokens), charge="debt")
                sid, pos = opened.session_id, opened.position
                continue
            generated += r.tokens
            pos, finished = r.position, r.finished
            text = decoder.push(r.tokens) + (decoder.flush() if finished else "")
            yield GenerateChunk(
                tokens=r.tokens, text=text, finished=finished, finish_reason=r.finish_reason,
                logprobs=None if r.logprobs is None else [r.logprobs],
            )
    finally:
        gw.limiter.refund(principal, open_req.max_new_tokens - len(generated))
        if not finished:  # the caller went away (or failed): free the cache now
            try:
                await gw.close_session(CloseSession(session_id=sid), principal)
            except GatewayError:
                pass


__all__ = ["SessionHost", "generate"]
