"""The gateway's config file (YAML, validated by pydantic). Every field has a default, so an
empty file (or none) serves the embedded default model on 127.0.0.1:8000."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .service import GatewayLimits


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("gemma3-270m", description="target model: a registered name, a path, NAME:int8")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    max_sessions: int = Field(64, ge=1, description="live sessions (each holds a KV cache)")
    session_ttl_s: float = Field(300.0, gt=0, description="idle seconds before a session is dropped")
    max_draft_tokens: int = Field(32, ge=0, le=64, description="draft tokens per verify")
    max_prompt_tokens: int = Field(8192, ge=1)
    max_new_tokens: int = Field(4096, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body")

    def limits(self) -> GatewayLimits:
        return GatewayLimits(
            max_sessions=self.max_sessions,
            session_ttl_s=self.session_ttl_s,
            max_draft_tokens=self.max_draft_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            max_body_bytes=self.max_body_bytes,
        )


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
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()]
        raise ValueError(f"{p}: invalid gateway config:\n  " + "\n  ".join(lines)) from exc


__all__ = ["GatewayConfig", "load_config"]
