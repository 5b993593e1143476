"""Does a server speak the gateway protocol? A check through the documented protocol alone.

`run_conformance(url)` talks raw HTTP (httpx) to the routes of PROTOCOL.md, sends bodies built
as plain JSON, and checks every reply against the documented messages and error codes, the way
a device written in another language would meet the gateway:

    info           GET /v1/info answers a GatewayInfo of this protocol version
    auth           with keys required, a request without one is 401 unauthorized
    generate       the NDJSON stream: GenerateChunk lines, the last one finished
    open           a token session over ids the target produced, at the prompt's length
    verify         k = 0 is one target step; a repeated verify gets its first reply again;
                   a wrong draft is rejected and corrected by the target's own token; a right
                   draft is accepted with a bonus token after it
    append         device tokens taken as they are, then the target's next token
    verify_text    a text session: positions and text offsets add up
    close          closes; the closed session is then unknown (404)
    errors         malformed JSON, unknown fields, another version, missing fields, unknown
                   session, stale position, tokenizer mismatch, over a limit, unknown model,
                   unknown route: each the documented code with its documented HTTP status

Each check passes, fails (with what differed) or is skipped (a check it needs failed, or the
gateway has no such limit). The CLI prints the table: `tandem gateway conformance URL`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from .errors import gateway_error
from .http import SESSION_HEADER
from .messages import (
    MAX_DRAFT_TOKENS,
    PROTOCOL_VERSION,
    AppendResult,
    ErrorReply,
    GatewayInfo,
    GenerateChunk,
    SessionClosed,
    SessionOpened,
    VerifyResult,
    VerifyTextResult,
)
from .operations import BY_NAME

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class Check:
    name: str
    operation: str
    result: str  # pass | fail | skip
    detail: str = ""


@dataclass
class ConformanceReport:
    url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.result != FAIL for c in self.checks)

    def count(self, result: str) -> int:
        return sum(c.result == result for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "passed": self.passed, "pass": self.count(PASS), "fail": self.count(FAIL),
                "skip": self.count(SKIP), "checks": [asdict(c) for c in self.checks]}


class _Mismatch(Exception):
    """The gateway answered, but not as the protocol says."""


class _Skipped(Exception):
    pass


def _parse(model: type[BaseModel], response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise _Mismatch(f"HTTP {response.status_code} instead of 200: {response.text[:300]}")
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise _Mismatch(f"the reply is not a valid {model.__name__}: {exc.errors()[0]['msg']} ({response.text[:200]})") from exc


def _expect_error(response: httpx.Response, code: str) -> ErrorReply:
    """The reply must be an ErrorReply with `code`, under the HTTP status documented for it."""
    status = gateway_error(code, "").status
    try:
        reply = ErrorReply.model_validate_json(response.content)
    except ValidationError as exc:
        raise _Mismatch(f"HTTP {response.status_code}, and the body is not an ErrorReply: {response.text[:200]}") from exc
    if reply.code != code or response.status_code != status:
        raise _Mismatch(f"expected {status} {code}, got {response.status_code} {reply.code}: {reply.message}")
    return reply


class Conformance:
    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.report = ConformanceReport(url)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport)
        self.state: dict[str, Any] = {}

    # -- plumbing ----------------------------------------------------------------------------------

    def post(self, operation: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        """A documented operation, its body as raw JSON (bytes are sent exactly as they are)."""
        op = BY_NAME[operation]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        h = {"content-type": "application/json", **(headers or {})}
        if isinstance(body, dict) and "session_id" in body:
            h[SESSION_HEADER] = str(body["session_id"])
        return self.http.request(op.method, op.path, content=content, headers=h)

    def check(self, name: str, operation: str, fn: Callable[[], str | None], needs: tuple[str, ...] = ()) -> None:
        missing = [n for n in needs if n not in self.state]
        if missing:
            self.report.checks.append(Check(name, operation, SKIP, f"needs {', '.join(missing)}"))
            return
        try:
            detail = fn() or ""
        except _Skipped as exc:
            self.report.checks.append(Check(name, operation, SKIP, str(exc)))
        except _Mismatch as exc:
            self.report.checks.append(Check(name, operation, FAIL, str(exc)))
        except httpx.HTTPError as exc:
            self.report.checks.append(Check(name, operation, FAIL, f"no answer: {type(exc).__name__}: {exc}"))
        else:
            self.report.checks.append(Check(name, operation, PASS, detail))

    def open_tokens(self, **extra: Any) -> SessionOpened:
        body = {"type": "open", "version": PROTOCOL_VERSION, "prompt_tokens": self.state["prompt"],
                "tokenizer_fingerprint": self.state["info"].tokenizer_fingerprint, "max_new_tokens": 16, **extra}
        opened = _parse(SessionOpened, self.post("open", body))
        self.state.setdefault("sessions", []).append(opened.session_id)
        return opened

    def verify(self, session: str, position: int, drafts: list[int]) -> httpx.Response:
        return self.post("verify", {"type": "verify", "version": PROTOCOL_VERSION, "session_id": session,
                                    "position": position, "draft_tokens": drafts, "draft_probs": [0.5] * len(drafts)})

    # -- the checks, in order ------------------------------------------------------------------------

    def run(self) -> ConformanceReport:
        try:
            self.check("info", "get_info", self._info)
            self.check("auth is required", "get_info", self._auth, needs=("info",))
            self.check("generate stream", "generate", self._generate, needs=("info",))
            self.check("open a token session", "open", self._open, needs=("info", "prompt"))
            self.check("verify k=0 is a target step", "verify", self._verify_step, needs=("s1",))
            self.check("a repeated verify gets its first reply", "verify", self._replay, needs=("step",))
            self.check("a wrong draft is corrected", "verify", self._reject, needs=("step",))
            self.check("a right draft is accepted, plus a bonus token", "verify", self._accept, needs=("next2",))
            self.check("append", "append", self._append, needs=("step", "next2"))
            self.check("verify_text in a text session", "verify_text", self._verify_text, needs=("info",))
            self.check("close", "close_session", self._close, needs=("s1",))
            self.check("a constrained generation follows its grammar", "generate", self._constrained, needs=("info",))
            self._error_checks()
        finally:
            for sid in self.state.get("sessions", []):
                try:
                    self.post("close_session", {"type": "close", "session_id": sid})
                except httpx.HTTPError:
                    pass
            self.http.close()
        return self.report

    def _info(self) -> str:
        info = _parse(GatewayInfo, self.http.get(BY_NAME["get_info"].path))
        if info.version != PROTOCOL_VERSION:
            raise _Mismatch(f"protocol version {info.version}, not {PROTOCOL_VERSION}")
        self.state["info"] = info
        return f"{info.model}, tokenizer {info.tokenizer_fingerprint}, max draft {info.max_draft_tokens}"

    def _auth(self) -> str:
        if not self.state["info"].auth:
            raise _Skipped("the gateway does not require keys")
        bare = httpx.get(self.http.base_url.join(BY_NAME["get_info"].path), timeout=self.http.timeout)
        _expect_error(bare, "unauthorized")
        return "401 without a key"

    def _generate(self) -> str:
        info = self.state["info"]
        body = {"type": "generate", "version": PROTOCOL_VERSION, "prompt_text": "The", "max_new_tokens": 8}
        op = BY_NAME["generate"]
        with self.http.stream(op.method, op.path, content=json.dumps(body), headers={"content-type": "application/json"}) as r:
            if r.status_code != 200:
                r.read()
                raise _Mismatch(f"HTTP {r.status_code}: {r.text[:200]}")
            if not r.headers.get("content-type", "").startswith("application/x-ndjson"):
                raise _Mismatch(f"content-type {r.headers.get('content-type')!r}, not application/x-ndjson")
            chunks = []
            for line in r.iter_lines():
                if line.strip():
                    try:
                        chunks.append(GenerateChunk.model_validate_json(line))
                    except ValidationError as exc:
                        raise _Mismatch(f"a line that is not a GenerateChunk: {line[:200]}") from exc
        if not chunks or not chunks[-1].finished or any(c.finished for c in chunks[:-1]):
            raise _Mismatch("the stream's last chunk (and only it) must be finished")
        tokens = [t for c in chunks for t in c.tokens]
        if not 1 <= len(tokens) <= 8 or chunks[-1].finish_reason not in ("eos", "length"):
            raise _Mismatch(f"{len(tokens)} tokens for max_new_tokens 8, finish_reason {chunks[-1].finish_reason}")
        if any(not 0 <= t < info.vocab_size for t in tokens):
            raise _Mismatch(f"token ids outside the vocabulary of {info.vocab_size}")
        # a token prompt the target tokenizer surely has: the text it just wrote, without end markers
        prompt = [t for t in tokens if t not in info.eos_token_ids] or [0, 1, 2]
        self.state["prompt"] = prompt
        return f"{len(chunks)} chunks, {len(tokens)} tokens, {chunks[-1].finish_reason}"

    def _open(self) -> str:
        opened = self.open_tokens()
        if opened.position != len(self.state["prompt"]) or opened.text_space:
            raise _Mismatch(f"position {opened.position} for a prompt of {len(self.state['prompt'])} tokens, text_space {opened.text_space}")
        self.state["s1"] = opened
        return f"{opened.session_id} at position {opened.position}"

    def _verify_step(self) -> str:
        s1 = self.state["s1"]
        r = self.verify(s1.session_id, s1.position, [])
        res = _parse(VerifyResult, r)
        if res.accepted != 0 or res.next_token is None or res.tokens != [res.next_token] or res.position != s1.position + 1:
            raise _Mismatch(f"k=0 answered accepted {res.accepted}, tokens {res.tokens}, position {res.position}")
        if res.next_token in self.state["info"].eos_token_ids:
            raise _Skipped("the target ended its answer at once; the verify checks need a longer one")
        self.state["step"] = (res, r.content)
        return f"next token {res.next_token}"

    def _replay(self) -> str:
        s1, (first, _body) = self.state["s1"], self.state["step"]
        again = _parse(VerifyResult, self.verify(s1.session_id, s1.position, []))
        if again != first:
            raise _Mismatch(f"the same verify again answered {again.model_dump()} after {first.model_dump()}")
        return "same reply, the session advanced once"

    def _reject(self) -> str:
        g = self.state["step"][0].next_token
        wrong = (g + 1) % self.state["info"].vocab_size
        s2 = self.open_tokens()
        res = _parse(VerifyResult, self.verify(s2.session_id, s2.position, [wrong]))
        if res.accepted != 0 or res.tokens != [g]:
            raise _Mismatch(f"draft {wrong} where the target writes {g}: accepted {res.accepted}, tokens {res.tokens}")
        nxt = _parse(VerifyResult, self.verify(s2.session_id, res.position, []))
        if nxt.next_token in self.state["info"].eos_token_ids:
            raise _Skipped("the target ended its answer after one token")
        self.state["next2"] = nxt.next_token
        return f"draft {wrong} rejected, corrected to {g}"

    def _accept(self) -> str:
        g, h = self.state["step"][0].next_token, self.state["next2"]
        s3 = self.open_tokens()
        res = _parse(VerifyResult, self.verify(s3.session_id, s3.position, [g, h]))
        if res.accepted != 2 or res.tokens[:2] != [g, h] or len(res.tokens) != 3 or res.position != s3.position + 3:
            raise _Mismatch(f"the target's own next tokens {[g, h]} as drafts: accepted {res.accepted}, tokens {res.tokens}")
        return f"accepted 2, bonus token {res.next_token}"

    def _append(self) -> str:
        s1, step = self.state["s1"], self.state["step"][0]
        h = self.state["next2"]
        body = {"type": "append", "version": PROTOCOL_VERSION, "session_id": s1.session_id, "position": step.position, "tokens": [h]}
        res = _parse(AppendResult, self.post("append", body))
        if res.appended != 1 or res.tokens[:1] != [h] or res.position != step.position + len(res.tokens):
            raise _Mismatch(f"appended {res.appended}, tokens {res.tokens}, position {res.position}")
        self.state["s1_position"] = res.position
        return f"appended 1, next token {res.next_token}"

    def _verify_text(self) -> str:
        body = {"type": "open", "version": PROTOCOL_VERSION, "prompt_text": "The", "max_new_tokens": 16}
        opened = _parse(SessionOpened, self.post("open", body))
        self.state.setdefault("sessions", []).append(opened.session_id)
        if not opened.text_space or opened.position != 0:
            raise _Mismatch(f"a text session opened with text_space {opened.text_space}, position {opened.position}")
        position, offset = 0, 0
        for _ in range(2):
            req = {"type": "verify_text", "version": PROTOCOL_VERSION, "session_id": opened.session_id,
                   "position": position, "text_offset": offset, "draft_text": ""}
            res = _parse(VerifyTextResult, self.post("verify_text", req))
            if res.position != position + len(res.tokens) or res.text_offset != offset + len(res.text):
                raise _Mismatch(f"position {res.position} / text_offset {res.text_offset} after {len(res.tokens)} tokens "
                               f"and {len(res.text)} characters from {position} / {offset}")
            position, offset = res.position, res.text_offset
            if res.finished:
                break
        stale = {"type": "verify_text", "version": PROTOCOL_VERSION, "session_id": opened.session_id,
                 "position": position, "text_offset": offset + 1, "draft_text": ""}
        if position and not res.finished:
            _expect_error(self.post("verify_text", stale), "wrong_position")
        return f"{position} target tokens, {offset} characters"

    def _constrained(self) -> str:
        body = {"type": "generate", "version": PROTOCOL_VERSION, "prompt_text": "Yes or no?", "max_new_tokens": 16,
                "constraint": {"kind": "regex", "source": "(yes|no)!"}}
        op = BY_NAME["generate"]
        with self.http.stream(op.method, op.path, content=json.dumps(body), headers={"content-type": "application/json"}) as r:
            if r.status_code != 200:
                r.read()
                raise _Mismatch(f"HTTP {r.status_code}: {r.text[:200]}")
            chunks = [GenerateChunk.model_validate_json(line) for line in r.iter_lines() if line.strip()]
        text = "".join(c.text for c in chunks)
        if text not in ("yes!", "no!") or chunks[-1].finish_reason != "eos":
            raise _Mismatch(f"under the regex (yes|no)! the gateway wrote {text!r}, finish_reason {chunks[-1].finish_reason}")
        return f"{text!r}, then end of sequence"

    def _close(self) -> str:
        s1 = self.state["s1"]
        closed = _parse(SessionClosed, self.post("close_session", {"type": "close", "version": PROTOCOL_VERSION,
                                                                   "session_id": s1.session_id}))
        if closed.session_id != s1.session_id:
            raise _Mismatch(f"closed {closed.session_id}, not {s1.session_id}")
        _expect_error(self.verify(s1.session_id, self.state.get("s1_position", s1.position), []), "unknown_session")
        self.state["sessions"].remove(s1.session_id)
        return "then 404 unknown_session"

    # -- the error codes -------------------------------------------------------------------------------

    def _error_checks(self) -> None:
        def bad(body: dict[str, Any] | bytes, operation: str = "open", code: str = "bad_request", says: str = "") -> Callable[[], str]:
            def run() -> str:
                reply = _expect_error(self.post(operation, body), code)
                if says and says not in reply.message:
                    raise _Mismatch(f"the message does not name '{says}': {reply.message}")
                return f"{gateway_error(code, '').status} {code}"
            return run

        prompt = {"type": "open", "prompt_text": "The"}
        self.check("malformed JSON is 400", "open", bad(b'{"type": "open", "prompt_text": '))
        self.check("an unknown field is 400", "open", bad({**prompt, "colour": "blue"}, says="colour"))
        self.check("another protocol version is 400", "open", bad({**prompt, "version": PROTOCOL_VERSION + 98}, says="version"))
        self.check("a missing field is 400", "verify", bad({"type": "verify", "position": 1, "draft_tokens": [], "draft_probs": []},
                                                          "verify", says="session_id"))
        self.check("an unknown session is 404", "verify",
                   bad({"type": "verify", "session_id": "nosuch-session", "position": 1, "draft_tokens": [], "draft_probs": []},
                       "verify", "unknown_session"))
        self.check("a stale position is 409", "verify", self._stale, needs=("step",))
        self.check("a tokenizer mismatch is 409", "open", self._mismatch, needs=("prompt",))
        self.check("a draft over the gateway's limit is 413", "verify", self._draft_limit, needs=("s1",))
        self.check("max_new_tokens over the gateway's limit is 413", "open", self._budget_limit, needs=("info",))
        self.check("an unknown model is 404", "open", bad({**prompt, "model": "no-such-model-anywhere"}, code="unknown_model"))
        self.check("an unknown route is 404", "-", self._unknown_route)
        self.check("a schema with an unknown keyword is 400", "open",
                   bad({**prompt, "constraint": {"kind": "json_schema", "source": {"type": "object", "colour": 1}}}, says="colour"))

    def _stale(self) -> str:
        step = self.state["step"][0]
        opened = self.open_tokens()
        _parse(VerifyResult, self.verify(opened.session_id, opened.position, []))
        reply = _expect_error(self.verify(opened.session_id, opened.position, [step.next_token]), "wrong_position")
        return f"409 wrong_position ({reply.message})"

    def _mismatch(self) -> str:
        body = {"type": "open", "prompt_tokens": self.state["prompt"], "tokenizer_fingerprint": "0" * 24}
        _expect_error(self.post("open", body), "tokenizer_mismatch")
        return "409 tokenizer_mismatch"

    def _draft_limit(self) -> str:
        info = self.state["info"]
        if info.max_draft_tokens >= MAX_DRAFT_TOKENS:
            raise _Skipped(f"the gateway's draft limit is the protocol's own ({MAX_DRAFT_TOKENS}): the schema refuses longer drafts")
        opened = self.open_tokens()
        n = info.max_draft_tokens + 1
        _expect_error(self.verify(opened.session_id, opened.position, [self.state["prompt"][0]] * n), "too_large")
        return f"{n} drafts: 413 too_large"

    def _budget_limit(self) -> str:
        info = self.state["info"]
        if info.max_new_tokens >= 32_768:
            raise _Skipped("the gateway's max_new_tokens is the protocol's own ceiling")
        body = {"type": "open", "prompt_text": "The", "max_new_tokens": info.max_new_tokens + 1}
        _expect_error(self.post("open", body), "too_large")
        return f"max_new_tokens {info.max_new_tokens + 1}: 413 too_large"

    def _unknown_route(self) -> str:
        _expect_error(self.http.get("/v1/no-such-route"), "not_found")
        return "404 not_found"


def run_conformance(url: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                    transport: httpx.BaseTransport | None = None) -> ConformanceReport:
    """Check the gateway at `url` against the documented protocol (see the module's docstring)."""
    return Conformance(url, api_key=api_key, timeout_s=timeout_s, transport=transport).run()


__all__ = ["run_conformance", "Conformance", "ConformanceReport", "Check", "PASS", "FAIL", "SKIP"]
