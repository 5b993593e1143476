"""PROTOCOL.md, generated: the gateway's wire protocol for people who implement the device side
without Python (a Kotlin or Swift app with llama.cpp on the device).

Everything that can drift comes from the code: the operations from `operations.OPERATIONS`,
the messages' JSON Schemas from the pydantic models in `messages.py`, the error codes and their
HTTP statuses from `errors.py`, the example exchanges from real message objects (so they
validate). The prose around them says what the schemas cannot: positions, the accept rule,
retries, the version rule. A test fails when the committed PROTOCOL.md differs from `render()`;
regenerate it with

    tandem gateway protocol --out PROTOCOL.md
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel

from . import errors
from .messages import (
    MAX_APPEND_TOKENS,
    MAX_DRAFT_TOKENS,
    MAX_PROMPT_TOKENS,
    MAX_SPARSE_SUPPORT,
    PROTOCOL_VERSION,
    AppendRequest,
    AppendResult,
    ChatMessage,
    CloseSession,
    ErrorCode,
    ErrorReply,
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
from .operations import OPERATIONS

# What each error code means to the device, and what to do about it. Every ErrorCode needs a line.
ERROR_MEANINGS: dict[str, str] = {
    "bad_request": "the body does not validate (the message names the field; `detail` lists each problem), "
                   "a version this gateway does not speak, or a request that does not fit the session "
                   "(e.g. text appended to a token session). Fix the request; do not retry it as it is.",
    "unauthorized": "no `authorization: Bearer <key>` header, or a key the gateway does not know.",
    "forbidden": "the request's Host header is not one this gateway answers for (its `allowed_hosts`).",
    "timeout": "the request's body did not arrive within the gateway's `body_timeout_s`. Send it again, whole.",
    "unknown_session": "no such session for this key (never opened, closed, or opened with another key). "
                       "Open a new one.",
    "unknown_model": "`model` names a model this gateway does not serve (`GET /v1/info` says which it does).",
    "not_found": "no such route.",
    "wrong_position": "the request's `position` (or `text_offset`) is not where the session is; `detail` "
                      "has `expected` and `got`. The device and the gateway disagree about the sequence: "
                      "re-open the session from the device's committed tokens.",
    "tokenizer_mismatch": "`prompt_tokens` came with a `tokenizer_fingerprint` that is not the target's: "
                          "token ids would mean different text. Open a text session instead.",
    "session_finished": "the session has already reached end-of-sequence or its `max_new_tokens`.",
    "session_evicted": "the gateway dropped the session (idle too long, or its KV-cache memory was needed), "
                       "or the id names another replica (`detail.reason` `replica`: its replica is gone, and "
                       "the request reached a survivor). Re-open it with `resume_tokens` (token sessions) or "
                       "`resume_text` (text sessions): it continues exactly where it was.",
    "too_large": "over a limit: the body, the prompt, `max_new_tokens`, a draft or an append "
                 "(`GET /v1/info` has this gateway's limits).",
    "rate_limited": "the key's target tokens per minute are used up; retry after `Retry-After` seconds "
                    "(also `detail.retry_after_s`).",
    "session_limit": "the key holds as many open sessions as it may; close one.",
    "capacity": "the gateway holds as many sessions as it can; retry later (`Retry-After`).",
    "internal": "the gateway failed; the message names the exception. Safe to retry a verify or an append "
                "(see Retries).",
    "not_ready": "`GET /readyz` only: the gateway is starting or draining.",
}

_SPEC_NOTE = (
    "<!-- Generated from protocols/messages.py, protocols/operations.py and protocols/errors.py by\n"
    "     `tandem gateway protocol --out PROTOCOL.md`; edit those, not this file. -->"
)


def _json(value: typing.Any, indent: str = "") -> str:
    """JSON indented by two spaces; arrays of plain values, and small objects of them, on one line."""
    inner = indent + "  "
    flat = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    plain = lambda v: not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v))  # noqa: E731
    if isinstance(value, dict) and all(plain(v) for v in value.values()) and len(indent) + len(flat) <= 96:
        return flat
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _json(v, inner) for v in value) + "\n" + indent + "]"
    return flat


def _example(msg: BaseModel) -> str:
    """A message as a device would send it: `type` and `version`, then every field not at its default."""
    body = {"type": msg.type, "version": msg.version, **msg.model_dump(mode="json", exclude_defaults=True)}  # type: ignore[attr-defined]
    return "```json\n" + _json(body) + "\n```"


def _operations_table() -> str:
    rows = ["| operation | HTTP | request → reply | what it does |", "| --- | --- | --- | --- |"]
    for op in OPERATIONS:
        reply = f"stream of `{op.reply.__name__}` (NDJSON)" if op.streaming else f"`{op.reply.__name__}`"
        request = "no body" if op.method == "GET" else f"`{op.request.__name__}`"
        rows.append(f"| `{op.name}` | `{op.method} {op.path}` | {request} → {reply} | {op.summary} |")
    return "\n".join(rows)


def _errors_table() -> str:
    codes = typing.get_args(ErrorCode)
    missing = [c for c in codes if c not in ERROR_MEANINGS]
    if missing:
        raise ValueError(f"error codes without a meaning in protocols/document.py ERROR_MEANINGS: {', '.join(missing)}")
    rows = ["| code | HTTP status | meaning | SDK exception |", "| --- | --- | --- | --- |"]
    for code in sorted(codes, key=lambda c: (errors.gateway_error(c, "").status, c)):
        exc = errors.gateway_error(code, "")
        rows.append(f"| `{code}` | {exc.status} | {ERROR_MEANINGS[code]} | `{type(exc).__name__}` |")
    return "\n".join(rows)


def _messages() -> list[tuple[type[BaseModel], str]]:
    """Every message once, in the order of the operations (request, reply), then the error."""
    seen: list[tuple[type[BaseModel], str]] = []
    for op in OPERATIONS:
        for model, mode in ((op.request, "validation"), (op.reply, "serialization")):
            if all(model is not m for m, _ in seen):
                seen.append((model, mode))
    seen.append((ErrorReply, "serialization"))
    return seen


def _schema_section(model: type[BaseModel], mode: str) -> str:
    doc = (model.__doc__ or "").strip()
    schema = model.model_json_schema(mode=mode)  # type: ignore[arg-type]
    which = "as sent (fields with a default may be left out)" if mode == "validation" else "as received (every field is present)"
    parts = [f"### `{model.__name__}`", ""]
    if doc:
        parts += [" ".join(line.strip() for line in doc.splitlines() if line.strip()), ""]
    parts += [f"JSON Schema, {which}:", "", "```json", _json(schema), "```", ""]
    return "\n".join(parts)


def _examples() -> str:
    fp = "5f0c1e2d3a4b5c6d7e8f9a0b"
    sid = "s_a1b2c3.Zk3v9QpR2xWm"
    sections = [
        ("Open a token session: the prompt as the target's token ids (the device renders its own chat template).",
         OpenSession(prompt_tokens=[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198], tokenizer_fingerprint=fp,
                     max_new_tokens=128)),
        ("The gateway has prefilled the prompt; the session is at position 9 (the prompt's length).",
         SessionOpened(session_id=sid, position=9, model="qwen2.5-coder-1.5b", eos_token_ids=[151645, 151643],
                       expires_in_s=600.0)),
        ("Verify 4 drafted tokens for positions 9..12, with the drafter's probability of each.",
         VerifyRequest(session_id=sid, position=9, draft_tokens=[9707, 0, 1879, 13], draft_probs=[0.91, 0.55, 0.62, 0.4])),
        ("The target accepted the first 2 and chose 3837 where the third draft was: append `tokens`; the "
         "session is now at position 12, and the next verify names that position.",
         VerifyResult(session_id=sid, accepted=2, next_token=3837, tokens=[9707, 0, 3837], position=12, finished=False)),
        ("Done with it (or let it expire after `expires_in_s` idle seconds).", CloseSession(session_id=sid)),
        ("", SessionClosed(session_id=sid, generated_tokens=3)),
    ]
    text_sections = [
        ("A text session needs no shared tokenizer: the gateway renders the chat with its own template.",
         OpenSession(messages=[ChatMessage(role="user", content="Why is the sky blue?")], max_new_tokens=128)),
        ("Drafted text after the 0 characters generated so far (never half a character).",
         VerifyTextRequest(session_id=sid, position=0, text_offset=0, draft_text="The sky looks blue", draft_tokens=4)),
        ("The target kept \"The sky\" (2 of its tokens) and wrote \" is\" next; the text continues after 10 characters.",
         VerifyTextResult(session_id=sid, text="The sky is", accepted=2, candidates=4, tokens=[785, 12884, 374], position=3,
                          text_offset=10, finished=False)),
    ]
    other = [
        ("`assist`: the device's own tokens taken as they are, then the target's next token.",
         AppendRequest(session_id=sid, position=12, tokens=[1879, 13])),
        ("", AppendResult(session_id=sid, appended=2, next_token=576, text=" The", tokens=[1879, 13, 576], position=15,
                          finished=False)),
        ("`cloud`: the target alone, streamed as NDJSON lines.", GenerateRequest(prompt_text="def fib(n):", max_new_tokens=64)),
        ("One line of the stream; the last one has `finished: true` and a `finish_reason`.",
         GenerateChunk(tokens=[198, 262], text="\n    ")),
        ("An error, with its HTTP status (here 409).",
         ErrorReply(code="wrong_position", message="verify for position 11, but session 's_a1b2c3.Zk3v9QpR2xWm' is at position 12",
                    detail={"expected": 12, "got": 11})),
    ]

    def block(items: list[tuple[str, BaseModel]]) -> str:
        out = []
        for note, msg in items:
            if note:
                out.append(note)
                out.append("")
            out.append(_example(msg))
            out.append("")
        return "\n".join(out)

    return "\n".join([
        "### Token space (the device and the target share a tokenizer)", "", block(sections),
        "### Text space (different tokenizers)", "", block(text_sections),
        "### Assist, cloud, errors", "", block(other),
    ])


def render() -> str:
    """PROTOCOL.md, as it should be committed."""
    info_fields = ", ".join(f"`{f}`" for f in GatewayInfo.model_fields if f not in ("type", "version"))
    return f"""# The tandem gateway protocol, version {PROTOCOL_VERSION}

