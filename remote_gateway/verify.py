"""What a verify (or append) does to a session, as `Block`s for the batcher.

Each `*_block` method runs under the session's lock: it appends the request's candidate tokens
to the session's sequence and returns a `Block` whose `finish(rows)` runs on the model worker
with the target's logits rows for them (shared with other sessions' blocks in one packed pass).
`finish` applies the accept rule of `local_runtime/speculative.py` (the tested rule is the rule
that runs), cuts at end-of-sequence or the token budget (`cut_at_stop`), rolls the cache back to
what was kept, and builds the reply.

    tokens   [last, d_1..d_k] -> accept a prefix (greedy or sampled), then the target's next token
    text     the draft text tokenised by the target, then as tokens (greedy)
    append   the device's tokens taken as they are, then the target's next token (`assist` mode)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..local_runtime.grammar import GrammarError, GrammarState, GrammarViolation, apply_mask, compile_constraint
from ..local_runtime.sampling import logits_to_probs
from ..local_runtime.speculative import cut_at_stop, verify_greedy_lazy, verify_sampled
from ..protocols.errors import gateway_error
from ..protocols.messages import (
    AppendRequest,
    AppendResult,
    OpenSession,
    TokenLogprob,
    VerifyRequest,
    VerifyResult,
    VerifyTextRequest,
    VerifyTextResult,
)
from .batching import Block
from .metrics import GatewayMetrics
from .sessions import Session


class Verifier:
    def __init__(self, lm: Any, metrics: GatewayMetrics, stats: dict[str, int], *, max_draft_tokens: int,
                 max_append_tokens: int) -> None:
        self.lm = lm
        self.metrics = metrics
        self.stats = stats
        self.max_draft_tokens = max_draft_tokens
        self.max_append_tokens = max_append_tokens
        self.eos = frozenset(lm.tokenizer.eos_token_ids)

    # -- the three kinds of block ------------------------------------------------------------------

    def tokens_block(self, session: Session, req: VerifyRequest) -> Block:
        draft = list(req.draft_tokens)
        start = session.position
        session.engine.append(draft)

        def finish(rows) -> VerifyResult:
            if session.sampling.greedy:
                n, next_token, emitted, reason = self.decide(session, start, draft, rows)
            else:
                n, next_token, emitted, reason = self.decide(session, start, draft, rows, self._sampled_rule(session, req, draft))
            self.stats["drafted"] += len(draft)
            self._count_verify("tokens", len(draft), n)
            return VerifyResult(
                session_id=session.id, accepted=n, next_token=next_token, tokens=emitted,
                position=session.position, finished=session.finished, finish_reason=reason,
            )

        return Block(session.engine, start, finish)

    def text_block(self, session: Session, req: VerifyTextRequest) -> Block:
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
            candidates = candidates[: max(1, 2 * self.max_draft_tokens)]
        start = session.position
        session.engine.append(candidates)

        def finish(rows) -> VerifyTextResult:
            self.stats["drafted"] += len(candidates)
            n, _, emitted, reason = self.decide(session, start, candidates, rows)
            before = session.text
            self._push_text(session, emitted)
            self._count_verify("text", len(candidates), n)
            return VerifyTextResult(
                session_id=session.id, text=session.text[len(before):], accepted=n, candidates=len(candidates),
                tokens=emitted, position=session.generated, text_offset=len(session.text),
                finished=session.finished, finish_reason=reason,
            )

        return Block(session.engine, start, finish)

    def append_block(self, session: Session, req: AppendRequest) -> Block | AppendResult:
        tok = self.lm.tokenizer
        if req.text is not None:
            if req.text and session.text_pending:
                raise gateway_error(
                    "bad_request",
                    "the target's last token ends inside a character: append empty text first to let it finish",
                )
            tokens = tok.encode(req.text) if req.text else []
            if len(tokens) > self.max_append_tokens:
                raise gateway_error("too_large", f"text of {len(tokens)} target tokens exceeds the append limit of {self.max_append_tokens}")
        else:
            tokens = list(req.tokens)
        taken, reason = cut_at_stop(tokens, self.eos, session.max_new_tokens - session.generated)
        start = session.position
        try:
            session.grammar_mask(start, taken)
        except GrammarViolation as exc:
            session.grammar_mask(start)
            raise gateway_error("bad_request", f"the appended tokens break the session's grammar: {exc}") from None
        session.engine.append(taken)
        if reason is not None:  # the device's own tokens end the generation: nothing to compute
            session.generated += len(taken)
            session.finished = True
            return self._appended(session, req, taken, None, reason)

        def finish(rows) -> AppendResult:
            nxt = self.next_token(session, rows[-1], start + len(taken))
            session.generated += len(taken) + 1
            session.engine.append([nxt])
            why = "eos" if nxt in self.eos else ("length" if session.generated >= session.max_new_tokens else None)
            session.finished = why is not None
            result = self._appended(session, req, taken, nxt, why)
            if req.top_logprobs is not None:
                result = result.model_copy(update={"logprobs": token_logprob(rows[-1], nxt, req.top_logprobs)})
            return result

        return Block(session.engine, start, finish)

    # -- the rules, applied ----------------------------------------------------------------------

    def decide(self, session: Session, start: int, draft: list[int], rows, accept=None) -> tuple[int, int, list[int], str | None]:
        """Given the target's rows for [last token, *draft]: accept a prefix (greedy unless
        `accept(rows)` is given), add the target's next token, cut at EOS / the budget, roll the
        cache back. Returns (accepted, next token, tokens appended, finish reason)."""
        engine = session.engine
        rows = rows[-(len(draft) + 1) :]  # k + 1 rows: the distributions at each draft and after
        ties_before = engine.tie_recomputes
        if accept is None:
            n, next_token = verify_greedy_lazy(
                draft, lambda i: engine.greedy_token(rows[i], start + i, session.grammar_mask(start, draft[:i]))
            )
        else:
            n, next_token = accept(rows)
        self.stats["tie_recomputes"] += engine.tie_recomputes - ties_before
        emitted, reason = cut_at_stop([*draft[:n], next_token], self.eos, session.max_new_tokens - session.generated)
        session.generated += len(emitted)
        keep = min(n, len(emitted))
        engine.truncate(start + keep)
        engine.append(emitted[keep:])
        session.finished = reason is not None
        return n, next_token, emitted, reason

    def _sampled_rule(self, session: Session, req: VerifyRequest, draft: list[int]):
        """The lossless sampling rule over these rows, with the session's own random stream."""
        s = session.sampling

        def accept(rows) -> tuple[int, int]:
            if session.grammar is not None:  # each row masked by the grammar after the drafts before it
                rows = torch.stack([apply_mask(row, mask) for row, mask in zip(rows, self._draft_masks(session, draft))])
            p = logits_to_probs(rows, s.temperature, s.top_p).numpy()
            q = np.zeros((len(draft), p.shape[1]), dtype=np.float64)
            for i, dist in enumerate(req.draft_dists or []):
                q[i, dist.ids] = dist.probs
            return verify_sampled(draft, q, p, session.rng.random(len(draft)), float(session.rng.random()))

        return accept

    def _draft_masks(self, session: Session, draft: list[int]) -> list:
        """The grammar's mask before each draft token and after the last (k + 1 of them). Past a
        draft token the grammar refuses, the masks repeat: that token is rejected anyway."""
        start = session.position - len(draft)
        masks = []
        for i in range(len(draft) + 1):
            try:
                masks.append(session.grammar_mask(start, draft[:i]))
            except GrammarViolation:
                masks.append(masks[-1])
        return masks

    def next_token(self, session: Session, row, prefix_len: int) -> int:
        """The target's own token after `prefix_len` tokens: greedy (with the near-tie rule) or
        sampled (the bonus-token case of the sampling rule, with no drafts); under the session's
        grammar, if it has one."""
        allowed = session.grammar_mask(prefix_len)
        if session.sampling.greedy:
            ties = session.engine.tie_recomputes
            choice = session.engine.greedy_token(row, prefix_len, allowed)
            self.stats["tie_recomputes"] += session.engine.tie_recomputes - ties
            return choice
        s = session.sampling
        if allowed is not None:
            row = apply_mask(row, allowed)
        p = logits_to_probs(row[None], s.temperature, s.top_p).numpy()
        _, choice = verify_sampled([], np.zeros((0, p.shape[1])), p, [], float(session.rng.random()))
        return int(choice)

    # -- replies -------------------------------------------------------------------------------

    def _appended(self, session: Session, req: AppendRequest, taken: list[int], nxt: int | None, reason) -> AppendResult:
        tok = self.lm.tokenizer
        emitted = taken + ([] if nxt is None else [nxt])
        if session.text_space:
            before = session.text
            self._push_text(session, emitted)
            delta = session.text[len(before):]
            text = delta[len(req.text):] if delta.startswith(req.text) else delta
            position, offset = session.generated, len(session.text)
        else:
            text = "" if nxt is None else token_text(tok, session.engine.tokens[session.prompt_len : -1][-8:], nxt)
            position, offset = session.position, None
        self.stats["appends"] += 1
        self.metrics.verifies.labels("append").inc()
        self.metrics.tokens.labels("appended").inc(len(taken))
        return AppendResult(
            session_id=session.id, appended=len(taken), next_token=nxt, text=text, tokens=emitted,
            position=position, text_offset=offset, finished=session.finished, finish_reason=reason,
        )

    def _push_text(self, session: Session, emitted: list[int]) -> None:
        session.decoder.push(emitted)
        if session.finished:
            session.decoder.flush()
        session.text = session.decoder.text
        session.text_pending = len(session.decoder.pending_text()) > 0

    def _count_verify(self, kind: str, drafted: int, accepted: int) -> None:
        self.stats["verifies"] += 1
        self.stats["accepted"] += accepted
        self.metrics.observe_verify(kind, drafted, accepted)


