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

Supported: model, messages (system/developer/user/assistant/tool; text content or text parts;
assistant tool_calls), max_tokens / max_completion_tokens, temperature, top_p, seed, stop (up to 4
sequences), n=1, stream, stream_options.include_usage, logprobs / top_logprobs (the target's own
log-probabilities, before temperature and top-p), tools / tool_choice / parallel_tool_calls and
response_format text / json_object / json_schema (grammar-constrained: openai_tools.py),
presence_penalty and frequency_penalty of 0, an empty logit_bias; `user` and `metadata` are
accepted and ignored. Everything else is refused with a 400 that names the field (`param`): the
legacy functions / function_call, n > 1, non-zero penalties, logit_bias, audio. Unknown fields are
refused too, as OpenAI does, rather than silently ignored.

A completion reserves its prompt and max_tokens from the key's token budget up front (or what is
left of it: it then stops there, finish_reason "length") and gives back what it did not use. A
client that disconnects, streaming or not, cancels its completion: the session is closed and its
cache freed at once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..protocols.errors import GatewayError, gateway_error
from ..protocols.messages import ErrorReply, GenerateRequest, SamplingParams
from .auth import Principal
from .openai_tools import ToolCallStream, message_calls, message_of, request_structure

DEFAULT_MAX_TOKENS = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = Field(None, max_length=200_000)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, max_length=200_000)
    tool_calls: list[dict] | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are refused by name in `refuse_unsupported`

    model: str = Field(max_length=512)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[str, Field(max_length=256)] | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=4)] | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[dict] | None = Field(None, max_length=128)
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=512)
    metadata: dict[str, str] | None = None


# fields of OpenAI's API this gateway does not implement, and why (the 400 says so)
UNSUPPORTED = {
    "functions": "the legacy function-calling fields are not supported: use tools and tool_choice",
    "function_call": "the legacy function-calling fields are not supported: use tools and tool_choice",
    "audio": "audio output is not supported by this gateway",
    "modalities": "only text output is supported by this gateway",
    "prediction": "predicted outputs are not supported by this gateway",
    "web_search_options": "web search is not supported by this gateway",
    "reasoning_effort": "this gateway's model has no reasoning-effort setting",
    "store": "this gateway does not store completions",
    "service_tier": "this gateway has one service tier",
}


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """A 400 naming the first field asked for that this gateway would otherwise silently ignore."""

    def refuse(field: str, why: str) -> None:
        raise gateway_error("bad_request", f"{field}: {why}", detail={"param": field})

    for field in req.model_extra or {}:
        refuse(field, UNSUPPORTED.get(field, "unknown field (not part of the chat completions API this gateway serves)"))
    if req.response_format is not None and req.response_format.get("type") not in ("text", "json_object", "json_schema"):
        refuse("response_format", f"type {req.response_format.get('type')!r}: give text, json_object or json_schema")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(req, field):
            refuse(field, "penalties are not supported by this gateway (only 0)")
    if req.logit_bias:
        refuse("logit_bias", "logit bias is not supported by this gateway")
    if req.top_logprobs is not None and not req.logprobs:
        refuse("top_logprobs", "top_logprobs needs logprobs: true")


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise gateway_error("bad_request", f"messages.{i}.content: only text parts are supported")
            content = "".join(p.text for p in m.content)
        else:
            content = m.content or ""
        turn = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if calls := message_calls(m.tool_calls, f"messages.{i}"):
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise gateway_error("bad_request", "stop: stop sequences must not be empty")
    return stops