{_SPEC_NOTE}

A device (the app, with its small model) drafts tokens; the gateway (the cloud service, with the
large model) verifies them. This document is everything a device needs to speak to a gateway
without the Python SDK: a Kotlin or Swift app running llama.cpp on the phone implements the
device side from it. `tandem gateway conformance URL` checks a gateway against it.

## Transport

- HTTP/1.1 (keep-alive recommended), JSON bodies in UTF-8 with `content-type: application/json`;
  `GET` operations have no body.
- Every message is a JSON object with a `type` (which message it is) and a `version`. Unknown
  fields are refused, never ignored.
- With API keys configured (`GatewayInfo.auth` is true) every `/v1` request sends
  `authorization: Bearer <key>`. A session answers only to the key that opened it.
- Requests that name a session repeat its id in the header `x-tandem-session`, so a load
  balancer can route them to the replica that holds the session without reading the body.
  A `502`, `503` or `504` without an `ErrorReply` body is the balancer's own: no replica
  answered; treat it as a dropped connection.
- A reply is the operation's reply message with status 200, or an `ErrorReply` with the status
  of its code (below). `429` and some `capacity` errors carry `Retry-After` (seconds).
- `generate` streams `application/x-ndjson`: one `GenerateChunk` per line, the last with
  `finished: true`. An error after the stream has started arrives as a final `ErrorReply` line.

