"""Every error tandem raises on purpose, in one tree (re-exported from `tandem.sdk`).

    TandemError
    ├── ModelLoadError            a model could not be found or loaded (names what is missing)
    ├── BackendUnavailable        an optional device backend is not installed or cannot run this model
    │   └── UnsupportedModel      the model's architecture is not one the chunked backends lay out
    ├── ConfigError (ValueError)  a gateway config file that does not validate (names the field)
    ├── PolicyFileError (ValueError)  a routing policy file that does not validate (file:line: field)
    ├── RouterUnavailable         a router cannot score (its FailSafe sends every query to the cloud)
    │   ├── ArtifactMissing (FileNotFoundError)   its trained weights are not there
    │   └── EmbeddingUnavailable (ImportError)    its sentence encoder is not installed
    ├── GraphError                a task graph that cannot run (lists every problem)
    ├── GraphRunError             a task graph run that could not complete (has `.report`)
    ├── PlacementError            no device may run a task (its constraints exclude every one)
    ├── GrammarError (ValueError)  a structured-output constraint that cannot compile (names the
    │                             request parameter; `.too_large` past a size or time limit)
    ├── GrammarViolation (ValueError)  tokens a constraint's grammar does not admit
    ├── TransportError            the gateway could not be reached or did not answer in time
    └── GatewayError              the gateway answered with an error (has `.code` and `.status`)
        ├── UnknownSessionError   the session id is not (or no longer) known to the gateway      404
        │   └── SessionEvictedError  the gateway dropped it (idle TTL or KV-cache memory);     410
        │                            re-open it with `resume_tokens`
        ├── WrongPositionError    a verify named a position the session is not at              409
        ├── TokenizerMismatchError  drafter and target tokenizers differ where they must agree  409
        ├── RequestTooLargeError  a limit was exceeded (prompt, draft length, body size)       413
        ├── AuthenticationError   no API key, or one the gateway does not know                 401
        └── RateLimitError        tokens per minute or sessions per key used up; has           429
                                  `.retry_after_s` (also the Retry-After header)

A gateway error's wire form is an `ErrorReply` whose `code` picks the class back on the client
(`from_reply`). Lower-level exceptions (httpx, pydantic, aiomqtt) are mapped to the most specific
of these with `raise ... from exc`, so callers catch one family; the classes that replace a
builtin (`ValueError`, `ImportError`) still are one, for callers that catch the builtin.
"""

from __future__ import annotations

from typing import Any

from .messages import ErrorReply


class TandemError(Exception):
    """Base of every error tandem raises on purpose."""


class ModelLoadError(TandemError):
    pass


class GrammarError(TandemError, ValueError):
    """A constraint that cannot be compiled. `param` names the request field it came from,
    `path` the place in a schema; `too_large` marks a grammar over a size or time limit (413)."""

    def __init__(self, message: str, *, param: str = "constraint", path: str | None = None, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.path = path
        self.too_large = too_large


class GrammarViolation(TandemError, ValueError):
    """Tokens that the grammar does not admit (a device or a request that did not follow it)."""


class BackendUnavailable(TandemError):
    """An optional backend whose package is not installed, or that cannot run this model."""


class UnsupportedModel(BackendUnavailable):
    """A model whose layers the chunked prefill and the lean loop cannot lay out."""


class ConfigError(TandemError, ValueError):
    """A configuration file that is missing, not YAML, or invalid (the message names each field)."""


class PolicyFileError(TandemError, ValueError):
    """A policy file with problems; `issues` lists each (file:line: field: message)."""

    def __init__(self, filename: str, issues: list[Any]) -> None:
        self.filename = filename
        self.issues = issues
        super().__init__("\n".join(i.format(filename) for i in issues))


class RouterUnavailable(TandemError):
    """A router that cannot score any query (what it needs is missing)."""


class ArtifactMissing(RouterUnavailable, FileNotFoundError):
    """A trained router's artefact file is not where it should be."""


class EmbeddingUnavailable(RouterUnavailable, ImportError):
    """The sentence encoder a router reads is not installed."""


class GraphError(TandemError):
    """A graph that cannot run; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str], name: str = "graph") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{name} is invalid ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


class GraphRunError(TandemError):
    """A run that could not complete; `report` (a taskgraph RunReport) says how far it got."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


class PlacementError(TandemError):
    """No processor can run a task (its constraints exclude every device that is up)."""


class TransportError(TandemError):
    pass


class GatewayError(TandemError):
    """An error the gateway answers with. Each subclass has its own `code` and HTTP `status`;
    `GatewayError(message)` uses them, `code=` / `status=` override."""

    code: str = "bad_request"
    status: int = 400

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        detail: Any = None,
        retry_after_s: float | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        super().__init__(f"[{self.code}] {message}")
        self.message = message
        self.detail = detail
        self.retry_after_s = retry_after_s

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, message=self.message, detail=self.detail)


