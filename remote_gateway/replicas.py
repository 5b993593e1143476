"""Scaling past one machine: gateway replicas behind a load balancer that routes by session id.

A session's KV cache lives in one replica's memory, so every request of a session must reach
that replica. Each replica has an id (config `replica_id`, shown at /readyz and in /v1/info),
and its session ids name it: `s_<replica>.<random>`. Session-bound requests repeat the id in the
`x-tandem-session` header (the SDK's HTTP transport sends it), so a balancer routes them by a
header match, without reading bodies. Opens and stateless requests (/v1/info, /v1/generate,
/v1/chat/completions, /v1/models) may go to any replica.

`nginx_config` writes that balancer as an nginx configuration (`tandem gateway nginx` prints
it, or runs nginx with it); a production deployment runs nginx with it, or puts the same
pattern in the balancer it already has (Envoy's header-based routing, or the vLLM router's
`consistent_hash` on a session header): a header match to the session's replica, any healthy
replica for the rest.

    map $http_x_tandem_session $tandem_replica   s_ra.xxxx -> ra ("" without a session)
    map $tandem_replica $tandem_upstream          ra -> tandem_replica_ra, else tandem_pool
    upstream tandem_replica_ra                    ra, the other replicas as `backup`
    upstream tandem_pool                          every replica, least connections

When a replica dies, its sessions die with it. Their requests then reach a backup, a survivor,
which answers 410 `session_evicted` (detail reason `replica`: the id names another replica), and
the SDK re-opens the session on a survivor with everything it has accepted (the prompt plus its
tokens, or `resume_text`), so the output goes on unchanged. nginx retries a request on the next server when a replica refuses the
connection, times out, fails mid-request or answers 502/503 (`proxy_next_upstream ... non_idempotent`),
but never once it has passed part of the reply on. Retrying POSTs is safe here:

- a verify or an append that reached the dead replica is retried on a survivor, which does not
  hold the session and answers 410; nothing is applied twice (the same happens to one that timed
  out on a slow replica: the client re-opens elsewhere, and the old session idles out);
- a verify retried on the same replica (the SDK repeats a request whose reply was lost) is
  answered again, not applied twice: the gateway keeps each session's last request key and reply
  (`replay_key`, checked under the session's lock in `Gateway._locked`);
- an open or a generation retried elsewhere starts afresh; if the first replica did open a
  session before it stopped answering, that session idles out by its TTL.

Replicas share nothing, so capacity grows with their number; per-key limits (sessions, tokens
per minute) are per replica, so a key may use N times its limit across N replicas (put a shared
limiter in the balancer if that matters).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import httpx

from ..protocols.http import SESSION_HEADER

# what a replica id may be (config `replica_id`); the map below extracts it from a session id
_REPLICA_ID = re.compile(r"^[A-Za-z0-9-]{1,32}$")
_SESSION_REPLICA = r"~^s_(?<r>[A-Za-z0-9-]+)\."
_POOL = "tandem_pool"


def discover(urls: list[str], timeout_s: float = 10.0) -> dict[str, str]:
    """replica id -> base URL, asked of each replica's /readyz."""
    out = {}
    for url in urls:
        url = url.rstrip("/")
        r = httpx.get(url + "/readyz", timeout=timeout_s)
        r.raise_for_status()
        out[r.json()["replica"]] = url
    return out


