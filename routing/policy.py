"""Policy files: which mode serves a request, read from YAML that operators write.

A policy is YAML validated by the pydantic models below (JSON Schema: `tandem policy schema`).
`Policy.choose(query, context)` is a pure function of the policy, the query, the request's
context and (when a rule or the query router needs it) the query's difficulty score:

    1. offline (context.online is False)      -> local                     rule "network.offline"
    2. the first rule whose `when` matches    -> that rule's mode          rule "<its name>"
    3. a query router, when the policy has one -> hard_mode if difficulty >= threshold,
                                                 else easy_mode            rule "query_router"
    4. otherwise                              -> defaults.mode             rule "defaults"
    then overrides, in this order:
    a. a cloud budget used up (tokens this minute / today) and a mode that uses the cloud
                                              -> budgets.on_exhausted     overridden_by "budgets..."
    b. a round-trip time above network.slow_rtt_ms in speculative mode (one round trip per
       few tokens) and network.on_slow set  -> network.on_slow          overridden_by "network.slow_rtt_ms"

The difficulty is context.difficulty when the caller has it (e.g. the device's prefill router
scored the prompt already), else the policy's query router scores the query (FailSafe-wrapped:
an error counts as maximal difficulty, and `Decision.router_escalated` says so).

Reading files (with a line number in every error) is in policy_files.py: `check_policy_text` /
`tandem policy check FILE` report every problem with its line, field path and offending value;
`load_policy(path)` raises `PolicyFileError` carrying the same list.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import DEFAULT_QUERY_ROUTER, query_router_names, token_router_names, valid_score

Mode = Literal["local", "cloud", "speculative", "assist"]
# what a rule or the defaults may choose: a mode, or "auto": the client predicts seconds and
# cloud passes per token for each of `objective.modes` from what it measured, and picks by
# `objective.kind` (sdk/auto.py)
Choice = Literal["local", "cloud", "speculative", "assist", "auto"]
NetworkState = Literal["online", "offline", "slow"]
CLOUD_MODES: frozenset[str] = frozenset({"cloud", "speculative", "assist", "auto"})
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


def _known(name: str, names: dict[str, str], kind: str) -> str:
    from .base import router_alias

    if router_alias(name) not in names:
        raise ValueError(f"unknown {kind} router {name!r} (known: {', '.join(names)})")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenRouterSpec(_Strict):
    """Which token router judges the device's tokens in `assist` mode, and its threshold: a token
    whose score is below it is replaced by the cloud model's."""

    name: str = Field("confidence", description="A registered token router: confidence, entropy, reward.")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Scores below this ask the cloud for the token.")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        return _known(v, token_router_names(), "token")


class QueryRouterSpec(_Strict):
    """A query router deciding, for requests no rule matched, between a mode for hard queries
    and one for easy queries."""

    name: str = Field(DEFAULT_QUERY_ROUTER, description="A registered query router: format (default), embedding, mf, knn, ensemble, prefill, length, random.")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Difficulty at or above which a query is hard. Default 0.5 (no expected gain)."
    )
    cloud_share: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Instead of a threshold: the share of queries to treat as hard (calibrated on the router's training prompts).",
    )
    hard_mode: Choice = Field("speculative", description="Mode for hard queries.")
    easy_mode: Choice = Field("local", description="Mode for easy queries.")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        return _known(v, query_router_names(), "query")

    @model_validator(mode="after")
    def _one_threshold(self) -> "QueryRouterSpec":
        if self.threshold is not None and self.cloud_share is not None:
            raise ValueError("give either threshold or cloud_share, not both")
        return self


