"""The gateway's core, free of HTTP: messages in, messages (or GatewayError) out.

The FastAPI app (`app.py`) and the in-process transport both call this object, so every
transport sees the same behaviour. Model work runs on one worker thread: torch already uses every
core for one forward pass, and a single worker keeps the event loop free for I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..local_runtime.engine import DEFAULT_TIE_MARGIN, Engine, generate_alone
from ..local_runtime.models import LoadedModel, load_model
from ..local_runtime.sampling import logits_to_probs
from ..local_runtime.speculative import verify_sampled
from ..local_runtime.text import IncrementalDecoder
from ..protocols.errors import GatewayError, gateway_error
from ..protocols.messages import (
    CloseSession,
    GatewayInfo,
    GenerateChunk,
    GenerateRequest,
    OpenSession,
    SessionClosed,
    SessionOpened,
    VerifyRequest,
    VerifyResult,
    VerifyTextRequest,
    VerifyTextResult,
)
from .sessions import Session, SessionStore

log = logging.getLogger(__name__)


@dataclass
class GatewayLimits:
    max_sessions: int = 64
    session_ttl_s: float = 300.0
    max_draft_tokens: int = 32
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_body_bytes: int = 1_000_000


class Gateway:
    def __init__(
        self,
        model: str | LoadedModel = "gemma3-270m",
        limits: GatewayLimits | None = None,
        *,
        tie_margin: float = DEFAULT_TIE_MARGIN,
    ) -> None:
        self.lm = model if isinstance(model, LoadedModel) else load_model(model)
        self.limits = limits or GatewayLimits()
        self.tie_margin = tie_margin
        self.sessions = SessionStore(self.limits.max_sessions, self.limits.session_ttl_s)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-model")
        self.stats = {"opened": 0, "verifies": 0, "drafted": 0, "accepted": 0, "errors": 0, "tie_recomputes": 0, "replays": 0}

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
        )

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def close(self) -> None:
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

    # -- the speculative session ---------------------------------------------------------------

    def _prompt(self, req: OpenSession | GenerateRequest) -> list[int]:
        """The prompt as target token ids, whichever form it came in, after every check."""
        self._check_model(req.model)
        tok = self.lm.tokenizer
        if req.prompt_tokens is not None:
            prompt, fingerprint = list(req.prompt_tokens), req.tokenizer_fingerprint
        else:
            if req.messages is not None:
                messages = [m.model_dump() for m in req.messages]
                prompt = tok.chat(messages) if tok.chat else tok.prompt_tokens("\n\n".join(m["content"] for m in messages), chat=False)
            else:
                prompt = tok.prompt_tokens(req.prompt_text, chat=False)
            fingerprint = tok.fingerprint
        if req.resume_text:
            prompt = prompt + tok.encode(req.resume_text)
        self._check_prompt(prompt, fingerprint, req.max_new_tokens)
        return prompt

    async def open(self, req: OpenSession) -> SessionOpened:
        prompt = self._prompt(req)
        if req.text_space and not req.sampling.greedy:
            raise gateway_error(
                "bad_request",
                "sampling (temperature > 0) is not supported in text-space sessions, where drafter and target "
                "tokenizers differ: no lossless cross-vocabulary sampling rule is implemented. Use temperature 0, "
                "or a drafter that shares the target's tokenizer.",
            )
        engine = Engine(self.lm, tie_margin=self.tie_margin)
        engine.append(prompt)
        session = Session(
            id=self.sessions.new_id(),
            engine=engine,
            sampling=req.sampling,
            max_new_tokens=req.max_new_tokens,
            prompt_len=len(prompt),
            rng=np.random.default_rng(req.sampling.seed),
            text_space=req.text_space,
            decoder=IncrementalDecoder(self.lm.tokenizer.decode, skip_ids=self.lm.tokenizer.special_ids),
        )
        self.sessions.add(session)
        if len(prompt) > 1:
            # prefill everything but the last token: each verify starts by feeding it
            async with session.lock:
                await self._run(engine.compute, len(prompt) - 1)
        self.stats["opened"] += 1
        return SessionOpened(
            session_id=session.id,
            position=0 if session.text_space else session.position,
            text_space=session.text_space,
            model=self.lm.name,
            eos_token_ids=self.lm.tokenizer.eos_token_ids,
            expires_in_s=self.limits.session_ttl_s,
        )

    async def verify(self, req: VerifyRequest) -> VerifyResult:
        session = self.sessions.get(req.session_id)
        if session.text_space:
            raise gateway_error("bad_request", f"session '{session.id}' verifies text: send verify_text requests")
        self._check_draft_len(len(req.draft_tokens), "draft tokens")
        self._check_ids(req.draft_tokens, "draft_tokens")
        if not session.sampling.greedy and req.draft_tokens and req.draft_dists is None:
            raise gateway_error("bad_request", "a sampling session needs draft_dists with every draft block")
        return await self._locked_verify(session, req.position, session.position, self._verify_tokens, req)

    async def verify_text(self, req: VerifyTextRequest) -> VerifyTextResult:
        session = self.sessions.get(req.session_id)
        if not session.text_space:
            raise gateway_error("bad_request", f"session '{session.id}' verifies token ids: send verify requests")
        if req.position == session.generated and req.text_offset != len(session.text):
            raise gateway_error(
                "wrong_position",
                f"text_offset {req.text_offset} does not match the {len(session.text)} characters generated in session '{session.id}'",
                detail={"expected": len(session.text), "got": req.text_offset},
            )
        return await self._locked_verify(session, req.position, session.generated, self._verify_text, req)

    def _check_draft_len(self, n: int, what: str) -> None:
        if n > self.limits.max_draft_tokens:
            raise gateway_error("too_large", f"{n} {what} exceed this gateway's limit of {self.limits.max_draft_tokens}")

    async def _locked_verify(self, session: Session, claimed: int, actual: int, fn, req):
        key = _replay_key(req)
        async with session.lock:
            if session.last_verify is not None and session.last_verify[0] == key:
                # the same verify again (its reply was lost): answer it again, advance nothing
                self.stats["replays"] += 1
                return session.last_verify[1]
            if session.finished:
                raise gateway_error("session_finished", f"session '{session.id}' has already finished generating")
            if claimed != actual:
                raise gateway_error(
                    "wrong_position",
                    f"verify for position {claimed}, but session '{session.id}' is at position {actual}",
                    detail={"expected": actual, "got": claimed},
                )
            result = await self._run(fn, session, req)
            session.last_verify = (key, result)
        if result.finished:
            # a finished session's cache is of no further use: free it now, keeping only the
            # last reply in case it was lost and the verify is retried
            self.sessions.finish(session.id)
        self.stats["verifies"] += 1
        self.stats["accepted"] += result.accepted
        return result

    def _verify_tokens(self, session: Session, req: VerifyRequest) -> VerifyResult:
        sampling = session.sampling
        draft = list(req.draft_tokens)
        if sampling.greedy:
            n, next_token, emitted, reason = self._verify_block(session, draft)
        else:
            def accept(rows):
                p = logits_to_probs(rows, sampling.temperature, sampling.top_p).numpy()
                q = np.zeros((len(draft), p.shape[1]), dtype=np.float64)
                for i, dist in enumerate(req.draft_dists or []):
                    q[i, dist.ids] = dist.probs
                return verify_sampled(draft, q, p, session.rng.random(len(draft)), float(session.rng.random()))

            n, next_token, emitted, reason = self._verify_block(session, draft, accept)
        return VerifyResult(
            session_id=session.id, accepted=n, next_token=next_token, tokens=emitted,
            position=session.position, finished=session.finished, finish_reason=reason,
        )

    def _verify_text(self, session: Session, req: VerifyTextRequest) -> VerifyTextResult:
        tok = self.lm.tokenizer
        if session.text_pending:
            # the target is mid-character (a multi-byte character split over tokens): the draft,
            # which starts after the last whole character, cannot be lined up; let the target finish it
            candidates = []
        else:
            candidates = tok.encode(req.draft_text) if req.draft_text else []
            if req.draft_eos:
                candidates.append(tok.eot_token_id)
            # a draft may tokenise to more target tokens than it had drafter tokens; bound the pass
            candidates = candidates[: max(1, 2 * self.limits.max_draft_tokens)]
        self.stats["drafted"] += len(candidates)
        n, _, emitted, reason = self._verify_block(session, candidates)
        before = session.text
        session.decoder.push(emitted)
        if session.finished:
            session.decoder.flush()
        session.text = session.decoder.text
        session.text_pending = len(session.decoder.pending_text()) > 0
        return VerifyTextResult(
            session_id=session.id, text=session.text[len(before):], accepted=n, candidates=len(candidates),
            tokens=emitted, position=session.generated, text_offset=len(session.text),
            finished=session.finished, finish_reason=reason,
        )

    def _verify_block(self, session: Session, draft: list[int], accept=None) -> tuple[int, int, list[int], str | None]:
        """One target forward over [last token, *draft]; accept a prefix (greedy unless `accept`
        is given), append the target's next token, cut at EOS / the budget, roll the cache back.
        Returns (accepted, next token, tokens appended, finish reason)."""
        engine = session.engine
        start, k = session.position, len(draft)
        ties_before = engine.tie_recomputes
        engine.append(draft)
        rows = engine.compute()[-(k + 1) :]  # k + 1 rows: the distributions at each draft and after
        if accept is None:
            n = 0
            while True:
                choice = engine.greedy_token(rows[n], start + n)
                if n < k and draft[n] == choice:
                    n += 1
                    continue
                next_token = choice
                break
        else:
            n, next_token = accept(rows)
        self.stats["tie_recomputes"] += engine.tie_recomputes - ties_before
        if not session.text_space:
            self.stats["drafted"] += k

        eos = set(self.lm.tokenizer.eos_token_ids)
        emitted, reason = [], None
        for tok in [*draft[:n], next_token]:
            emitted.append(tok)
            session.generated += 1
            if tok in eos:
                reason = "eos"
                break
            if session.generated >= session.max_new_tokens:
                reason = "length"
                break
        keep = min(n, len(emitted))
        engine.truncate(start + keep)
        engine.append(emitted[keep:])
        session.finished = reason is not None
        return n, next_token, emitted, reason

    async def close_session(self, req: CloseSession) -> SessionClosed:
        session = self.sessions.pop(req.session_id)
        return SessionClosed(session_id=session.id, generated_tokens=session.generated)

    # -- cloud mode ------------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Validate now (so errors surface before streaming starts), then stream."""
        return self._generate_stream(self._prompt(req), req)

    async def _generate_stream(self, prompt: list[int], req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        s = req.sampling
        tokens = generate_alone(
            self.lm,
            prompt,
            req.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            tie_margin=self.tie_margin,
        )
        decoder = IncrementalDecoder(self.lm.tokenizer.decode, skip_ids=self.lm.tokenizer.special_ids)
        eos = set(self.lm.tokenizer.eos_token_ids)
        done = object()
        count = 0
        while True:
            tok = await self._run(next, tokens, done)
            if tok is done:
                yield GenerateChunk(tokens=[], text=decoder.flush(), finished=True, finish_reason="length")
                return
            count += 1
            if tok in eos:
                yield GenerateChunk(tokens=[tok], text=decoder.flush(), finished=True, finish_reason="eos")
                return
            text = decoder.push([tok])
            if count >= req.max_new_tokens:
                yield GenerateChunk(tokens=[tok], text=text + decoder.flush(), finished=True, finish_reason="length")
                return
            yield GenerateChunk(tokens=[tok], text=text)


__all__ = ["Gateway", "GatewayLimits", "GatewayError"]


def _replay_key(req: VerifyRequest | VerifyTextRequest) -> tuple:
    """What identifies a verify: its position and its drafts (a position is never verified twice
    with the same drafts unless a reply was lost and the request retried)."""
    if isinstance(req, VerifyTextRequest):
        return ("text", req.position, req.text_offset, req.draft_text, req.draft_eos)
    return ("tokens", req.position, tuple(req.draft_tokens))
