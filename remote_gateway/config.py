"""The gateway's config file (YAML, validated by pydantic). Every field has a default, so an
empty file (or none) serves the embedded default model on 127.0.0.1:8000 without keys.

    model, backend                  the target model and what runs it
    host, port, replica_id          where it listens; the replica id prefixes its session ids
    auth, keys                      API keys (SHA-256 hashes, or read from the environment)
    max_* , *_per_key, kv_*         limits (see GatewayLimits)
    batching                        batched verification (see batching.BatchingConfig)
    edge                            connections and requests at the door (see edge.EdgeLimits)
    log_level, log_format           logs (json: one object per line)

`auth` is explicit: `keys` needs every request to carry a listed key; `none` lets anyone in (a
gateway on loopback, a private network). Left out, it is `keys` when keys are listed and `none`
otherwise, and `none` is refused on a non-loopback address unless written out.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..local_runtime.models import DEFAULT_TARGET
from ..protocols.messages import MAX_PROMPT_TOKENS
from .auth import KeyRing
from .batching import BatchingConfig
from .edge import EdgeLimits
from .service import GatewayLimits


class KeyConfig(BaseModel):
    """One API key: its id (in logs and metrics; never the key) and where its secret is."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 (hex) of the key")
    env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the key")
    max_sessions: int | None = Field(None, ge=1, description="this key's open sessions (default: max_sessions_per_key)")
    tokens_per_minute: int | None = Field(None, ge=1, description="this key's budget (default: tokens_per_minute_per_key)")

    @model_validator(mode="after")
    def _one_secret(self) -> "KeyConfig":
        if (self.sha256 is None) == (self.env is None):
            raise ValueError(f"key '{self.id}': give exactly one of sha256 or env")
        return self


class BatchingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    window_ms: float = Field(20.0, ge=0, le=1000, description="the longest a pass waits for other live sessions' "
                             "verifies to share it (never over a tenth of the last pass's time)")
    max_batch: int = Field(64, ge=1, le=1024, description="sessions per forward pass")
    max_batch_tokens: int = Field(512, ge=1, le=65536, description="packed tokens per forward pass")

    def config(self) -> BatchingConfig:
        return BatchingConfig(self.enabled, self.window_ms, self.max_batch, self.max_batch_tokens)


class EdgeSettings(BaseModel):
    """Connections and requests before any handler runs (edge.py)."""

    model_config = ConfigDict(extra="forbid")

    max_connections: int = Field(256, ge=1, description="concurrent connections; beyond them: 503")
    keepalive_timeout_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this, else the connection is dropped")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this of its headers, else 408")
    send_timeout_s: float = Field(30.0, gt=0, description="a client that reads none of its response for this is dropped")
    max_header_bytes: int = Field(16_384, ge=1024, description="all of a request's headers together")
    allowed_hosts: list[str] | None = Field(None, description="Host header allow-list ('*.example.com' allowed); unset: any")
    metrics_need_key: bool = Field(False, description="/metrics answers only with a valid API key")
    docs_need_key: bool = Field(False, description="/docs, /redoc, /openapi.json answer only with a valid API key")
    docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json at all")

    def limits(self) -> EdgeLimits:
        return EdgeLimits(**self.model_dump())


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_TARGET, description="target model: a registered name or path; NAME:w8a8|bf16|fp32|int8 "
                       "picks the torch weights, NAME@llama.cpp the llama.cpp backend, NAME@auto the fastest exact "
                       "one for this machine (W8A8 with VNNI/AMX, else llama.cpp; the choice is in /v1/info)")
    backend: Literal["transformers", "llama.cpp", "vllm"] | None = Field(
        None, description="what runs the target model (default: what the model name says, else transformers)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="transformers backend: cpu, or cuda (refused without CUDA)")
    threads: int | None = Field(None, ge=1, description="CPU threads for the model (default: every core this process may use)")
    prompt_batch: int = Field(512, ge=1, le=8192, description="llama.cpp target: prompt tokens computed together "
                              "(its n_batch and n_ubatch; the prompt's pieces, aligned at 0; later tokens go one a micro-batch)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535)
    replica_id: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,32}$", description="prefix of this replica's session ids")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    log_format: Literal["json", "text"] = "json"
    auth: Literal["keys", "none"] | None = Field(None, description="keys | none; see the module docstring")
    keys: list[KeyConfig] = Field(default_factory=list)
    max_sessions: int = Field(64, ge=1, description="live sessions (each holds a KV cache)")
    max_sessions_per_key: int | None = Field(
        None, ge=1, description="open sessions per API key (default: a quarter of max_sessions; callers without a key "
        "share max_sessions)")
    tokens_per_minute_per_key: int | None = Field(None, ge=1, description="target tokens a key may use per minute")
    kv_cache_budget_mb: float | Literal["auto"] | None = Field(
        "auto", description="all KV caches together (auto: a quarter of this machine's memory; null: no budget). At it, "
        "and at max_sessions, idle sessions are evicted: the key holding the most first, least recently used first")
    session_ttl_s: float = Field(300.0, gt=0, description="idle seconds before a session is dropped")
    max_draft_tokens: int = Field(32, ge=0, le=64, description="draft tokens per verify")
    max_append_tokens: int = Field(256, ge=0, le=1024, description="device tokens per append")
    max_prompt_tokens: int = Field(8192, ge=1, le=MAX_PROMPT_TOKENS)
    max_new_tokens: int = Field(4096, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body")
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    edge: EdgeSettings = Field(default_factory=EdgeSettings)

    @model_validator(mode="after")
    def _keys_unique(self) -> "GatewayConfig":
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError(f"key ids must be unique: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        if self.auth == "keys" and not self.keys:
            raise ValueError("auth is 'keys' but no keys are listed")
        return self

    @property
    def auth_mode(self) -> str:
        return self.auth or ("keys" if self.keys else "none")

    def check_exposure(self) -> None:
        """Refuse to serve without keys on a non-loopback address unless `auth: none` says so."""
        if self.auth is None and self.auth_mode == "none" and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} without API keys: list keys (auth: keys), or write "
                "`auth: none` to serve anyone who can reach it"
            )

    def keyring(self) -> KeyRing:
        return KeyRing.from_entries(self.keys, required=self.auth_mode == "keys")

    def limits(self) -> GatewayLimits:
        return GatewayLimits(
            max_sessions=self.max_sessions,
            session_ttl_s=self.session_ttl_s,
            max_draft_tokens=self.max_draft_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            max_body_bytes=self.max_body_bytes,
            max_append_tokens=self.max_append_tokens,
            max_sessions_per_key=self.max_sessions_per_key,
            tokens_per_minute_per_key=self.tokens_per_minute_per_key,
            kv_cache_budget_mb=self.kv_cache_budget_mb,
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | Path | None) -> GatewayConfig:
    if path is None:
        return GatewayConfig()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"gateway config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of settings at the top level")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
            + ("" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})")
            for e in exc.errors()
        ]
        raise ValueError(f"{p}: invalid gateway config:\n  " + "\n  ".join(lines)) from exc


__all__ = ["GatewayConfig", "KeyConfig", "BatchingSettings", "EdgeSettings", "load_config"]