class _Completion:
    """One chat completion: drives a gateway session step by step and yields text pieces (with
    the log-probabilities of their tokens, when asked), holding back what might be the start of a
    stop sequence."""

    def __init__(self, gateway, principal: Principal, req: ChatCompletionRequest) -> None:
        refuse_unsupported(req)
        if req.model != gateway.model_name:
            raise gateway_error("unknown_model", f"this gateway serves '{gateway.model_name}', not '{req.model}'")
        self.gateway = gateway
        self.principal = principal
        tok = gateway.lm.tokenizer
        max_new = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, gateway.limits.max_new_tokens)
        self.tools, constraint = request_structure(req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format)
        self.tool_choice = req.tool_choice
        prompt = gateway.chat_prompt(_messages(req), max_new, self.tools)  # every size check, before any request object
        temperature = 1.0 if req.temperature is None else req.temperature
        sampling = SamplingParams(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed)
        self.request = GenerateRequest(
            prompt_tokens=prompt, tokenizer_fingerprint=tok.fingerprint, sampling=sampling, max_new_tokens=max_new,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None, constraint=constraint,
        )
        self.stops = _stops(req.stop)
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    async def start(self) -> None:
        """Open the session now, so that limits and bad requests answer before any streaming."""
        self.chunks = await self.gateway.generate(self.request, self.principal)

    def _logprob(self, lp) -> dict:
        text = self.gateway.lm.tokenizer.text

        def one(token: int, logprob: float) -> dict:
            t = text([token])
            return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

        return {**one(lp.token, lp.logprob), "top_logprobs": [one(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs)]}

    async def pieces(self) -> AsyncIterator[tuple[str, list[dict]]]:
        """(text, log-probability entries) as the target decodes (cloud mode's stream), cut at
        the first stop sequence; text that might be the start of one is held back until it
        cannot be, and a token's entry goes out with the text that holds its end."""
        text, sent = "", 0
        entries: list[tuple[int, dict]] = []  # (end of the token's text in `text`, entry)
        hold = max((len(s) for s in self.stops), default=1) - 1
        chunks = self.chunks

        def upto(end: int) -> tuple[str, list[dict]]:
            nonlocal sent, entries
            out = [e for pos, e in entries if pos <= end]
            entries = [(pos, e) for pos, e in entries if pos > end]
            piece, sent = text[sent:end], max(sent, end)
            return piece, out

        try:
            async for chunk in chunks:
                self.completion_tokens += len(chunk.tokens)
                text += chunk.text
                for lp in chunk.logprobs or []:
                    entries.append((len(text), self._logprob(lp)))
                cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    self.finish_reason = "stop"
                    piece, out = upto(cut)
                    if piece or out:
                        yield piece, out
                    return
                if chunk.finished:
                    self.finish_reason = "stop" if chunk.finish_reason == "eos" else "length"
                    piece, out = upto(len(text))
                    if piece or out:
                        yield piece, out
                    return
                safe = len(text) - hold
                if safe > sent:
                    yield upto(safe)
        finally:
            await chunks.aclose()  # a stop sequence or a client gone: the session is closed now

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


async def until_disconnected(request: Request, work: Awaitable[Any], poll_s: float = 0.2) -> Any:
    """Await `work`, cancelling it if the client disconnects first (then raises CancelledError)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("the client disconnected")
    finally:
        if not task.done():
            task.cancel()


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
    async def chat_completions(req: ChatCompletionRequest, request: Request, who: Principal = Depends(principal_dep)):
        completion = _Completion(gateway, who, req)
        await completion.start()
        cid = "chatcmpl-" + secrets.token_hex(12)
        now = int(time.time())
        base = {"id": cid, "created": now, "model": gateway.model_name, "system_fingerprint": gateway.lm.tokenizer.fingerprint}

        def logprobs(entries: list[dict] | None) -> dict | None:
            return {"content": entries, "refusal": None} if req.logprobs else None

        if not req.stream:
            async def collect() -> tuple[str, list[dict]]:
                text, entries = "", []
                async for piece, out in completion.pieces():
                    text, entries = text + piece, entries + out
                return text, entries

            text, entries = await until_disconnected(request, collect())
            message, called = message_of(text, completion.tools, completion.tool_choice)
            return JSONResponse({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if called else completion.finish_reason,
                             "logprobs": logprobs(entries)}],
                "usage": completion.usage(),
            })

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def event(choices: list, **extra) -> str:
            return "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

        calls = ToolCallStream([t["name"] for t in completion.tools]) if completion.tools and completion.tool_choice != "none" else None

        async def sse():
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
            try:
                async for piece, out in completion.pieces():
                    deltas = [{"content": piece}] if calls is None else calls.feed(piece)
                    for i, delta in enumerate(deltas or ([{}] if out else [])):
                        yield event([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": logprobs(out) if i == 0 else None}])
                for delta in [] if calls is None else calls.feed("", final=True):
                    yield event([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])
            except GatewayError as exc:
                yield "data: " + json.dumps({"error": {"message": exc.message, "type": exc.code, "code": exc.code}}) + "\n\n"
                return
            reason = "tool_calls" if calls is not None and calls.has_calls else completion.finish_reason
            yield event([{"index": 0, "delta": {}, "finish_reason": reason, "logprobs": None}])
            if include_usage:
                yield event([], usage=completion.usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return router


__all__ = ["openai_router", "ChatCompletionRequest"]
