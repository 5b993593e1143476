"""Wire messages between the device (SDK) and the gateway.

Every message is a pydantic v2 model defined here once; transports serialise them as JSON and
nothing else builds them by hand. The flow of one speculative session:

    OpenSession  ->  SessionOpened        the gateway prefills the prompt into a session KV cache
    VerifyRequest -> VerifyResult         repeated: k draft tokens in, accepted count + next token out
    AppendRequest -> AppendResult         `assist` mode: device tokens taken as they are, the target's next token out
    CloseSession ->  SessionClosed

Only new tokens travel after the open: a verify names the position its first draft token would
occupy, so a stale or replayed request is refused instead of corrupting the session.

`GenerateRequest` -> a stream of `GenerateChunk` is the `cloud` mode: the gateway's model alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1

# Hard ceilings the schema enforces on its own; a gateway's configured limits may be lower.
MAX_DRAFT_TOKENS = 64
MAX_PROMPT_TOKENS = 32_768
MAX_SPARSE_SUPPORT = 256
MAX_APPEND_TOKENS = 1024
MAX_TOP_LOGPROBS = 20

TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = PROTOCOL_VERSION

    @model_validator(mode="after")
    def _known_version(self) -> "_Message":
        if self.version != PROTOCOL_VERSION:
            raise ValueError(
                f"protocol version {self.version} is not supported (this side speaks {PROTOCOL_VERSION})"
            )
        return self


class SamplingParams(BaseModel):
    """How the target samples. temperature 0 means greedy (then top_p and seed are unused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ToolCallMessage(BaseModel):
    """A call an assistant turn made, as the chat template renders it back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    arguments: dict | str = Field(description="the arguments object, or its JSON text")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)
    tool_calls: list[ToolCallMessage] | None = Field(None, max_length=64, description="assistant turns: the calls it made")


class SparseDist(BaseModel):
    """A probability distribution given by its support: `probs[i]` is the probability of `ids[i]`.

    The drafter samples from exactly this distribution (its own, truncated to a few hundred of
    the likeliest tokens and renormalised), so the gateway can compute the lossless residual
    max(0, p - q) without the drafter's full vocabulary travelling.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ids: list[TokenId] = Field(min_length=1, max_length=MAX_SPARSE_SUPPORT)
    probs: list[Probability] = Field(min_length=1, max_length=MAX_SPARSE_SUPPORT)

    @model_validator(mode="after")
    def _consistent(self) -> "SparseDist":
        if len(self.ids) != len(self.probs):
            raise ValueError(f"ids ({len(self.ids)}) and probs ({len(self.probs)}) differ in length")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must be distinct")
        total = sum(self.probs)
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"probs must sum to 1, not {total:.6f}")
        return self


