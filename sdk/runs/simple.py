"""The two modes with one side only: `local` (the device model alone) and `cloud` (the gateway's
model alone, streamed: the baseline every other mode is measured against)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ...local_runtime.text import IncrementalDecoder
from ...protocols.errors import TransportError
from ...protocols.messages import ChatMessage, GenerateRequest
from ..usage import CLOUD, LOCAL, GenerationRecord, Piece
from .link import GatewayLink
from .options import DeviceModel, RunOptions


async def run_local(options: RunOptions, device: DeviceModel, rec: GenerationRecord) -> AsyncIterator[str]:
    tok = device.tokenizer
    async for piece in _alone(device, tok.prompt_tokens(options.prompt, options.chat), options.max_new_tokens, options, rec):
        yield piece


async def _alone(device: DeviceModel, ids: list[int], n: int, options: RunOptions, rec: GenerationRecord) -> AsyncIterator[str]:
    """The device model decoding n tokens after `ids` by itself."""
    from ...local_runtime.sequence import generate_alone

    tok = device.tokenizer
    s = options.sampling
    tokens = generate_alone(device.model, ids, n, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    decoder = IncrementalDecoder(tok.decode, skip_ids=tok.eos_token_ids)
    done = object()
    while (t := await asyncio.to_thread(next, tokens, done)) is not done:
        rec.tokens.append(t)
        rec.usage.local_tokens += 1
        if t in tok.eos_token_ids:
            rec.finish_reason = "eos"
        if piece := decoder.push([t]):
            yield Piece(piece, LOCAL)
    rec.finish_reason = rec.finish_reason or "length"
    if tail := decoder.flush():
        yield Piece(tail, LOCAL)


async def run_cloud(options: RunOptions, link: GatewayLink, rec: GenerationRecord,
                    device: DeviceModel | None = None) -> AsyncIterator[str]:
    """The gateway streams; if it goes away mid-answer (or cannot be reached) and the options
    allow it, the device model finishes the answer from the text received so far."""
    prompt = dict(messages=[ChatMessage(role="user", content=options.prompt)]) if options.chat else dict(prompt_text=options.prompt)
    req = GenerateRequest(**prompt, sampling=options.sampling, max_new_tokens=options.max_new_tokens, model=options.target)
    text = ""
    with link.counting(rec.usage):
        rec.usage.rounds += 1
        try:
            async for chunk in link.transport.stream(req):
                rec.tokens.extend(chunk.tokens)
                rec.usage.cloud_tokens += len(chunk.tokens)
                if chunk.finished:
                    rec.finish_reason = chunk.finish_reason
                if chunk.text:
                    text += chunk.text
                    yield Piece(chunk.text, CLOUD)
            return
        except TransportError:
            if options.fallback != "local" or device is None:
                raise
    rec.usage.fallbacks += 1
    tok = device.tokenizer
    resume = tok.prompt_tokens(options.prompt, options.chat) + (tok.encode(text) if text else [])
    async for piece in _alone(device, resume, options.max_new_tokens - len(rec.tokens), options, rec):
        yield piece


__all__ = ["run_local", "run_cloud"]