def _server(url: str) -> str:
    """`host:port` of a replica's plain-HTTP base URL (nginx's `server` address)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path.strip("/") or parts.query:
        raise ValueError(f"a replica's URL must be http://HOST:PORT, not '{url}'")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 80}"


def nginx_config(
    replicas: dict[str, str],
    listen: str = "127.0.0.1:8080",
    *,
    max_fails: int = 1,
    fail_timeout_s: int = 10,
    connect_timeout_s: int = 2,
    read_timeout_s: int = 300,
    keepalive: int = 32,
    max_body_bytes: int = 1_000_000,
    worker_processes: int | str = "auto",
    temp_dir: str | None = None,
) -> str:
    """A whole nginx.conf that balances `replicas` (id -> http://host:port) on `listen`.

    Session-bound requests follow their `x-tandem-session` header to their replica's upstream
    (that replica, the others as backups); everything else goes to the pool of all replicas
    (least connections). A server that fails `max_fails` times (refused, timed out, 502/503) is
    left out for `fail_timeout_s`. `connect_timeout_s` is short so that a dead replica is passed
    over quickly; `read_timeout_s` is the longest silence between two reads of a reply (a long
    prefill before an open answers, a verify queued behind a batch, a stream between tokens).
    Replies are not buffered, so NDJSON and SSE streams flow token by token. `max_body_bytes`
    should match the gateways' own limit (config `max_body_bytes`), which then answers 413 itself.

    `temp_dir`: a private instance's folder for nginx's temporary files, with no access log; None
    leaves both to the system's nginx (the production case)."""
    if not replicas:
        raise ValueError("nginx needs at least one replica")
    for rid in replicas:
        if not _REPLICA_ID.match(rid):
            raise ValueError(f"replica id '{rid}' is not 1-32 letters, digits or '-' (config replica_id)")
    servers = {rid: _server(url) for rid, url in sorted(replicas.items())}
    health = f"max_fails={max_fails} fail_timeout={fail_timeout_s}s"
    # uvicorn closes an idle keep-alive connection after 5 s: nginx lets go of it first, so that it
    # never sends a request down a connection the replica is closing
    pooled = [f"keepalive {keepalive};", "keepalive_timeout 4s;"]

    http = [
        f"# the replica a session id names: s_<replica>.<random> (header {SESSION_HEADER})",
        f"map $http_{SESSION_HEADER.replace('-', '_')} $tandem_replica {{",
        f'    "{_SESSION_REPLICA}"  $r;',
        '    default  "";',
        "}",
        "# its upstream; no session, or a replica not listed here: any replica (which answers 410",
        "# for a session of another replica, and the client re-opens it)",
        "map $tandem_replica $tandem_upstream {",
        f"    default  {_POOL};",
        *(f"    {rid}  tandem_replica_{rid};" for rid in servers),
        "}",
        "",
        *_block(f"upstream {_POOL}", ["least_conn;", *(f"server {addr} {health};" for addr in servers.values()), *pooled]),
    ]
    for rid, addr in servers.items():
        backups = [f"server {other} backup;" for o, other in servers.items() if o != rid]
        http += ["", f"# sessions of {rid}; when it is down, a survivor answers 410 and the client re-opens",
                 *_block(f"upstream tandem_replica_{rid}", [f"server {addr} {health};", *backups, *pooled])]
    if temp_dir is not None:
        http += ["", "access_log off;"]
        http += [f"{kind}_temp_path {temp_dir}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    location = _proxy("http://$tandem_upstream", connect_timeout_s, read_timeout_s)
    location += ["# safe for POSTs: verifies and appends are replay-safe, see remote_gateway/replicas.py",
                 "proxy_next_upstream error timeout http_502 http_503 non_idempotent;"]
    comment = f"# tandem gateway replicas behind nginx: {', '.join(f'{r}={u}' for r, u in sorted(replicas.items()))}"
    return _document(comment, http, listen, max_body_bytes, location, worker_processes)


def _block(head: str, lines: list[str]) -> list[str]:
    return [f"{head} {{", *(f"    {line}" if line else "" for line in lines), "}"]


def _proxy(target: str, connect_timeout_s: int, read_timeout_s: int) -> list[str]:
    """The proxying lines of `location /`, to `target`."""
    return [
        f"proxy_pass {target};",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";  # keep-alive to the replicas',
        "proxy_set_header Host $host;",
        "proxy_set_header Authorization $http_authorization;  # API keys are checked by each replica",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_buffering off;  # streams (NDJSON, SSE) token by token",
        f"proxy_connect_timeout {connect_timeout_s}s;",
        f"proxy_send_timeout {read_timeout_s}s;",
        f"proxy_read_timeout {read_timeout_s}s;",
    ]


def _document(comment: str, http: list[str], listen: str, max_body_bytes: int, location: list[str],
              worker_processes: int | str, extra_locations: list[str] = ()) -> str:
    server = [f"listen {listen};", f"client_max_body_size {max_body_bytes};", "", *_block("location /", location),
              *extra_locations]
    http = [*http, "", *_block("server", server)]
    lines = [comment, f"worker_processes {worker_processes};", *_block("events", ["worker_connections 4096;"]),
             *_block("http", http)]
    return "\n".join(lines) + "\n"


def nginx_config_dns(
    headless: str,
    pool: str,
    port: int = 8000,
    listen: str = "0.0.0.0:8080",
    *,
    resolver: str = "kube-dns.kube-system.svc.cluster.local",
    resolver_valid_s: int = 10,
    connect_timeout_s: int = 2,
    read_timeout_s: int = 300,
    max_body_bytes: int = 1_000_000,
    worker_processes: int | str = "auto",
) -> str:
    """An nginx.conf for replicas found by DNS, as a Kubernetes StatefulSet names them: a replica
    whose id is its pod name `P` answers at `P.<headless>` (the StatefulSet's headless Service),
    so a session-bound request goes to `$tandem_replica.<headless>:port` however many replicas
    there are now (an autoscaler adds and removes them; nothing here is regenerated), and the
    rest goes to `pool` (a Service over every replica). A replica that is gone (its name no longer
    resolves, or it refuses the connection) is answered with the gateway's own 410
    `session_evicted` (reason `replica`), so the client re-opens the session on a survivor."""
    for name in (headless, pool, resolver):
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", name):
            raise ValueError(f"'{name}' is not a DNS name")
    http = [
        f"resolver {resolver} valid={resolver_valid_s}s ipv6=off;",
        f"# the replica a session id names: s_<replica>.<random> (header {SESSION_HEADER})",
        f"map $http_{SESSION_HEADER.replace('-', '_')} $tandem_target {{",
        f'    "{_SESSION_REPLICA}"  $r.{headless}:{port};',
        f"    default  {pool}:{port};",
        "}",
    ]
    location = _proxy("http://$tandem_target", connect_timeout_s, read_timeout_s)
    location += ["proxy_intercept_errors off;", "error_page 502 504 = @replica_gone;"]
    gone = ('{"type":"error","code":"session_evicted","message":"the replica holding this session is gone; '
            're-open it","detail":{"reason":"replica"}}')
    extra = ["", *_block("location @replica_gone", ["default_type application/json;", f"return 410 '{gone}';"])]
    comment = f"# tandem gateway replicas found by DNS: sessions -> <replica>.{headless}:{port}, the rest -> {pool}:{port}"
    return _document(comment, http, listen, max_body_bytes, location, worker_processes, extra)


__all__ = ["discover", "nginx_config", "nginx_config_dns"]