class Match(_Strict):
    """Conditions of a rule; all given ones must hold (an empty `when` always matches)."""

    tags_any: list[str] = Field(default_factory=list, description="At least one of these tags is on the request.")
    tags_all: list[str] = Field(default_factory=list, description="All of these tags are on the request.")
    tags_none: list[str] = Field(default_factory=list, description="None of these tags is on the request.")
    min_chars: int | None = Field(None, ge=0, description="The prompt has at least this many characters.")
    max_chars: int | None = Field(None, ge=0, description="The prompt has at most this many characters.")
    min_difficulty: float | None = Field(None, ge=0.0, le=1.0, description="The query router's score is at least this.")
    max_difficulty: float | None = Field(None, ge=0.0, le=1.0, description="The query router's score is below this.")
    network: list[NetworkState] | None = Field(None, description="The network is in one of these states.")

    @model_validator(mode="after")
    def _ranges(self) -> "Match":
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        if (
            self.min_difficulty is not None
            and self.max_difficulty is not None
            and self.min_difficulty >= self.max_difficulty
        ):
            raise ValueError(f"min_difficulty ({self.min_difficulty}) must be below max_difficulty ({self.max_difficulty})")
        return self

    @property
    def needs_difficulty(self) -> bool:
        return self.min_difficulty is not None or self.max_difficulty is not None


class Rule(_Strict):
    name: str = Field(..., pattern=_NAME, description="Shown in every decision this rule makes.")
    description: str | None = None
    when: Match = Field(default_factory=Match)
    mode: Choice
    draft_len: int | None = Field(None, ge=1, le=64, description="Tokens drafted per verify round (speculative).")
    token_router: TokenRouterSpec | None = None


class Budgets(_Strict):
    cloud_tokens_per_minute: int | None = Field(None, ge=1)
    cloud_tokens_per_day: int | None = Field(None, ge=1)
    on_exhausted: Mode = Field("local", description="Mode once a budget is used up (must not use the cloud).")

    @field_validator("on_exhausted")
    @classmethod
    def _no_cloud(cls, v: str) -> str:
        if v in CLOUD_MODES:
            raise ValueError("on_exhausted must not use the cloud (it is what runs once the cloud budget is spent)")
        return v


class Network(_Strict):
    offline: Literal["local"] = Field("local", description="With no network, the device runs alone.")
    slow_rtt_ms: float | None = Field(None, gt=0, description="Round-trip time above which the network counts as slow.")
    on_slow: Mode | None = Field(None, description="Mode replacing speculative on a slow network (e.g. assist or local).")


class Objective(_Strict):
    """How `auto` (a rule's or the defaults' mode) picks among `modes`."""

    kind: Literal["latency", "cost", "weighted"] = Field(
        "latency", description="latency: fewest seconds per token; cost: fewest cloud passes per token; "
        "weighted: seconds + cost_weight x cloud passes, per token",
    )
    cost_weight: float = Field(0.0, ge=0, description="Seconds one cloud forward pass is worth (weighted only).")
    modes: list[Mode] = Field(default_factory=lambda: ["cloud", "speculative"], min_length=1,
                              description="The modes auto may choose (default: the lossless ones).")


class Defaults(_Strict):
    mode: Choice = "speculative"
    draft_len: int = Field(4, ge=1, le=64)
    token_router: TokenRouterSpec = Field(default_factory=TokenRouterSpec)


def _default_fallbacks() -> dict[str, list[str]]:
    return {"cloud": ["local"], "speculative": ["local"], "assist": ["local"]}


