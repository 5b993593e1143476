"""The two modes with one side only: `local` (the device model alone) and `cloud` (the gateway's
model alone, streamed: the baseline every other mode is measured against)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ...local_runtime.text import IncrementalDecoder
from ...protocols.errors import TandemError
from ...protocols.messages import GenerateRequest
from ..usage import CLOUD, LOCAL, GenerationRecord, Piece
from .link import GatewayLink, unreachable
from .options import DeviceModel, RunOptions


async def run_local(options: RunOptions, device: DeviceModel, rec: GenerationRecord) -> AsyncIterator[str]:
    tok = device.tokenizer
    async for piece in _alone(device, options.prompt_ids(tok), options.max_new_tokens, options, rec):
        yield piece


async def _alone(device: DeviceModel, ids: list[int], n: int, options: RunOptions, rec: GenerationRecord,
                 done: list[int] = ()) -> AsyncIterator[str]:
    """The device model decoding n tokens after `ids` by itself (`done`: the end of `ids` already
    generated, which a constraint's grammar has seen)."""
    from ...local_runtime.sequence import generate_alone

    tok = device.tokenizer
    s = options.sampling
    grammar = options.grammar(device)
    if grammar is not None and done:  # the device finishes a generation under way
        grammar.sync(done)
    tokens = generate_alone(device.model, ids, n, temperature=s.temperature, top_p=s.top_p, seed=s.seed, grammar=grammar)
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
    """The gateway streams. A stream cut part-way (the replica behind a load balancer died, the
    link dropped) is asked for again, continuing after what has arrived: as token ids when the
    device shares the target's tokenizer (the text then goes on exactly; the device decodes it),
    else as `resume_text`. If the gateway cannot be reached, or a request asked again streams
    nothing, and the options allow it, the device model finishes the answer from the text so far."""
    req = GenerateRequest(**options.gateway_prompt(), sampling=options.sampling, max_new_tokens=options.max_new_tokens,
                          model=options.target, constraint=options.constraint)
    text = ""
    decoder: IncrementalDecoder | None = None  # the device's, once a stream resumes by token ids
    with link.counting(rec.usage):
        while True:
            rec.usage.rounds += 1
            streamed = False
            try:
                async for chunk in link.transport.stream(req):
                    streamed = True
                    rec.tokens.extend(chunk.tokens)
                    rec.usage.cloud_tokens += len(chunk.tokens)
                    if chunk.finished:
                        rec.finish_reason = chunk.finish_reason
                    if decoder is None:
                        piece = chunk.text
                    else:
                        piece = decoder.push(chunk.tokens) + (decoder.flush() if chunk.finished else "")
                    if piece:
                        text += piece
                        yield Piece(piece, CLOUD)
                return
            except TandemError as exc:
                if not unreachable(exc):
                    raise
                if not streamed:  # nothing came: the gateway is away
                    if options.fallback != "local" or device is None:
                        raise
                    break
            remaining = options.max_new_tokens - len(rec.tokens)
            if remaining <= 0:
                rec.finish_reason = "length"
                return
            req, decoder = await _resume(options, link, rec, text, device, remaining)
    rec.usage.fallbacks += 1
    tok = device.tokenizer
    done = tok.encode(text) if text else []
    async for piece in _alone(device, options.prompt_ids(tok) + done, options.max_new_tokens - len(rec.tokens), options, rec, done):
        yield piece


async def _resume(options: RunOptions, link: GatewayLink, rec: GenerationRecord, text: str,
                  device: DeviceModel | None, remaining: int) -> tuple[GenerateRequest, IncrementalDecoder | None]:
    """The request that continues a cut stream after what it sent (`rec.tokens`, whose text is
    `text`), and the decoder its text then comes from (None: the gateway's chunks carry it)."""
    common = dict(sampling=options.sampling, max_new_tokens=remaining, model=options.target, constraint=options.constraint)
    tok = device.tokenizer if device is not None else None
    # under a constraint the text form resumes the gateway's grammar after what was sent
    if tok is not None and options.constraint is None and await link.shares_tokenizer(tok.fingerprint):
        decoder = IncrementalDecoder(tok.decode, skip_ids=tok.special_ids)
        decoder.push(rec.tokens)  # the gateway decoded these by the same rule, into `text`
        ids = options.prompt_ids(tok) + rec.tokens
        return GenerateRequest(prompt_tokens=ids, tokenizer_fingerprint=tok.fingerprint, **common), decoder
    return GenerateRequest(**options.gateway_prompt(), resume_text=text or None, **common), None


__all__ = ["run_local", "run_cloud"]