class UnknownSessionError(GatewayError):
    code, status = "unknown_session", 404


class SessionEvictedError(UnknownSessionError):
    code, status = "session_evicted", 410


class WrongPositionError(GatewayError):
    code, status = "wrong_position", 409


class TokenizerMismatchError(GatewayError):
    code, status = "tokenizer_mismatch", 409


class RequestTooLargeError(GatewayError):
    code, status = "too_large", 413


class AuthenticationError(GatewayError):
    code, status = "unauthorized", 401


class RateLimitError(GatewayError):
    code, status = "rate_limited", 429


# error code -> (class, HTTP status); every ErrorCode of messages.py has a row
_BY_CODE: dict[str, tuple[type[GatewayError], int]] = {
    "bad_request": (GatewayError, 400),
    "forbidden": (GatewayError, 403),
    "timeout": (GatewayError, 408),
    "unknown_session": (UnknownSessionError, 404),
    "unknown_model": (GatewayError, 404),
    "not_found": (GatewayError, 404),
    "wrong_position": (WrongPositionError, 409),
    "tokenizer_mismatch": (TokenizerMismatchError, 409),
    "session_finished": (GatewayError, 409),
    "session_evicted": (SessionEvictedError, 410),
    "too_large": (RequestTooLargeError, 413),
    "unauthorized": (AuthenticationError, 401),
    "rate_limited": (RateLimitError, 429),
    "session_limit": (RateLimitError, 429),
    "capacity": (RateLimitError, 429),
    "internal": (GatewayError, 500),
    "not_ready": (GatewayError, 503),
}


def gateway_error(code: str, message: str, detail: Any = None, *, retry_after_s: float | None = None) -> GatewayError:
    """The exception (of the class and HTTP status that belong to `code`) for a gateway error."""
    cls, status = _BY_CODE.get(code, (GatewayError, 400))
    return cls(message, code=code, status=status, detail=detail, retry_after_s=retry_after_s)


def from_reply(reply: ErrorReply, retry_after_s: float | None = None) -> GatewayError:
    if retry_after_s is None and isinstance(reply.detail, dict):
        value = reply.detail.get("retry_after_s")
        retry_after_s = float(value) if isinstance(value, (int, float)) else None
    return gateway_error(reply.code, reply.message, reply.detail, retry_after_s=retry_after_s)


__all__ = [
    "TandemError",
    "ModelLoadError",
    "BackendUnavailable",
    "UnsupportedModel",
    "ConfigError",
    "PolicyFileError",
    "RouterUnavailable",
    "ArtifactMissing",
    "EmbeddingUnavailable",
    "GraphError",
    "GraphRunError",
    "PlacementError",
    "GrammarError",
    "GrammarViolation",
    "TransportError",
    "GatewayError",
    "UnknownSessionError",
    "SessionEvictedError",
    "WrongPositionError",
    "TokenizerMismatchError",
    "RequestTooLargeError",
    "AuthenticationError",
    "RateLimitError",
    "gateway_error",
    "from_reply",
]
