"""`tandem bench simulate`: gateway replicas serving many devices, as a discrete-event simulation.

Why not SimPy: a replica's events are its packed passes, and a pass advances every session in it
at once. A loop over passes with the sessions of one replica in fixed numpy slots (as many as
its session cap) does that in a few vector operations, where SimPy would run a process and a
handful of events per session per token: ~10^7 for 100,000 devices over an hour. Replicas share
nothing once a session is placed (consistent hashing on its id, as nginx does), so each one is
simulated on its own, and a run's memory is its slots: bounded by the live sessions, not by the
devices.

One replica (the real gateway's rules and the measured pass costs, `costmodel.PassCosts`):
    admission   a request reaches the gateway half an RTT after the device sends it; at the
                session cap or the KV budget an idle session (not in a pass: its device is
                drafting, or its reply is on the way) is evicted, least recently used first, as
                the gateway's store does; its device re-opens it at its next request with every
                token it holds (a prefill of all of them). No idle session: the request is
                rejected
    a prompt    fills in chunks of `prefill_chunk_tokens`, each a job of its own on the model
                worker (as the gateway's open runs them); all of it but its last token, which the
                first step feeds
    the worker  runs jobs in the order they were handed to it (the gateway's one-thread
                executor): a chunk when its open or its previous chunk is done, a pass when the
                batcher forms it, i.e. once its previous pass is over, from the steps queued by
                then; a step that arrives later waits for the next pass even while the worker is
                busy with prompts (so a long prompt's later chunk stalls only the pass formed
                before it was handed over)
    a pass      every ready session, up to `max_batch` and `max_batch_tokens` rows: a cloud
                stream adds one row, a device's verify k + 1; it takes pass_s(rows) plus each
                request's handling
    cloud       a stream steps again in the next pass; its token reaches the device RTT/2 later
    hybrid      a verify gives 1 + min(k, G) tokens, G ~ Geometric(1 - alpha) - 1 (the accept
                rule's count at acceptance alpha); the device drafts k tokens (k x its draft
                time) before its next verify reaches the gateway, an RTT after the pass
    routed      a share of the requests (the query router's cloud share) runs as cloud, the
                rest on the device alone (ITL its draft time, no gateway)

ITL samples are the gaps between deliveries spread over the tokens each brought (as in
`bench capacity`), kept in a log-spaced histogram; TTFT is arrival to first delivery; TPOT a
request's mean time a token after its first. A session alone on its replica until the next
arrival has its passes computed at once (`_alone`: the same passes, without a loop turn each).
A fleet of more than `sample` replicas is judged on its busiest and a random draw of the others.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ...local_runtime.speculative import expected_tokens_per_round
from ...remote_gateway.batching import BatchingConfig
from ...remote_gateway.service import GatewayLimits
from ..costmodel import PassCosts
from ..taskgraph.record import PREFILL_RATIO
from .workload import Arrivals, DeviceClass

MODES = ("cloud", "hybrid", "routed")
_EDGES = np.logspace(-4, 3, 1401)  # seconds: 0.1 ms .. 1000 s, 1.2% a bin


@dataclass(frozen=True)
class GatewayRules:
    """The rules of the real gateway the simulation applies: its limits (GatewayLimits: the
    session cap, the KV budget, the prefill chunk) and its batcher's (BatchingConfig: sessions
    and rows a pass). The KV budget is off unless given (the gateway's "auto" is a share of the
    machine it runs on, which a simulated replica does not have)."""

    limits: GatewayLimits = field(default_factory=lambda: GatewayLimits(kv_cache_budget_mb=None))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    kv_bytes_per_token: int = 28_672  # Qwen2.5-1.5B: 28 layers x K,V x 2 heads x 128 x f16

    @classmethod
    def of(cls, max_sessions: int = 64, kv_budget_mb: float | None = None) -> "GatewayRules":
        return cls(GatewayLimits(max_sessions=max_sessions, kv_cache_budget_mb=kv_budget_mb))


class Histogram:
    """Weighted samples (seconds) in log-spaced bins: quantiles to ~1%, memory fixed."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(_EDGES) + 1)

    def add(self, values: np.ndarray, weights: np.ndarray | None = None) -> None:
        if len(values):
            self.counts += np.bincount(np.searchsorted(_EDGES, values), weights, minlength=len(self.counts))

    def merge(self, other: "Histogram") -> None:
        self.counts += other.counts

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        if self.total == 0:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), q * self.total))
        lo, hi = _EDGES[max(i - 1, 0)], _EDGES[min(i, len(_EDGES) - 1)]
        return float(math.sqrt(lo * hi))


