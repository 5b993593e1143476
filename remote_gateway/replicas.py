"""Scaling past one machine: replicas behind a load balancer, with sticky routing by session id.

A session's KV cache lives in one replica's memory, so every request of a session must reach
that replica. Each replica has an id (config `replica_id`, shown at /readyz and in /v1/info), and
its session ids name it: `s_<replica>.<random>`. Session-bound requests also carry the id in the
`x-tandem-session` header (the SDK's HTTP transport sends it), so any load balancer that can hash
or match on a header routes them without reading bodies, e.g. nginx:

    map $http_x_tandem_session $replica {            # s_r1.xxxx -> r1
        "~^s_(?<r>[A-Za-z0-9-]+)\\."  $r;
        default                       "";
    }
    # upstream per replica; requests with $replica go to it, the others (opens, chat
    # completions, info) to any healthy replica (least connections)

Opens and stateless requests (OpenAI chat completions, /v1/generate, /v1/info) go to any replica.
A replica that dies takes its sessions with it: clients get an error on their next verify and
open a new session elsewhere (the SDK re-opens evicted sessions the same way). Replicas share
nothing, so capacity grows linearly with them; per-key limits are per replica (a key may use
N x its limit across N replicas; put a shared limiter in the load balancer if that matters).

`StickyRouter` is a small reference implementation of that load balancer (an ASGI app over
httpx; serve it with lifespan on, so that its connections close at shutdown), used by the tests
and by `tandem gateway route`. For production, use the balancer you
run anyway with the rule above.
"""

from __future__ import annotations

import itertools
import json
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..protocols.errors import gateway_error
from ..protocols.http import SESSION_HEADER
from .sessions import replica_of

_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}


def discover(urls: list[str], timeout_s: float = 10.0) -> dict[str, str]:
    """replica id -> base URL, asked of each replica's /readyz."""
    out = {}
    for url in urls:
        url = url.rstrip("/")
        r = httpx.get(url + "/readyz", timeout=timeout_s)
        r.raise_for_status()
        out[r.json()["replica"]] = url
    return out


class StickyRouter:
    def __init__(self, replicas: dict[str, str], *, timeout_s: float = 120.0) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = {rid: url.rstrip("/") for rid, url in replicas.items()}
        self._next = itertools.cycle(sorted(self.replicas))
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None  # made in the serving loop, closed at its shutdown
        self.routed: dict[str, int] = {rid: 0 for rid in self.replicas}
        self.app = Starlette(routes=[Route("/{path:path}", self._proxy, methods=["GET", "POST"])], lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, app):
        try:
            yield
        finally:
            await self.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout_s, connect=10.0), limits=httpx.Limits(max_connections=512)
            )
        return self._client

    def pick(self, session_id: str | None) -> str | None:
        """The replica for a request: the one its session names, else the next in turn."""
        if session_id is None:
            return next(self._next)
        rid = replica_of(session_id)
        return rid if rid in self.replicas else None

    async def _proxy(self, request: Request):
        body = await request.body()
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is None and body and request.url.path.startswith("/v1/sessions/"):
            try:
                found = json.loads(body).get("session_id")
                session_id = found if isinstance(found, str) else None
            except (ValueError, AttributeError):
                pass
        rid = self.pick(session_id)
        if rid is None:
            err = gateway_error("unknown_session", f"no session '{session_id}' on any replica behind this router")
            return JSONResponse(err.to_reply().model_dump(mode="json"), status_code=err.status)
        self.routed[rid] += 1
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        upstream = self.client.build_request(
            request.method, self.replicas[rid] + request.url.path, params=request.query_params, headers=headers, content=body
        )
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.TransportError as exc:
            err = gateway_error("not_ready", f"replica '{rid}' did not answer: {type(exc).__name__}")
            return JSONResponse(err.to_reply().model_dump(mode="json"), status_code=502)
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
        out_headers["x-tandem-replica"] = rid
        return StreamingResponse(
            response.aiter_raw(), status_code=response.status_code, headers=out_headers, background=BackgroundTask(response.aclose)
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


__all__ = ["StickyRouter", "discover", "replica_of"]