class Policy(_Strict):
    """A routing policy (see the module docstring for how a decision is made)."""

    version: Literal[1] = 1
    name: str | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    query_router: QueryRouterSpec | None = None
    rules: list[Rule] = Field(default_factory=list)
    budgets: Budgets = Field(default_factory=Budgets)
    network: Network = Field(default_factory=Network)
    objective: Objective = Field(default_factory=Objective)
    fallbacks: dict[Mode, list[Mode]] = Field(
        default_factory=_default_fallbacks,
        description="Modes to try, in order, when a mode fails at run time (e.g. the cloud is unreachable).",
    )

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for r in rules:
            if r.name in seen:
                raise ValueError(f"two rules are named {r.name!r}")
            seen.add(r.name)
        return rules

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks(cls, fb: dict[str, list[str]]) -> dict[str, list[str]]:
        for mode, chain in fb.items():
            if mode in chain:
                raise ValueError(f"mode {mode!r} lists itself as its own fallback")
            if mode == "local" and chain:
                raise ValueError("local needs no fallback (it does not use the network)")
        return fb

    # -- deciding ------------------------------------------------------------------------------

    @property
    def needs_difficulty(self) -> bool:
        return self.query_router is not None or any(r.when.needs_difficulty for r in self.rules)

    def choose(self, query: str, context: "RequestContext | None" = None, *, router: Any = None) -> "Decision":
        """The mode and settings for one request (pure: the same inputs give the same decision).

        router: the query router to score the difficulty with when context.difficulty is None
        (default: the one named in `query_router`, else the registry's default), FailSafe-wrapped
        here if it is not already."""
        ctx = context or RequestContext()
        state = _DifficultyState(self, query, ctx, router)
        if not ctx.online:
            return self._decide("local", "network.offline", "the device is offline", None, state)
        for rule in self.rules:
            hit, why = _matches(rule.when, query, ctx, state)
            if hit:
                return self._decide(rule.mode, rule.name, why, rule, state)
        if self.query_router is not None:
            d = state.value()
            t = state.threshold()
            hard = d >= t
            mode = self.query_router.hard_mode if hard else self.query_router.easy_mode
            why = f"difficulty {d:.3f} {'>=' if hard else '<'} threshold {t:.3f} ({self.query_router.name} router)"
            return self._decide(mode, "query_router", why, None, state)
        return self._decide(self.defaults.mode, "defaults", "no rule matched", None, state)

    def _decide(self, mode: str, rule: str, why: str, matched: "Rule | None", state: "_DifficultyState") -> "Decision":
        ctx = state.ctx
        overridden_by = None
        b = self.budgets
        if mode in CLOUD_MODES:
            if b.cloud_tokens_per_minute is not None and ctx.cloud_tokens_last_minute >= b.cloud_tokens_per_minute:
                overridden_by = "budgets.cloud_tokens_per_minute"
                why += f"; cloud budget used up ({ctx.cloud_tokens_last_minute}/{b.cloud_tokens_per_minute} tokens this minute)"
            elif b.cloud_tokens_per_day is not None and ctx.cloud_tokens_today >= b.cloud_tokens_per_day:
                overridden_by = "budgets.cloud_tokens_per_day"
                why += f"; cloud budget used up ({ctx.cloud_tokens_today}/{b.cloud_tokens_per_day} tokens today)"
            if overridden_by:
                why += f" -> {b.on_exhausted}"
                mode = b.on_exhausted
        n = self.network
        if (
            overridden_by is None
            and mode == "speculative"
            and n.on_slow is not None
            and n.slow_rtt_ms is not None
            and ctx.rtt_ms is not None
            and ctx.rtt_ms > n.slow_rtt_ms
        ):
            overridden_by = "network.slow_rtt_ms"
            why += f"; round trip {ctx.rtt_ms:.0f} ms > {n.slow_rtt_ms:.0f} ms -> {n.on_slow}"
            mode = n.on_slow
        tr = (matched.token_router if matched and matched.token_router else None) or self.defaults.token_router
        k = (matched.draft_len if matched and matched.draft_len else None) or self.defaults.draft_len
        return Decision(
            mode=mode,
            draft_len=k,
            token_router=tr.name,
            threshold=tr.threshold,
            rule=rule,
            reason=why,
            overridden_by=overridden_by,
            difficulty=state.computed,
            router_escalated=state.escalated,
            fallbacks=list(self.fallbacks.get(mode, [] if mode == "local" else ["local"])),
        )