@dataclass
class ReplicaStats:
    itl: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    tpot: Histogram = field(default_factory=Histogram)  # a request's mean seconds a token after its first
    # tokens delivered, requests served, rejections, evictions, passes, rows in them
    n: Counter = field(default_factory=Counter)
    peak_sessions: int = 0
    end_s: float = 0.0

    def merge(self, o: "ReplicaStats") -> None:
        self.itl.merge(o.itl)
        self.ttft.merge(o.ttft)
        self.tpot.merge(o.tpot)
        self.n.update(o.n)
        self.peak_sessions = max(self.peak_sessions, o.peak_sessions)
        self.end_s = max(self.end_s, o.end_s)


@dataclass
class Requests:
    """The requests one replica serves, sorted by when they reach it."""

    t: np.ndarray  # device send time
    gate: np.ndarray  # arrival at the gateway
    prompt: np.ndarray
    answer: np.ndarray
    hybrid: np.ndarray  # bool: verifies (else a cloud stream)
    alpha: np.ndarray
    draft_s: np.ndarray
    rtt: np.ndarray

    def subset(self, mask: np.ndarray) -> "Requests":
        return Requests(**{k: v[mask] for k, v in self.__dict__.items()})


def simulate_replica(req: Requests, costs: PassCosts, rules: GatewayRules, k: int, rng: np.random.Generator) -> ReplicaStats:
    """One replica's passes until its last session finishes."""
    order = np.argsort(req.gate, kind="stable")
    req = req.subset(order)
    st, cap, n = ReplicaStats(), rules.limits.max_sessions, len(req.t)
    chunk, max_batch, max_batch_rows = rules.limits.prefill_chunk_tokens, rules.batching.max_batch, rules.batching.max_batch_tokens
    max_rows = max(max_batch_rows, chunk, k + 1)  # a pass never holds more
    pass_s = costs.table(max_rows)
    live = np.zeros(cap, bool)
    ready = np.full(cap, np.inf)  # when its next request reaches the gateway (inf: a free slot)
    last = np.zeros(cap)  # its last delivery to the device
    seen = np.zeros(cap, bool)  # whether it has had its first token
    first_at = np.zeros(cap)  # ... and when
    remaining = np.zeros(cap, np.int64)
    prefill = np.zeros(cap, np.int64)
    held = np.zeros(cap, np.int64)  # tokens in its KV cache
    who = np.zeros(cap, np.int64)  # request index
    hybrid = np.zeros(cap, bool)
    itl_v, itl_w, ttft_v, tpot_v = [], [], [], []
    stream_s = pass_s[1] + costs.stream_overhead_s  # a lone stream's step
    verify_s = pass_s[k + 1] + costs.verify_overhead_s  # a lone device's verify
    i, t, n_live = 0, 0.0, 0
    batch_free = 0.0  # when the batcher's last pass ended: it forms the next one from then on
    reopens: list = []  # (when, order, state) of evicted sessions their devices will re-open
    kv_budget = rules.limits.kv_budget_bytes()
    while True:
        while True:  # admissions: new requests and re-opens of evicted sessions, in time order
            new = req.gate[i] if i < n else np.inf
            again = reopens[0][0] if reopens else np.inf
            when = min(new, again)
            if when > t:
                break
            if again < new:
                _, _, (j, tokens, left, was_seen, first, prev) = heapq.heappop(reopens)
            else:
                j, tokens, left, was_seen, first, prev = i, int(req.prompt[i]), int(req.answer[i]), False, 0.0, float(req.gate[i])
                i += 1
            full = n_live >= cap or (
                kv_budget is not None and (held[live].sum() + tokens) * rules.kv_bytes_per_token > kv_budget)
            if full:
                idle = live & (ready > t)  # not in a pass: its device is drafting, or its reply is on the way
                if not idle.any():
                    st.n["rejections"] += 1
                    continue
                v = int(np.flatnonzero(idle)[np.argmin(last[idle])])  # least recently used
                vj = who[v]  # its device learns at its next request, and re-opens an RTT later
                heapq.heappush(reopens, (ready[v] + req.rtt[vj], st.n["evictions"],
                                         (vj, int(held[v]), int(remaining[v]), bool(seen[v]), first_at[v], last[v])))
                live[v], ready[v] = False, np.inf
                n_live -= 1
                st.n["evictions"] += 1
            s = int(np.argmin(live))
            live[s], ready[s], last[s], seen[s], first_at[s] = True, when, prev, was_seen, first
            remaining[s], prefill[s], held[s], who[s], hybrid[s] = left, tokens - 1, tokens, j, req.hybrid[j]
            n_live += 1
            st.peak_sessions = max(st.peak_sessions, n_live)
        if n_live == 1:  # a session alone until the next request arrives: its passes at once
            s = int(np.argmax(live))
            nxt = min(req.gate[i] if i < n else np.inf, reopens[0][0] if reopens else np.inf)
            if prefill[s] <= 0 and seen[s] and ready[s] < nxt:
                j = who[s]
                t = _alone(st, s, nxt, ready, last, remaining, held, bool(hybrid[s]), stream_s, verify_s,
                           req.rtt[j] + k * req.draft_s[j], req.rtt[j] / 2, req.alpha[j], k, rng, itl_v, itl_w)
                batch_free = t
                if remaining[s] <= 0:
                    tpot_v.append([(last[s] - first_at[s]) / max(1, req.answer[j] - 1)])
                    live[s], ready[s] = False, np.inf
                    n_live -= 1
                    st.n["served"] += 1
                continue
        due = np.flatnonzero(ready <= t)
        if not len(due):
            nxt = min(ready.min(), req.gate[i] if i < n else np.inf, reopens[0][0] if reopens else np.inf)
            if nxt == np.inf:
                break
            t = nxt
            continue
        # The model worker runs jobs in the order they were handed to it. A prompt's chunk is handed
        # over when its open (or its previous chunk) is done; a pass when the batcher forms it, which
        # is once its previous pass is over, from the steps queued by then. Steps that arrive later
        # wait for the next pass, even while the worker is still busy with prompts.
        filling, stepping = due[prefill[due] > 0], due[prefill[due] <= 0]
        form = max(batch_free, float(ready[stepping].min())) if len(stepping) else np.inf
        oldest_fill = filling[np.argmin(ready[filling])] if len(filling) else -1
        if len(filling) and ready[oldest_fill] < form:  # a chunk of that prompt fills, a pass of its own
            s = int(oldest_fill)
            rows = int(min(prefill[s], chunk))
            end = t + costs.prefill_s(rows, pass_s[min(rows, max_rows)])
            prefill[s] -= rows
            st.n["passes"] += 1
            st.n["rows"] += rows
            j = who[s]  # opened: a stream steps next; a device gets the reply and drafts first
            ready[s] = end + (req.rtt[j] + k * req.draft_s[j] if prefill[s] <= 0 and hybrid[s] else 0.0)
            t = end
            continue
        due = stepping[ready[stepping] <= form]
        due = due[np.argsort(ready[due], kind="stable")][:max_batch]
        h = hybrid[due]
        rows = np.where(h, k + 1, 1)
        total = int(rows.sum())
        if total > max_batch_rows and len(due) > 1:
            keep = np.cumsum(rows) <= max_batch_rows
            due, h, rows = due[keep], h[keep], rows[keep]
            total = int(rows.sum())
        verifies = int(h.sum())
        end = t + pass_s[min(total, max_rows)] + verifies * costs.verify_overhead_s + (len(due) - verifies) * costs.stream_overhead_s
        st.n["passes"] += 1
        st.n["rows"] += total
        r_idx = who[due]
        rtt = req.rtt[r_idx]
        gained = np.ones(len(due), np.int64)
        if k and h.any():
            gained[h] += np.minimum(k, rng.geometric(1 - req.alpha[r_idx[h]]) - 1)
        gained = np.minimum(gained, remaining[due])
        s_got, deliver, g = due, end + rtt / 2, gained
        first = ~seen[s_got]
        if first.any():
            ttft_v.append(deliver[first] - req.t[r_idx[first]])
            first_at[s_got[first]] = deliver[first]
        later = ~first
        itl_v.append((deliver[later] - last[s_got][later]) / g[later])
        itl_w.append(g[later])
        seen[s_got], last[s_got] = True, deliver
        remaining[s_got] -= g
        held[s_got] += g
        st.n["tokens"] += int(g.sum())
        # when each comes back: a stream in the next pass; a device after an RTT and k drafts
        ready[due] = end + np.where(h, rtt + k * req.draft_s[r_idx], 0.0)
        batch_free = end
        done = due[remaining[due] <= 0]
        if len(done):
            tpot_v.append((last[done] - first_at[done]) / np.maximum(1, req.answer[who[done]] - 1))
            live[done], ready[done] = False, np.inf
            n_live -= len(done)
            st.n["served"] += len(done)
        if len(itl_v) > 4096:
            st.itl.add(np.concatenate(itl_v), np.concatenate(itl_w).astype(float))
            itl_v, itl_w = [], []
        t = end
    if itl_v:
        st.itl.add(np.concatenate(itl_v), np.concatenate(itl_w).astype(float))
    if ttft_v:
        st.ttft.add(np.concatenate(ttft_v))
    if tpot_v:
        st.tpot.add(np.concatenate(tpot_v))
    st.end_s = t
    return st


