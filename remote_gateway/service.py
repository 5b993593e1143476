"""The gateway's core, free of HTTP: messages in, messages (or GatewayError) out.

The FastAPI app (`app.py`), the in-process transport and other fronts all call this object, so
every transport sees the same behaviour. Each public method takes the caller's `principal` (the
API key it authenticated with; anonymous when none): sessions belong to it, and its limits apply.

Model work runs on one worker thread: torch already uses every core for one forward pass, and a
single worker keeps the event loop free for I/O. Verify and append requests from different
sessions meet in the `Batcher`, which runs them as one packed forward pass (batching.py).

A request's life: checks (limits, position, replay) under the session's lock -> its tokens are
appended to the session's engine -> the batcher computes their logits rows together with other
sessions' -> the accept rule decides on the worker -> reply. Only then is the lock released, even
when the caller has gone away, so a session's cache never runs ahead of its bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..local_runtime.loaded import render_chat
from ..local_runtime.models import DEFAULT_TARGET, LoadedModel
from ..local_runtime.text import IncrementalDecoder
from ..protocols.errors import GatewayError, gateway_error
from ..protocols.messages import (
    AppendRequest,
    AppendResult,
    CloseSession,
    GatewayInfo,
    GenerateChunk,
    GenerateRequest,
    GetInfo,
    OpenSession,
    SessionClosed,
    SessionOpened,
    VerifyRequest,
    VerifyResult,
    VerifyTextRequest,
    VerifyTextResult,
)
from . import cloud
from .auth import ANONYMOUS, Principal
from .backends import make_backend
from .batching import Batcher, BatchingConfig, Block
from .limits import GatewayLimits, RateLimiter
from .metrics import GatewayMetrics
from .sessions import Session, SessionStore
from .target import TargetBackend
from .verify import Verifier, replay_key, resumed_text_tokens, session_grammar

log = logging.getLogger(__name__)


class Gateway:
    def __init__(
        self,
        model: str | LoadedModel = DEFAULT_TARGET,
        limits: GatewayLimits | None = None,
        *,
        tie_margin: float | None = None,
        batching: BatchingConfig | None = None,
        backend: TargetBackend | None = None,
        replica_id: str | None = None,
        auth_required: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` (seconds, monotonic) times session expiry and rate limits; tests pass a fake."""
        t_load = time.monotonic()
        batching = batching or BatchingConfig()
        self.limits = limits or GatewayLimits()
        self.backend = backend or make_backend(None, model, batching=batching.enabled, max_sessions=self.limits.max_sessions)
        self.lm = self.backend.lm
        self.tie_margin = tie_margin
        self.replica_id = replica_id or secrets.token_hex(3)
        self.auth_required = auth_required
        self.metrics = GatewayMetrics()
        lim = self.limits
        self.sessions = SessionStore(
            lim.max_sessions, lim.session_ttl_s, replica=self.replica_id, kv_budget_bytes=lim.kv_budget_bytes(),
            on_evict=lambda reason: self.metrics.evictions.labels(reason).inc(), clock=clock,
            bytes_per_token=self.backend.kv_bytes_per_token(),
        )
        self.limiter = RateLimiter(lim.tokens_per_minute_per_key, clock=clock)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-model")
        self.batcher = Batcher(
            self.backend, self._worker, batching, busy=lambda: len(self.sessions), on_batch=self.metrics.observe_batch
        )
        self.metrics.track(lambda: len(self.sessions), self.sessions.kv_bytes_total)
        self.stats = {
            "opened": 0, "verifies": 0, "appends": 0, "drafted": 0, "accepted": 0, "errors": 0,
            "tie_recomputes": 0, "replays": 0,
        }
        self.verifier = Verifier(
            self.lm, self.metrics, self.stats, max_draft_tokens=lim.max_draft_tokens, max_append_tokens=lim.max_append_tokens
        )
        self.ready = True
        self.load_s = time.monotonic() - t_load  # the target loaded (a saved W8A8 copy, or quantised) and set up

    @property
    def model_name(self) -> str:
        return self.lm.name

    def info(self) -> GatewayInfo:
        return GatewayInfo(
            model=self.lm.name,
            tokenizer_fingerprint=self.lm.tokenizer.fingerprint,
            eos_token_ids=self.lm.tokenizer.eos_token_ids,
            vocab_size=self.lm.vocab_size,
            max_draft_tokens=self.limits.max_draft_tokens,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            max_new_tokens=self.limits.max_new_tokens,
            replica=self.replica_id,
            auth=self.auth_required,
            batching=self.batcher.packed,
            target=self.backend.choice.to_dict() if self.backend.choice is not None else None,
            load_s=round(self.load_s, 2),
        )

    async def get_info(self, req: GetInfo | None = None, principal: Principal | None = None) -> GatewayInfo:
        return self.info()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def close(self) -> None:
        """Stop taking work (readiness goes to 503) and let the model worker go."""
        self.ready = False
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- checks shared by open and generate ----------------------------------------------------

    def _check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.lm.name:
            raise gateway_error("unknown_model", f"this gateway serves '{self.lm.name}', not '{requested}'")

    def _check_prompt(self, tokens: list[int], fingerprint: str, max_new_tokens: int) -> None:
        mine = self.lm.tokenizer.fingerprint
        if fingerprint != mine:
            raise gateway_error(
                "tokenizer_mismatch",
                f"the request's tokenizer (fingerprint {fingerprint}) is not the target model "
                f"'{self.lm.name}''s (fingerprint {mine}): token ids would mean different text. "
                "Pair the target with a drafter that shares its tokenizer.",
                detail={"expected": mine, "got": fingerprint},
            )
        if len(tokens) > self.limits.max_prompt_tokens:
            raise gateway_error(
                "too_large", f"prompt of {len(tokens)} tokens exceeds this gateway's limit of {self.limits.max_prompt_tokens}"
            )
        longest = self.backend.max_sequence_tokens
        if longest is not None and len(tokens) + max_new_tokens > longest:
            raise gateway_error(
                "too_large", f"a prompt of {len(tokens)} tokens and max_new_tokens {max_new_tokens} exceed the "
                f"{longest} tokens a session of this gateway's backend can hold",
            )
        if max_new_tokens > self.limits.max_new_tokens:
            raise gateway_error(
                "too_large", f"max_new_tokens {max_new_tokens} exceeds this gateway's limit of {self.limits.max_new_tokens}"
            )
        self._check_ids(tokens, "prompt_tokens")

    def _check_ids(self, tokens: list[int], what: str) -> None:
        vocab = self.lm.vocab_size
        bad = [t for t in tokens if t >= vocab]
        if bad:
            raise gateway_error("bad_request", f"{what} holds ids outside the target's vocabulary of {vocab}: {bad[:5]}")

    def _check_sampling(self, req: OpenSession | GenerateRequest) -> None:
        if not req.sampling.greedy and not self.backend.supports_sampling:
            raise gateway_error(
                "bad_request", f"this gateway's backend verifies greedily only; send temperature 0 (got {req.sampling.temperature})"
            )

    # -- the speculative session ---------------------------------------------------------------

    def prompt_of(self, req: OpenSession | GenerateRequest) -> list[int]:
        """The prompt as target token ids, whichever form it came in, after every check."""
        self._check_model(req.model)
        tok = self.lm.tokenizer
        if req.prompt_tokens is not None:
            prompt, fingerprint = list(req.prompt_tokens), req.tokenizer_fingerprint
        else:
            if req.messages is not None:
                prompt = self.render([m.model_dump(exclude_none=True) for m in req.messages], req.tools)
            else:
                prompt = tok.prompt_tokens(req.prompt_text, chat=False)
            fingerprint = tok.fingerprint
        if req.resume_text:
            prompt = prompt + tok.encode(req.resume_text)
        self._check_prompt(prompt, fingerprint, req.max_new_tokens)
        return prompt

    async def open(self, req: OpenSession, principal: Principal | None = None) -> SessionOpened:
        return await self.open_prompt(req, principal or ANONYMOUS, self.prompt_of(req))

    async def open_prompt(self, req: OpenSession, principal: Principal, prompt: list[int], *, charge: str = "strict") -> SessionOpened:
        """Open a session on `prompt` (already checked). `charge`: strict (refuse over the key's
        budget), debt (charge without refusing: a re-prefill the gateway forced) or none (the
        caller reserved the tokens)."""
        self._check_sampling(req)
        if req.text_space and not req.sampling.greedy:
            raise gateway_error(
                "bad_request",
                "sampling (temperature > 0) is not supported in text-space sessions, where drafter and target "
                "tokenizers differ: no lossless cross-vocabulary sampling rule is implemented. Use temperature 0, "
                "or a drafter that shares the target's tokenizer.",
            )
        resume = list(req.resume_tokens or [])
        if resume:
            self._check_ids(resume, "resume_tokens")
            if len(resume) >= req.max_new_tokens:
                raise gateway_error("bad_request", f"resume_tokens ({len(resume)}) already use up max_new_tokens ({req.max_new_tokens})")
            if set(resume) & set(self.lm.tokenizer.eos_token_ids):
                raise gateway_error("bad_request", "resume_tokens hold an end-of-sequence token: that generation has finished")
        grammar = await asyncio.to_thread(session_grammar, self.lm, req, prompt, resume)  # compiling may take a while
        if charge != "none":
            self.limiter.charge(principal, len(prompt) + len(resume), strict=charge == "strict")
        engine = self.backend.new_engine(self.tie_margin)
        engine.append(prompt + resume)
        tok = self.lm.tokenizer
        session = Session(
            id=self.sessions.new_id(),
            engine=engine,
            sampling=req.sampling,
            max_new_tokens=req.max_new_tokens,
            prompt_len=len(prompt),
            rng=np.random.default_rng(req.sampling.seed),
            owner=principal.id,
            text_space=req.text_space,
            decoder=IncrementalDecoder(tok.decode, skip_ids=tok.special_ids),
            generated=len(resume),
            grammar=grammar,
            grammar_from=len(prompt) - resumed_text_tokens(self.lm, req),
        )
        if resume:
            session.decoder.push(resume)
            session.text = session.decoder.text
            session.text_pending = len(session.decoder.pending_text()) > 0
        engine_len = len(prompt) + len(resume)
        try:
            self.sessions.add(session, max_per_key=self._session_cap(principal), need_bytes=self.sessions.bytes_for(engine_len))
        except BaseException:
            engine.release()
            raise
        try:
            if engine_len > 1:
                # prefill everything but the last token (each verify starts by feeding it), in chunks so that
                # other sessions' verifies interleave; a backend whose exact split fixes the pieces names them
                async with session.lock:
                    chunk = max(1, getattr(self.backend, "prefill_chunk", None) or self.limits.prefill_chunk_tokens)
                    for upto in [*range(chunk, engine_len - 1, chunk), engine_len - 1]:
                        await self._run(self.backend.fill, engine, upto)
        except BaseException:
            self.sessions.discard(session.id)
            self.sessions.end(session)
            raise
        self.sessions.make_room(keep=session.id)
        self.stats["opened"] += 1
        self.metrics.opened.inc()
        self.metrics.tokens.labels("prompt").inc(len(prompt))
        return SessionOpened(
            session_id=session.id,
            position=session.generated if session.text_space else session.position,
            text_space=session.text_space,
            model=self.lm.name,
            eos_token_ids=self.lm.tokenizer.eos_token_ids,
            expires_in_s=self.limits.session_ttl_s,
        )

    async def verify(self, req: VerifyRequest, principal: Principal | None = None) -> VerifyResult:
        principal = principal or ANONYMOUS
        session = self.sessions.get(req.session_id, principal.id)
        if session.text_space:
            raise gateway_error("bad_request", f"session '{session.id}' verifies text: send verify_text requests")
        self._check_draft_len(len(req.draft_tokens), "draft tokens")
        self._check_ids(req.draft_tokens, "draft_tokens")
        if not session.sampling.greedy and req.draft_tokens and req.draft_dists is None:
            raise gateway_error("bad_request", "a sampling session needs draft_dists with every draft block")
        return await self._locked(session, req, principal, lambda: session.position, self.verifier.tokens_block)

    async def verify_text(self, req: VerifyTextRequest, principal: Principal | None = None) -> VerifyTextResult:
        principal = principal or ANONYMOUS
        session = self.sessions.get(req.session_id, principal.id)
        if not session.text_space:
            raise gateway_error("bad_request", f"session '{session.id}' verifies token ids: send verify requests")
        self._check_text_offset(session, req.position, req.text_offset)
        return await self._locked(session, req, principal, lambda: session.generated, self.verifier.text_block)

    def chat_prompt(self, messages: list[dict], max_new_tokens: int, tools: list[dict] | None = None) -> list[int]:
        """Chat messages (and tools) as the target's prompt token ids, after every size check (so
        an over-long chat answers 413 before any request object is built)."""
        prompt = self.render(messages, tools)
        self._check_prompt(prompt, self.lm.tokenizer.fingerprint, max_new_tokens)
        return prompt

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Chat messages (and tools) as the target's prompt token ids (its chat template, when it has one)."""
        try:
            return render_chat(self.lm.tokenizer, messages, tools)
        except ValueError as exc:
            raise gateway_error("bad_request", f"tools: {exc}", detail={"param": "tools"}) from None

    async def append(self, req: AppendRequest, principal: Principal | None = None, *, charge: bool = True) -> AppendResult:
        """`assist` mode: take the device's tokens as they are, answer the target's next one.
        `charge=False`: the tokens were reserved up front (a generation's own decode steps)."""
        principal = principal or ANONYMOUS
        session = self.sessions.get(req.session_id, principal.id)
        if session.text_space and req.tokens is not None:
            raise gateway_error("bad_request", f"session '{session.id}' is a text session: append `text`, not `tokens`")
        if not session.text_space and req.text is not None:
            raise gateway_error("bad_request", f"session '{session.id}' is a token session: append `tokens`, not `text`")
        if req.tokens is not None:
            if len(req.tokens) > self.limits.max_append_tokens:
                raise gateway_error("too_large", f"{len(req.tokens)} tokens exceed this gateway's append limit of {self.limits.max_append_tokens}")
            self._check_ids(req.tokens, "tokens")
            actual = lambda: session.position  # noqa: E731
        else:
            self._check_text_offset(session, req.position, req.text_offset)
            actual = lambda: session.generated  # noqa: E731
        return await self._locked(session, req, principal, actual, self.verifier.append_block, charge=charge)

    def _check_text_offset(self, session: Session, position: int, text_offset: int) -> None:
        if position == session.generated and text_offset != len(session.text):
            raise gateway_error(
                "wrong_position",
                f"text_offset {text_offset} does not match the {len(session.text)} characters generated in session '{session.id}'",
                detail={"expected": len(session.text), "got": text_offset},
            )

    def _session_cap(self, principal: Principal) -> int | None:
        """The open sessions a key may hold: its own limit, else the gateway's per-key default.
        Callers without a key (a gateway with `auth: none`) share the overall cap, where the
        eviction order keeps any one of them from holding everyone else out."""
        if principal.max_sessions is not None:
            return principal.max_sessions
        return None if principal.id == ANONYMOUS.id else self.limits.per_key_sessions()

    def _check_draft_len(self, n: int, what: str) -> None:
        if n > self.limits.max_draft_tokens:
            raise gateway_error("too_large", f"{n} {what} exceed this gateway's limit of {self.limits.max_draft_tokens}")

    async def _locked(self, session: Session, req, principal: Principal, actual, prepare, *, charge: bool = True):
        key = replay_key(req)
        session.waiting += 1  # from now on the session is busy: never evicted or expired under us
        try:
            async with session.lock:
                if session.last_verify is not None and session.last_verify[0] == key:
                    # the same request again (its reply was lost): answer it again, advance nothing
                    self.stats["replays"] += 1
                    return session.last_verify[1]
                self._check_live(session)
                if req.position != actual():
                    raise gateway_error(
                        "wrong_position",
                        f"{req.type} for position {req.position}, but session '{session.id}' is at position {actual()}",
                        detail={"expected": actual(), "got": req.position},
                    )
                block = prepare(session, req)
                if isinstance(block, Block):
                    if charge:
                        try:
                            self.limiter.charge(principal, block.tokens)
                        except GatewayError:
                            session.engine.truncate(block.start)
                            raise
                    # shielded: a caller that goes away does not release the lock before the block lands
                    task = asyncio.ensure_future(self.batcher.run(block))
                    try:
                        result = await asyncio.shield(task)
                    except asyncio.CancelledError:
                        try:
                            session.last_verify = (key, await task)
                        except Exception:
                            pass
                        raise
                else:
                    result = block  # decided without a forward pass
                session.last_verify = (key, result)
        finally:
            session.waiting -= 1
        if result.finished:
            # a finished session's cache is of no further use: free it now, keeping only the
            # last reply in case it was lost and the request is retried
            self.sessions.finish(session.id)
        else:
            self.sessions.make_room(keep=session.id)
        self.metrics.tokens.labels("generated").inc(len(result.tokens) - getattr(result, "appended", 0))
        return result

    def _check_live(self, session: Session) -> None:
        """After waiting for a session's lock: it may have ended meanwhile (closed by its owner,
        or finished by the request before)."""
        if session.finished or session.gone == "finished":
            raise gateway_error("session_finished", f"session '{session.id}' has already finished generating")
        if session.gone is not None:
            raise gateway_error("unknown_session", f"no session '{session.id}' on this gateway (closed while this request waited)")

    async def close_session(self, req: CloseSession, principal: Principal | None = None) -> SessionClosed:
        """Take the session out of the store now (no new request finds it), and free its cache
        once the request using it, if any, has finished: never under a running forward pass."""
        session = self.sessions.pop(req.session_id, (principal or ANONYMOUS).id)
        session.waiting += 1
        try:
            async with session.lock:
                self.sessions.end(session)
        finally:
            session.waiting -= 1
        return SessionClosed(session_id=session.id, generated_tokens=session.generated)

    # -- cloud mode ------------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest, principal: Principal | None = None) -> AsyncIterator[GenerateChunk]:
        """Cloud mode: the target decodes alone, as a session of the gateway's own (cloud.py)."""
        return await cloud.generate(self, req, principal or ANONYMOUS)


__all__ = ["Gateway", "GatewayLimits", "GatewayError", "BatchingConfig"]
