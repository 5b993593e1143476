"""OpenAI-compatible routes, so any OpenAI client can use the gateway's model directly:

    GET  /v1/models                 the one model this gateway serves
    GET  /v1/models/{model}
    POST /v1/chat/completions       stream: false -> one chat.completion object
                                    stream: true  -> server-sent events of chat.completion.chunk, then [DONE]

A completion is a session like any other, driven by the gateway itself: the chat is rendered with
the target's template, opened as a token session, and decoded one `append` step at a time. So
concurrent completions share batched forward passes with each other and with devices' verifies,
count against their key's session and token limits, and survive eviction (the session is
re-opened with what it generated so far). Greedy output (temperature 0) is exactly the target's
own decoding. Sampling follows the OpenAI default (temperature 1) when none is given.

Supported: model, messages (system/developer/user/assistant; text content or text parts),
max_tokens / max_completion_tokens, temperature, top_p, seed, stop, n=1, stream,
stream_options.include_usage. Other fields are accepted and ignored; tools and images are refused.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..protocols.errors import GatewayError, gateway_error
from ..protocols.messages import ErrorReply, GenerateRequest, SamplingParams
from .auth import Principal

DEFAULT_MAX_TOKENS = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = Field(None, max_length=200_000)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, max_length=200_000)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=512)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, max_length=4)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        if m.role == "tool":
            raise gateway_error("bad_request", f"messages.{i}: tool messages are not supported by this gateway")
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise gateway_error("bad_request", f"messages.{i}.content: only text parts are supported")
            content = "".join(p.text for p in m.content)
        else:
            content = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise gateway_error("bad_request", "stop: stop sequences must not be empty")
    return stops


class _Completion:
    """One chat completion: drives a gateway session step by step and yields text pieces,
    holding back what might be the start of a stop sequence."""

    def __init__(self, gateway, principal: Principal, req: ChatCompletionRequest) -> None:
        if req.model != gateway.model_name:
            raise gateway_error("unknown_model", f"this gateway serves '{gateway.model_name}', not '{req.model}'")
        self.gateway = gateway
        self.principal = principal
        tok = gateway.lm.tokenizer
        prompt = gateway.render(_messages(req))
        temperature = 1.0 if req.temperature is None else req.temperature
        sampling = SamplingParams(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed)
        max_new = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, gateway.limits.max_new_tokens)
        self.request = GenerateRequest(
            prompt_tokens=prompt, tokenizer_fingerprint=tok.fingerprint, sampling=sampling, max_new_tokens=max_new,
        )
        self.stops = _stops(req.stop)
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    async def start(self) -> None:
        """Open the session now, so that limits and bad requests answer before any streaming."""
        self.chunks = await self.gateway.generate(self.request, self.principal)

    async def pieces(self) -> AsyncIterator[str]:
        """The text as the target decodes it (cloud mode's stream), cut at the first stop
        sequence; text that might be the start of one is held back until it cannot be."""
        text, sent = "", 0
        hold = max((len(s) for s in self.stops), default=1) - 1
        chunks = self.chunks
        try:
            async for chunk in chunks:
                self.completion_tokens += len(chunk.tokens)
                text += chunk.text
                cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    self.finish_reason = "stop"
                    if cut > sent:
                        yield text[sent:cut]
                    return
                if chunk.finished:
                    self.finish_reason = "stop" if chunk.finish_reason == "eos" else "length"
                    if len(text) > sent:
                        yield text[sent:]
                    return
                safe = len(text) - hold
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        finally:
            await chunks.aclose()  # a stop sequence or a client gone: the session is closed now

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def openai_router(gateway, principal_dep) -> APIRouter:
    router = APIRouter(tags=["openai"])
    created = int(time.time())
    errors = {s: {"model": ErrorReply} for s in (400, 401, 404, 413, 429)}

    def model_card() -> dict:
        return {"id": gateway.model_name, "object": "model", "created": created, "owned_by": "tandem"}

    @router.get("/v1/models", responses=errors, dependencies=[Depends(principal_dep)])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model:path}", responses=errors, dependencies=[Depends(principal_dep)])
    async def get_model(model: str) -> dict:
        if model != gateway.model_name:
            raise gateway_error("unknown_model", f"this gateway serves '{gateway.model_name}', not '{model}'")
        return model_card()

    @router.post("/v1/chat/completions", responses=errors)
    async def chat_completions(req: ChatCompletionRequest, who: Principal = Depends(principal_dep)):
        completion = _Completion(gateway, who, req)
        await completion.start()
        cid = "chatcmpl-" + secrets.token_hex(12)
        now = int(time.time())
        base = {"id": cid, "created": now, "model": gateway.model_name, "system_fingerprint": gateway.lm.tokenizer.fingerprint}
        if not req.stream:
            text = "".join([p async for p in completion.pieces()])
            return JSONResponse({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": completion.finish_reason, "logprobs": None}],
                "usage": completion.usage(),
            })

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def event(choices: list, **extra) -> str:
            return "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

        async def sse():
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
            try:
                async for piece in completion.pieces():
                    yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None, "logprobs": None}])
            except GatewayError as exc:
                yield "data: " + json.dumps({"error": {"message": exc.message, "type": exc.code, "code": exc.code}}) + "\n\n"
                return
            yield event([{"index": 0, "delta": {}, "finish_reason": completion.finish_reason, "logprobs": None}])
            if include_usage:
                yield event([], usage=completion.usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return router


__all__ = ["openai_router", "ChatCompletionRequest"]