## Versions

This is version {PROTOCOL_VERSION} (`PROTOCOL_VERSION` in protocols/messages.py). Every message carries
`version`; omitted, it is {PROTOCOL_VERSION}. A side answers a message of any other version with
`400 bad_request` naming both versions, and it refuses unknown fields the same way, so a message
is never half understood. Any change to a message's fields is a new version: a device checks
`GatewayInfo.version` once (`GET /v1/info`) and speaks that version or none.

## Operations

{_operations_table()}

Other routes, not part of the device protocol: `GET /healthz` (liveness), `GET /readyz`
(readiness: 503 `not_ready` while starting or draining), `GET /metrics` (Prometheus), and the
OpenAI-compatible `GET /v1/models` and `POST /v1/chat/completions`.

## How a device uses them

1. **Ask the gateway who it is**: `GET /v1/info` answers `GatewayInfo` ({info_fields}).
   Compare `tokenizer_fingerprint` with the drafter's: equal means token ids mean the same text
   on both sides (token sessions); different means text sessions.
2. **Open a session**: `OpenSession` with exactly one of `prompt_tokens` (token ids, with the
   `tokenizer_fingerprint` they were made with), `messages` (chat turns; the gateway applies its
   model's chat template) or `prompt_text` (raw text). The gateway prefills the prompt into the
   session's KV cache; `SessionOpened.position` is where the session is.
3. **Verify, round after round**.
   - Token sessions (`VerifyRequest`): the device drafts k tokens for positions
     `position .. position + k - 1` and sends them with the drafter's probability of each
     (`draft_probs`). The gateway runs the target once over them and answers `accepted` (how
     many drafts it kept), `next_token` (its own token after them: a correction, or a bonus
     token when all k were kept) and `tokens`, exactly what to append (the kept drafts, then
     `next_token`, cut at end-of-sequence or the token budget). The device appends `tokens`,
     rolls its KV cache back past its rejected drafts, and sends the next verify at the new
     `position`. `k = 0` is a plain decode step of the target.
   - Greedy (`temperature` 0): a draft is kept while it equals the target's greedy token (its
     argmax; where the two best logits nearly tie, the argmax recomputed over the exact prefix,
     so verifying in blocks and decoding step by step choose alike). Sampling (`temperature` > 0): draft `x`, drawn
     from the drafter's distribution `q`, is kept with probability `min(1, p(x) / q(x))`; at the
     first rejection the target draws from `max(0, p - q)` renormalised. For that the device
     must send `draft_dists`: for each draft, the sparse distribution it was drawn from (ids and
     probabilities summing to 1, at most {MAX_SPARSE_SUPPORT} of them), and it must have sampled from
     exactly that distribution.
   - Text sessions (`VerifyTextRequest`): the device sends the text of its draft after the
     `text_offset` characters generated so far (never ending inside a UTF-8 character) and
     whether it ended its answer (`draft_eos`); the gateway tokenises it with the target's
     tokenizer and answers the text to append (the accepted part of the draft as the target
     wrote it, then the target's next token). The device appends `text`, rolls its own cache
     back to its last token whose text is still a prefix of the generated text, and
     re-tokenises the rest.
4. **Assist** (`AppendRequest`): the device's own tokens (or text) are taken as they are, then
   the target adds one token. **Cloud** (`GenerateRequest`): the target generates alone and
   streams; no session.
5. **Close** (`CloseSession`) when done; an idle session expires after `expires_in_s` seconds.

**Positions.** A token session's `position` is its sequence length (prompt plus generated
tokens); a text session's is the number of target tokens generated, with `text_offset` the
number of characters. Every request names the position it expects, so a stale or replayed
request is refused (`409 wrong_position`) instead of corrupting the session.