class Constraint(BaseModel):
    """Structured output: what the generated text must match. Both sides compile it with their
    own tokenizer (local_runtime/grammar.py): the device drafts under it, the gateway masks the
    target under it, so every token emitted follows it.

    kind         source
    json_schema  the JSON Schema (an object)
    json_object  none: any JSON object
    regex        the pattern (a string)
    tool_call    {"tools": [{"name", "description", "parameters"}], "parallel": bool, "name": a tool to force}:
                 one or more calls in the model's own tool-call envelope
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json_schema", "json_object", "regex", "tool_call"]
    source: dict | str | None = None


class _Prompt(_Message):
    """A prompt in one of three forms: token ids in the target's tokenizer (with the fingerprint
    of the tokenizer that made them), chat messages the gateway renders with its own model's chat
    template, or raw text the gateway tokenizes itself. The last two need no shared tokenizer."""

    prompt_tokens: list[TokenId] | None = Field(None, min_length=1, max_length=MAX_PROMPT_TOKENS)
    tokenizer_fingerprint: str | None = Field(None, min_length=8, max_length=128)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    prompt_text: str | None = Field(None, min_length=1, max_length=400_000)
    resume_text: str | None = Field(
        None, max_length=400_000,
        description="text already generated for this prompt (by an earlier session, or by the device "
        "while the gateway was unreachable): the new session continues after it",
    )
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = Field(256, ge=1, le=32_768)
    model: str | None = Field(None, description="target model name; the gateway's default if omitted")
    constraint: Constraint | None = Field(None, description="structured output: every generated token follows this grammar")
    tools: list[dict] | None = Field(
        None, max_length=128, description="messages prompts: the tools ({name, description, parameters}) the chat "
        "template renders into the system prompt",
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> "_Prompt":
        given = [n for n in ("prompt_tokens", "messages", "prompt_text") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt_tokens, messages or prompt_text (got {given or 'none'})")
        if self.prompt_tokens is not None and self.tokenizer_fingerprint is None:
            raise ValueError("prompt_tokens need the tokenizer_fingerprint they were made with")
        return self

    @property
    def text_space(self) -> bool:
        """True when the prompt is text: the device and the target need not share a tokenizer."""
        return self.prompt_tokens is None


class OpenSession(_Prompt):
    """Start a session: the prompt is prefilled into a KV cache on the gateway.

    With `prompt_tokens` the session verifies token ids (`VerifyRequest`) and the fingerprint must
    equal the target's, because token ids would otherwise mean different strings. With
    `messages` or `prompt_text` it verifies text (`VerifyTextRequest`): the device and the target
    may use different tokenizers.
    """

    type: Literal["open"] = "open"
    resume_tokens: list[TokenId] | None = Field(
        None, max_length=MAX_PROMPT_TOKENS,
        description="target token ids already generated after this prompt: re-opens a session the gateway "
        "evicted, in the state it had (they count towards max_new_tokens)",
    )


class SessionOpened(_Message):
    type: Literal["opened"] = "opened"
    session_id: str = Field(description="unguessable; its prefix names the replica that holds the session")
    position: int = Field(
        description="token sessions: the sequence length (the prompt, plus resume_tokens); "
        "text sessions: target tokens generated so far (0 unless resumed)"
    )
    text_space: bool = False
    model: str
    eos_token_ids: list[int]
    expires_in_s: float


class VerifyRequest(_Message):
    """k draft tokens for positions `position` .. `position + k - 1`.

    `draft_probs[i]` is the drafter's probability of `draft_tokens[i]` (informative under greedy,
    used by the accept rule under sampling). Under sampling `draft_dists[i]` is the full (sparse)
    distribution draft token i was sampled from; it is required there for the residual.
    """

    type: Literal["verify"] = "verify"
    session_id: str = Field(min_length=1, max_length=128)
    position: int = Field(ge=1)
    draft_tokens: list[TokenId] = Field(max_length=MAX_DRAFT_TOKENS)
    draft_probs: list[Probability] = Field(max_length=MAX_DRAFT_TOKENS)
    draft_dists: list[SparseDist] | None = Field(None, max_length=MAX_DRAFT_TOKENS)

    @model_validator(mode="after")
    def _lengths(self) -> "VerifyRequest":
        k = len(self.draft_tokens)
        if len(self.draft_probs) != k:
            raise ValueError(f"draft_probs has {len(self.draft_probs)} entries for {k} draft tokens")
        if self.draft_dists is not None:
            if len(self.draft_dists) != k:
                raise ValueError(f"draft_dists has {len(self.draft_dists)} entries for {k} draft tokens")
            for i, (tok, dist) in enumerate(zip(self.draft_tokens, self.draft_dists)):
                if tok not in dist.ids:
                    raise ValueError(f"draft token {i} ({tok}) is outside the support of its draft_dists entry")
        return self


class VerifyResult(_Message):
    """`accepted` draft tokens were kept; `next_token` follows them (the target's correction, or a
    bonus token when every draft was accepted). `tokens` is exactly what to append: the accepted
    drafts plus `next_token`, cut at end-of-sequence or the token budget."""

    type: Literal["verified"] = "verified"
    session_id: str
    accepted: int = Field(ge=0)
    next_token: int | None
    tokens: list[int]
    position: int = Field(description="the sequence length after appending `tokens`")
    finished: bool
    finish_reason: Literal["eos", "length"] | None = None


class VerifyTextRequest(_Message):
    """Text-space verify, for a drafter whose tokenizer differs from the target's.

    `draft_text` is what the drafter proposes after the `text_offset` characters generated so far
    (it may end mid-word; it must not end mid-character). `draft_eos` says the drafter ended its
    answer right after it. The gateway re-tokenises the text with the target's tokenizer, checks
    the resulting tokens in one forward pass, and answers with the target's own text.
    """

    type: Literal["verify_text"] = "verify_text"
    session_id: str = Field(min_length=1, max_length=128)
    position: int = Field(ge=0, description="target tokens generated so far (the sum of `tokens` received)")
    text_offset: int = Field(ge=0)
    draft_text: str = Field(max_length=8192)
    draft_eos: bool = False
    draft_tokens: int = Field(0, ge=0, le=MAX_DRAFT_TOKENS, description="drafter tokens behind draft_text (accounting)")


class VerifyTextResult(_Message):
    """`text` is what to append to the generated text: the accepted part of the draft as the
    target tokenised it, then the target's next token. `candidates` target tokens were tested,
    `accepted` of them kept; `tokens` are the target token ids appended."""

    type: Literal["verified_text"] = "verified_text"
    session_id: str
    text: str
    accepted: int = Field(ge=0)
    candidates: int = Field(ge=0)
    tokens: list[int]
    position: int = Field(description="target tokens generated after appending `tokens`")
    text_offset: int = Field(description="characters generated after appending `text`")
    finished: bool
    finish_reason: Literal["eos", "length"] | None = None


class AppendRequest(_Message):
    """`assist` mode: tokens the device generated itself, taken into the session as they are (no
    verification), then one target forward pass for the target's next token after them.

    Token sessions send `tokens` (target token ids; `position` is the sequence length before them,
    as in VerifyRequest). Text sessions send `text`, which the target tokenises (`position` is the
    target tokens generated so far and `text_offset` the characters, as in VerifyTextRequest).
    Empty `tokens`/`text` is one plain target decode step.
    """

    type: Literal["append"] = "append"
    session_id: str = Field(min_length=1, max_length=128)
    position: int = Field(ge=0)
    tokens: list[TokenId] | None = Field(None, max_length=MAX_APPEND_TOKENS)
    text: str | None = Field(None, max_length=16_384)
    text_offset: int | None = Field(None, ge=0, description="text sessions: characters generated so far")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="also answer the target's log-probability of next_token and of its N likeliest tokens",
    )

    @model_validator(mode="after")
    def _one_payload(self) -> "AppendRequest":
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of tokens (token sessions) or text (text sessions)")
        if self.text is not None and self.text_offset is None:
            raise ValueError("a text append needs the text_offset it continues from")
        return self


class TokenLogprob(BaseModel):
    """The target's own log-probability (log-softmax of its logits, before temperature or top-p)
    of a token it produced, and its `top` likeliest alternatives at that position."""

    model_config = ConfigDict(extra="forbid")

    token: int
    logprob: float
    top_ids: list[int] = Field(default_factory=list)
    top_logprobs: list[float] = Field(default_factory=list)


class AppendResult(_Message):
    """`appended` target tokens were taken from the request, then the target added `next_token`
    (None when the appended tokens already ended the generation). `tokens` is everything appended
    (the request's tokens, cut at end-of-sequence or the budget, then `next_token`); `text` is the
    text of `next_token` alone (text sessions: held back while it ends mid-character)."""

    type: Literal["appended"] = "appended"
    session_id: str
    appended: int = Field(ge=0)
    next_token: int | None
    text: str
    tokens: list[int]
    position: int = Field(description="token sessions: the sequence length; text sessions: target tokens generated")
    text_offset: int | None = Field(None, description="text sessions: characters generated after this reply")
    finished: bool
    finish_reason: Literal["eos", "length"] | None = None
    logprobs: TokenLogprob | None = Field(None, description="of next_token, when the request asked for top_logprobs")


class CloseSession(_Message):
    type: Literal["close"] = "close"
    session_id: str = Field(min_length=1, max_length=128)


class SessionClosed(_Message):
    type: Literal["closed"] = "closed"
    session_id: str
    generated_tokens: int


class GenerateRequest(_Prompt):
    """`cloud` mode: the gateway's model generates alone and streams the tokens and their text,
    so a device needs no copy of the target's tokenizer."""

    type: Literal["generate"] = "generate"
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="stream the target's log-probability of each token and of its N likeliest alternatives",
    )