def resumed_text_tokens(lm, req: OpenSession) -> int:
    """How many of a session's prompt tokens are `resume_text` (output generated before it)."""
    return len(lm.tokenizer.encode(req.resume_text)) if req.resume_text else 0


def session_grammar(lm, req: OpenSession, prompt: list[int], resume: list[int]) -> GrammarState | None:
    """A new session's grammar (None without a constraint), past what a resumed session already
    generated; a constraint that does not compile answers 400 (413 over a size or time limit),
    naming the request parameter it came from."""
    if req.constraint is None:
        return None
    try:
        grammar = compile_constraint(req.constraint, lm.tokenizer, lm.vocab_size)
        grammar.sync(prompt[len(prompt) - resumed_text_tokens(lm, req) :] + resume)
    except GrammarError as exc:
        raise gateway_error("too_large" if exc.too_large else "bad_request", exc.message, detail={"param": exc.param}) from None
    except GrammarViolation as exc:
        raise gateway_error("bad_request", f"the resumed output does not follow the constraint: {exc}") from None
    return grammar


def token_text(tok, context: list[int], token: int) -> str:
    """The text `token` adds after `context` (a few tokens before it, so that pieces of one
    character decode together; a character still incomplete shows up with the token ending it)."""
    before = tok.text(context).rstrip("\ufffd")
    after = tok.text([*context, token]).rstrip("\ufffd")
    return after[len(before):] if after.startswith(before) else tok.text([token]).rstrip("\ufffd")


def token_logprob(row, token: int, top: int) -> TokenLogprob:
    """The target's log-probability of `token` from its logits `row` (log-softmax, before any
    temperature or top-p: the model's own), and its `top` likeliest tokens."""
    logp = torch.as_tensor(row).float().log_softmax(-1)
    best = torch.topk(logp, top) if top else None
    return TokenLogprob(
        token=token, logprob=float(logp[token]),
        top_ids=[] if best is None else best.indices.tolist(), top_logprobs=[] if best is None else best.values.tolist(),
    )


def replay_key(req: VerifyRequest | VerifyTextRequest | AppendRequest) -> tuple:
    """What identifies a request: its position and its drafts (a position is never verified twice
    with the same drafts unless a reply was lost and the request retried)."""
    if isinstance(req, VerifyTextRequest):
        return ("text", req.position, req.text_offset, req.draft_text, req.draft_eos)
    if isinstance(req, AppendRequest):
        return ("append", req.position, req.text_offset, req.text, None if req.tokens is None else tuple(req.tokens))
    return ("tokens", req.position, tuple(req.draft_tokens))


__all__ = ["Verifier", "token_text", "token_logprob", "replay_key", "session_grammar", "resumed_text_tokens"]