**Retries.** A verify, verify_text or append repeated with the same position and payload right
after the first (its reply was lost in transit) gets the first reply again, and the session
advances once: retrying on a timeout or a dropped connection is always safe. If the gateway
stays unreachable, the device may go on alone and later open a new session with everything it
has committed (`resume_tokens` / `resume_text`); an evicted session (`410`, also a survivor's
answer for a replica that died) is re-opened the same way and continues exactly where it was.
A `generate` stream cut part-way is asked for again by a new `generate` whose prompt ends with
what arrived (`prompt_tokens` with the tokens received, or `resume_text`).

**Tokenizer fingerprint.** 24 lowercase hex digits: the SHA-256 of two UTF-8 strings one after
the other: the JSON array of `[token, id]` pairs of the whole vocabulary ordered by id, then the
JSON object `{{"eos": [ids, ascending], "bos": id or null}}`; both with `", "` and `": "` as
separators and non-ASCII characters written as they are. A device may instead ship the
fingerprint with its model file, computed once; the target's is in `GET /v1/info`.

**Limits.** The schemas cap a draft at {MAX_DRAFT_TOKENS} tokens, a prompt at {MAX_PROMPT_TOKENS:,} and an
append at {MAX_APPEND_TOKENS:,}; a gateway's own limits (in `GatewayInfo`) may be lower, and going over them
is `413 too_large`.

## Error codes

Every error is an `ErrorReply`: a stable `code`, a `message` for people, and sometimes `detail`.

{_errors_table()}

## Examples

Bodies as a device sends and receives them (fields at their defaults left out; ids are illustrative).

{_examples()}
## Messages

{"".join(_schema_section(model, mode) + chr(10) for model, mode in _messages()).rstrip()}
"""


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()


__all__ = ["render", "ERROR_MEANINGS"]