class GenerateChunk(_Message):
    type: Literal["chunk"] = "chunk"
    tokens: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: Literal["eos", "length"] | None = Field(
        None, description="length: max_new_tokens reached, or the key's token budget for this generation spent"
    )
    logprobs: list[TokenLogprob] | None = Field(None, description="one per token, when the request asked for top_logprobs")


class GetInfo(_Message):
    """Ask the gateway for its `GatewayInfo` (over HTTP it is `GET /v1/info`, with no body)."""

    type: Literal["get_info"] = "get_info"


class GatewayInfo(_Message):
    type: Literal["info"] = "info"
    model: str
    tokenizer_fingerprint: str
    eos_token_ids: list[int]
    vocab_size: int
    max_draft_tokens: int
    max_prompt_tokens: int
    max_new_tokens: int
    replica: str | None = Field(None, description="this replica's id: the prefix of its session ids")
    auth: bool = Field(False, description="requests need `authorization: Bearer <api key>`")
    batching: bool = Field(False, description="verifies from different sessions share forward passes")
    target: dict | None = Field(None, description="how the target runs here: engine, why it was chosen for this "
                                "machine, and the figures the choice was made on")
    load_s: float | None = Field(None, description="seconds this gateway took to load its target and start (cold start)")


ErrorCode = Literal[
    "bad_request",
    "timeout",
    "forbidden",
    "unknown_session",
    "wrong_position",
    "tokenizer_mismatch",
    "too_large",
    "unknown_model",
    "session_finished",
    "capacity",
    "internal",
    "unauthorized",
    "rate_limited",
    "session_limit",
    "session_evicted",
    "not_ready",
    "not_found",
]


class ErrorReply(_Message):
    """What the gateway answers instead of a result; `code` is stable, `message` is for people."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    detail: dict | list | None = None


__all__ = [
    "PROTOCOL_VERSION",
    "MAX_DRAFT_TOKENS",
    "MAX_PROMPT_TOKENS",
    "MAX_APPEND_TOKENS",
    "MAX_TOP_LOGPROBS",
    "TokenLogprob",
    "SamplingParams",
    "ChatMessage",
    "Constraint",
    "ToolCallMessage",
    "SparseDist",
    "OpenSession",
    "SessionOpened",
    "VerifyRequest",
    "VerifyResult",
    "VerifyTextRequest",
    "VerifyTextResult",
    "AppendRequest",
    "AppendResult",
    "CloseSession",
    "SessionClosed",
    "GenerateRequest",
    "GenerateChunk",
    "GetInfo",
    "GatewayInfo",
    "ErrorReply",
    "ErrorCode",
]
