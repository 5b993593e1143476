"""Prometheus metrics (prometheus-client), one registry per Gateway so several gateways (tests,
replicas in one process) never collide. Served as text at GET /metrics.

    tandem_requests_total{route,status}       HTTP requests by route template and status
    tandem_request_seconds{route}             HTTP latency
    tandem_errors_total{code}                 error replies by code (rate_limited, session_evicted, ...)
    tandem_verifies_total{kind}               verify rounds: tokens | text | append
    tandem_verify_batch_size                  sessions per target forward pass
    tandem_verify_batch_tokens                packed tokens per target forward pass
    tandem_forward_seconds                    time of one (batched) forward pass and its decisions
    tandem_draft_tokens_total                 draft tokens tested
    tandem_accepted_tokens_total              draft tokens accepted
    tandem_acceptance_ratio                   accepted / drafted, per verify
    tandem_tokens_total{kind}                 prompt | generated | appended target tokens
    tandem_sessions                           live sessions
    tandem_sessions_opened_total
    tandem_session_evictions_total{reason}    ttl | memory
    tandem_kv_cache_bytes                     bytes held by all sessions' KV caches
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tandem_requests", "HTTP requests", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "tandem_request_seconds", "HTTP request latency", ["route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.errors = Counter("tandem_errors", "error replies by code", ["code"], registry=r)
        self.verifies = Counter("tandem_verifies", "verify rounds", ["kind"], registry=r)
        self.batch_size = Histogram("tandem_verify_batch_size", "sessions per target forward pass", registry=r, buckets=_SIZES)
        self.batch_tokens = Histogram(
            "tandem_verify_batch_tokens", "packed tokens per target forward pass", registry=r,
            buckets=(1, 4, 16, 64, 128, 256, 512, 1024),
        )
        self.forward_seconds = Histogram(
            "tandem_forward_seconds", "one target forward pass and its decisions", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.drafted = Counter("tandem_draft_tokens", "draft tokens tested", registry=r)
        self.accepted = Counter("tandem_accepted_tokens", "draft tokens accepted", registry=r)
        self.acceptance = Histogram(
            "tandem_acceptance_ratio", "accepted / drafted per verify", registry=r,
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
        )
        self.tokens = Counter("tandem_tokens", "target tokens", ["kind"], registry=r)
        self.sessions = Gauge("tandem_sessions", "live sessions", registry=r)
        self.opened = Counter("tandem_sessions_opened", "sessions opened", registry=r)
        self.evictions = Counter("tandem_session_evictions", "sessions evicted", ["reason"], registry=r)
        self.kv_bytes = Gauge("tandem_kv_cache_bytes", "bytes held by KV caches", registry=r)

    def track(self, sessions: Callable[[], int], kv_bytes: Callable[[], int]) -> None:
        self.sessions.set_function(sessions)
        self.kv_bytes.set_function(kv_bytes)

    def observe_batch(self, sessions: int, tokens: int, seconds: float) -> None:
        if sessions:
            self.batch_size.observe(sessions)
            self.batch_tokens.observe(tokens)
            self.forward_seconds.observe(seconds)

    def observe_verify(self, kind: str, drafted: int, accepted: int) -> None:
        self.verifies.labels(kind).inc()
        if drafted:
            self.drafted.inc(drafted)
            self.accepted.inc(accepted)
            self.acceptance.observe(accepted / drafted)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["GatewayMetrics"]