def _alone(st: ReplicaStats, s: int, until: float, ready, last, remaining, held, hybrid: bool, stream_s: float,
           verify_s: float, back_s: float, half_rtt: float, alpha: float, k: int, rng, itl_v, itl_w) -> float:
    """The passes of session `s` while it is alone on its replica, up to the first that would start
    at or after `until` (the next arrival), computed at once; the same passes the main loop runs
    for it, one by one. Returns the time the replica is next free."""
    cycle = (verify_s + back_s) if hybrid else stream_s  # from one pass's start to its next's
    start = max(ready[s], 0.0)
    rounds = int(remaining[s]) if until == np.inf else int(min(remaining[s], max(1, math.ceil((until - start) / cycle))))
    if hybrid:
        gains = 1 + (np.minimum(k, rng.geometric(1 - alpha, rounds) - 1) if k else np.zeros(rounds, np.int64))
    else:
        gains = np.ones(rounds, np.int64)
    total = np.cumsum(gains)
    cut = int(np.searchsorted(total, remaining[s])) + 1  # the round that reaches the answer's end
    gains = gains[: min(rounds, cut)]
    gains[-1] -= max(0, int(gains.sum()) - int(remaining[s]))
    m = len(gains)
    pass_end = start + np.arange(m) * cycle + (verify_s if hybrid else stream_s)
    deliver = pass_end + half_rtt
    gaps = np.diff(np.concatenate(([last[s]], deliver)))
    itl_v.append(gaps / gains)
    itl_w.append(gains)
    last[s] = deliver[-1]
    got = int(gains.sum())
    remaining[s] -= got
    held[s] += got
    st.n["tokens"] += got
    st.n["passes"] += m
    st.n["rows"] += m * ((k + 1) if hybrid else 1)
    ready[s] = pass_end[-1] + (back_s if hybrid else 0.0)
    return float(pass_end[-1])