class RequestContext(BaseModel):
    """What the caller knows about a request besides its text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tags: frozenset[str] = frozenset()
    online: bool = True
    rtt_ms: float | None = Field(None, ge=0)
    cloud_tokens_last_minute: int = Field(0, ge=0)
    cloud_tokens_today: int = Field(0, ge=0)
    difficulty: float | None = Field(None, description="A query-router score already computed for this query.")


class Decision(BaseModel):
    """What `Policy.choose` decided, and why."""

    model_config = ConfigDict(frozen=True)

    mode: Choice
    draft_len: int
    token_router: str
    threshold: float
    rule: str  # the rule that decided: a rule's name, "query_router", "defaults" or "network.offline"
    reason: str
    overridden_by: str | None = None  # "budgets.cloud_tokens_per_minute", "budgets.cloud_tokens_per_day", "network.slow_rtt_ms"
    difficulty: float | None = None
    router_escalated: bool = False  # the query router failed and its failure counted as "hard"
    fallbacks: list[Mode] = Field(default_factory=list)


class _DifficultyState:
    """The difficulty of one query, computed at most once and only when a step needs it."""

    def __init__(self, policy: Policy, query: str, ctx: RequestContext, router: Any) -> None:
        self.policy, self.query, self.ctx, self._router = policy, query, ctx, router
        self.computed: float | None = None
        self.escalated = False

    def router(self):
        from .base import FailSafe, get_query_router

        if self._router is None:
            name = self.policy.query_router.name if self.policy.query_router else None
            try:
                self._router = get_query_router(name)
            except Exception as exc:  # noqa: BLE001 - a router that cannot be built escalates too
                self._router = FailSafe(_Unavailable(name or "default", exc))
        elif not isinstance(self._router, FailSafe):
            self._router = FailSafe(self._router)
        return self._router

    def value(self) -> float:
        if self.computed is None:
            if self.ctx.difficulty is not None:
                d = self.ctx.difficulty
                if not valid_score(d):
                    self.escalated, d = True, 1.0
            else:
                r = self.router()
                before = r.stats.escalations
                d = r.score(self.query)
                self.escalated = r.stats.escalations > before
            self.computed = float(d)
        return self.computed

    def threshold(self) -> float:
        spec = self.policy.query_router
        if spec is None or (spec.threshold is None and spec.cloud_share is None):
            return 0.5
        if spec.threshold is not None:
            return spec.threshold
        router = self.router()
        calibration = getattr(router, "calibration", None) or getattr(getattr(router, "router", None), "calibration", None)
        if calibration is None:
            return 0.5  # an uncalibrated (or unavailable) router: the neutral threshold
        return calibration.threshold_for_share(spec.cloud_share)


class _Unavailable:
    """Stands in for a query router that could not be built: every score is an error, so the
    FailSafe around it escalates (and counts) each query."""

    calibration = None

    def __init__(self, name: str, exc: Exception) -> None:
        self.name, self.exc = name, exc

    def score(self, query: str) -> float:
        raise RuntimeError(f"query router {self.name!r} is unavailable: {self.exc}")


def _matches(m: Match, query: str, ctx: RequestContext, state: _DifficultyState) -> tuple[bool, str]:
    why: list[str] = []
    if m.tags_any:
        hit = sorted(ctx.tags & set(m.tags_any))
        if not hit:
            return False, ""
        why.append(f"tag {hit[0]!r}")
    if m.tags_all:
        if not set(m.tags_all) <= ctx.tags:
            return False, ""
        why.append(f"tags {sorted(m.tags_all)}")
    if m.tags_none and ctx.tags & set(m.tags_none):
        return False, ""
    n = len(query)
    if m.min_chars is not None:
        if n < m.min_chars:
            return False, ""
        why.append(f"{n} chars >= {m.min_chars}")
    if m.max_chars is not None:
        if n > m.max_chars:
            return False, ""
        why.append(f"{n} chars <= {m.max_chars}")
    if m.network is not None:
        net = network_state(ctx, state.policy.network.slow_rtt_ms)
        if net not in m.network:
            return False, ""
        why.append(f"network {net}")
    if m.needs_difficulty:
        d = state.value()
        if m.min_difficulty is not None and d < m.min_difficulty:
            return False, ""
        if m.max_difficulty is not None and d >= m.max_difficulty:
            return False, ""
        why.append(f"difficulty {d:.3f}")
    return True, "matched: " + (", ".join(why) if why else "always")


def network_state(ctx: RequestContext, slow_rtt_ms: float | None) -> str:
    if not ctx.online:
        return "offline"
    if ctx.rtt_ms is not None and slow_rtt_ms is not None and ctx.rtt_ms > slow_rtt_ms:
        return "slow"
    return "online"


def policy_json_schema() -> dict:
    """The JSON Schema of policy files (for editors: yaml-language-server and the like)."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tandem routing policy"
    return schema


__all__ = [
    "Policy",
    "Rule",
    "Match",
    "Budgets",
    "Network",
    "Defaults",
    "TokenRouterSpec",
    "QueryRouterSpec",
    "RequestContext",
    "Decision",
    "policy_json_schema",
    "CLOUD_MODES",
    "Objective",
]