# -- placement and the fleet ----------------------------------------------------------------------


def _h(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "big")


def place(n_requests: int, replicas: int, vnodes: int = 160) -> np.ndarray:
    """Each request's replica: a consistent-hash ring of `vnodes` points a replica, on the
    session id (nginx's `hash $http_x_tandem_session consistent`)."""
    points = np.array(sorted((_h(f"replica-{r}-{v}"), r) for r in range(replicas) for v in range(vnodes)), dtype=np.uint64)
    keys = np.fromiter((_h(f"session-{j}") for j in range(n_requests)), dtype=np.uint64, count=n_requests)
    at = np.searchsorted(points[:, 0], keys) % len(points)
    return points[at, 1].astype(np.int64)


def requests(arr: Arrivals, mode: str, classes: list[DeviceClass], rtt_of, cloud_share: float,
             rng: np.random.Generator) -> tuple[Requests, np.ndarray]:
    """The gateway requests of a mode, and the mask of those that stay on the device (routed)."""
    n = len(arr)
    cls = rng.choice(len(classes), n, p=[c.share for c in classes])
    rtt = rtt_of(rng, n)
    local = rng.random(n) >= cloud_share if mode == "routed" else np.zeros(n, bool)
    req = Requests(t=arr.t, gate=arr.t + rtt / 2, prompt=arr.prompt_tokens, answer=arr.answer_tokens,
                   hybrid=np.full(n, mode == "hybrid"), alpha=np.array([c.alpha for c in classes])[cls],
                   draft_s=np.array([c.draft_s for c in classes])[cls], rtt=rtt)
    return req, local


def local_stats(req: Requests, local: np.ndarray) -> ReplicaStats:
    """Requests answered on the device alone: prefill at PREFILL_RATIO x its decode speed."""
    st = ReplicaStats()
    d, answer = req.draft_s[local], req.answer[local]
    st.ttft.add(req.prompt[local] * d / PREFILL_RATIO + d)
    st.itl.add(d, (answer - 1).astype(float))
    st.n["tokens"], st.n["served"] = int(answer.sum()), int(local.sum())
    return st


def simulate(req: Requests, local: np.ndarray, replicas: int, costs: PassCosts, rules: GatewayRules, k: int,
             seed: int = 0, only_busiest: bool = False, sample: int | None = None) -> tuple[ReplicaStats, ReplicaStats]:
    """(the fleet, its busiest replica). `only_busiest` simulates that one replica alone; `sample`
    simulates the busiest and `sample - 1` others drawn at random, and scales the fleet's counts
    (tokens, requests served, rejections, evictions, passes) by replicas / sample: a large fleet's
    percentiles from a few of its replicas, in bounded time."""
    where = place(len(req.t), replicas)
    where[local] = -1
    load = np.bincount(where[where >= 0], weights=req.answer[where >= 0], minlength=replicas)
    busiest = int(np.argmax(load))
    picked = list(range(replicas))
    if only_busiest:
        picked = [busiest]
    elif sample is not None and sample < replicas:
        others = np.random.default_rng(seed).choice([r for r in picked if r != busiest], sample - 1, replace=False)
        picked = [busiest, *sorted(int(r) for r in others)]
    fleet, top = ReplicaStats(), None
    for r in picked:
        st = simulate_replica(req.subset(where == r), costs, rules, k, np.random.default_rng((seed, r)))
        fleet.merge(st)
        if r == busiest:
            top = st
    if len(picked) < replicas and not only_busiest:
        scale = replicas / len(picked)
        fleet.n = Counter({name: int(round(v * scale)) for name, v in fleet.n.items()})
    fleet.merge(local_stats(req, local))
    return fleet, top


def summary(st: ReplicaStats, span_s: float) -> dict:
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"tokens_per_s": round(st.n["tokens"] / span_s, 2) if span_s else None,
            "itl_p50_ms": ms(st.itl.quantile(0.5)), "itl_p99_ms": ms(st.itl.quantile(0.99)),
            "ttft_p50_ms": ms(st.ttft.quantile(0.5)), "ttft_p99_ms": ms(st.ttft.quantile(0.99)),
            "tpot_p50_ms": ms(st.tpot.quantile(0.5)), "tpot_p99_ms": ms(st.tpot.quantile(0.99)),
            "served": st.n["served"], "rejections": st.n["rejections"], "evictions": st.n["evictions"],
            "rows_per_pass": round(st.n["rows"] / st.n["passes"], 2) if st.n["passes"] else None, "peak_sessions": st.peak_sessions}


def holds(st: ReplicaStats, slo_s: float, metric: str = "itl") -> bool:
    """Every request admitted, and the p99 of `metric` (itl: per token; tpot: a request's mean
    time a token after its first) within the SLO."""
    p99 = (st.itl if metric == "itl" else st.tpot).quantile(0.99)
    return st.n["rejections"] == 0 and (p99 is None or p99 <= slo_s)


def fewest_replicas(req: Requests, local: np.ndarray, costs: PassCosts, rules: GatewayRules, k: int, slo_s: float,
                    max_replicas: int = 4096, seed: int = 0, metric: str = "itl",
                    sample: int | None = 16) -> tuple[int | None, ReplicaStats | None]:
    """The fewest replicas whose fleet admits every request and holds ITL p99 <= SLO, and that
    fleet's stats; (None, None) if even `max_replicas` do not. The search runs on the busiest
    replica alone (doubling, then bisection: cheap), then steps up until the whole fleet holds."""
    ok = lambda r: holds(simulate(req, local, r, costs, rules, k, seed, only_busiest=True)[1], slo_s, metric)  # noqa: E731
    if not (~local).any():
        return 0, simulate(req, local, 1, costs, rules, k, seed)[0]
    hi = 1
    while not ok(hi):
        if hi >= max_replicas:
            return None, None
        hi = min(2 * hi, max_replicas)
    lo = hi // 2  # fails (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    while True:
        fleet = simulate(req, local, hi, costs, rules, k, seed, sample=sample)[0]
        if holds(fleet, slo_s, metric) or hi >= max_replicas:
            return hi, fleet
        hi = min(max_replicas, hi + max(1, hi // 20))


def alpha_for(tokens_per_round: float, k: int) -> float:
    """The acceptance whose expected tokens per round at draft length k is `tokens_per_round`."""
    lo, hi = 0.0, 0.9999
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens_per_round(mid, k) < tokens_per_round else (lo, mid)
    return (lo + hi) / 2


__all__ = ["GatewayRules", "Histogram", "Requests", "ReplicaStats", "simulate_replica", "simulate", "place", "requests",
           "summary", "holds", "fewest_replicas", "alpha_for", "MODES"]
