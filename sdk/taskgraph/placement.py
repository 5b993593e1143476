"""Placement: which device runs which task, by HEFT-style list scheduling on earliest finish time.

Pure functions over plain values (no broker, no clock), so schedules can be checked by hand.

    Proc  a place a task can run: a device, the host running the graph, the cloud gateway
    Job   a task: its work in tokens (or fixed seconds), its predecessors, the bytes it outputs,
          and the processors its constraints allow (private data, the gateway, a model)

`heft(jobs, procs)` ranks jobs by upward rank (the longest mean-cost path from the job to the end
of the graph), then repeatedly takes the ready job of highest rank and puts it on the allowed
processor where it would finish first (no insertion into idle gaps). The executor calls it again
whenever something changes (a result, a lost device, a map that expanded), with `done` holding
where and when earlier tasks finished and `Proc.ready_at` when each busy device frees up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ...protocols.errors import PlacementError


@dataclass(frozen=True)
class Proc:
    name: str
    speed: float  # tokens per second
    latency_s: float = 0.0  # one way, between this processor and the broker
    bytes_per_s: float = math.inf  # its link's bandwidth
    ready_at: float = 0.0  # when its first slot is free
    slots: int = 1


@dataclass(frozen=True)
class Job:
    name: str
    work: float = 0.0  # tokens to process (prompt tokens weighted by prefill speed, plus new tokens)
    fixed_s: float = 0.0  # seconds that do not depend on the processor's speed
    deps: tuple[str, ...] = ()
    out_bytes: int = 0
    allowed: frozenset[str] | None = None  # processor names; None: any


@dataclass(frozen=True)
class Done:
    """A predecessor placed before this call: where it ran (runs) and when it finished (will)."""

    proc: str
    finish: float
    out_bytes: int = 0


@dataclass(frozen=True)
class Slot:
    job: str
    proc: str
    start: float
    finish: float


@dataclass
class Schedule:
    slots: list[Slot] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((s.finish for s in self.slots), default=0.0)

    def of(self, job: str) -> Slot:
        for s in self.slots:
            if s.job == job:
                return s
        raise KeyError(job)

    def on(self, proc: str) -> list[Slot]:
        return sorted((s for s in self.slots if s.proc == proc), key=lambda s: s.start)

    def placement(self) -> dict[str, str]:
        return {s.job: s.proc for s in self.slots}


def exec_time(job: Job, proc: Proc) -> float:
    """w(j, p) = fixed(j) + work(j) / speed(p)"""
    return job.fixed_s + (job.work / proc.speed if job.work else 0.0)


def comm_time(nbytes: int, src: Proc, dst: Proc) -> float:
    """c(a -> b) = 0 when a = b, else lat(a) + lat(b) + bytes / bw(a) + bytes / bw(b): data goes up
    one link to the broker and down the other; on one processor it does not move."""
    if src.name == dst.name:
        return 0.0
    return src.latency_s + dst.latency_s + nbytes / src.bytes_per_s + nbytes / dst.bytes_per_s


def earliest_finish(job: Job, proc: Proc, free_at: float, preds: Sequence[tuple[float, Proc, int]]) -> tuple[float, float]:
    """(start, finish) of `job` on `proc`, the HEFT cost:

        EST(j, p) = max( avail(p),  max over predecessors i of  AFT(i) + c(i -> j; proc(i), p) )
        EFT(j, p) = EST(j, p) + w(j, p)

    `free_at` is avail(p), when a slot of p is free; `preds` holds (AFT(i), proc(i), bytes(i)).
    """
    start = max([free_at] + [finish + comm_time(nbytes, src, proc) for finish, src, nbytes in preds])
    return start, start + exec_time(job, proc)


def upward_ranks(jobs: Sequence[Job], procs: Sequence[Proc]) -> dict[str, float]:
    """rank(j) = mean_w(j) + max over successors s of (mean_c(j -> s) + rank(s)), 0 past the end;
    mean_w over the processors j may use, mean_c over every ordered pair of processors."""
    by_name = {j.name: j for j in jobs}
    succ: dict[str, list[str]] = {j.name: [] for j in jobs}
    for j in jobs:
        for d in j.deps:
            if d in succ:
                succ[d].append(j.name)
    pairs = [(a, b) for a in procs for b in procs]

    def mean_w(j: Job) -> float:
        ok = [p for p in procs if j.allowed is None or p.name in j.allowed] or list(procs)
        return sum(exec_time(j, p) for p in ok) / len(ok)

    def mean_c(j: Job) -> float:
        return sum(comm_time(j.out_bytes, a, b) for a, b in pairs) / len(pairs) if pairs else 0.0

    ranks: dict[str, float] = {}

    def rank(name: str) -> float:
        if name not in ranks:
            j = by_name[name]
            ranks[name] = mean_w(j) + max((mean_c(j) + rank(s) for s in succ[name]), default=0.0)
        return ranks[name]

    for j in jobs:
        rank(j.name)
    return ranks


def heft(jobs: Sequence[Job], procs: Sequence[Proc], done: Mapping[str, Done] | None = None) -> Schedule:
    """Place every job; `done` are predecessors outside `jobs` (already running or finished).
    Ties go to the higher-ranked job by name, then to the processor listed first."""
    done = dict(done or {})
    by_proc = {p.name: p for p in procs}
    names = {j.name for j in jobs}
    for j in jobs:
        for d in j.deps:
            if d not in names and d not in done:
                raise PlacementError(f"task '{j.name}' depends on '{d}', which is neither placed nor to be placed")
        allowed = [p for p in procs if j.allowed is None or p.name in j.allowed]
        if not allowed:
            wanted = ", ".join(sorted(j.allowed or ())) or "none"
            raise PlacementError(f"no available processor may run task '{j.name}' (allowed: {wanted}; up: {', '.join(by_proc) or 'none'})")
    ranks = upward_ranks(jobs, procs)
    # each processor's slots, as the times they come free
    free: dict[str, list[float]] = {p.name: [p.ready_at] * max(1, p.slots) for p in procs}
    placed: dict[str, Done] = dict(done)
    out_bytes = {name: d.out_bytes for name, d in done.items()} | {j.name: j.out_bytes for j in jobs}
    schedule = Schedule()
    pending = {j.name: j for j in jobs}
    while pending:
        ready = [j for j in pending.values() if all(d in placed for d in j.deps)]
        if not ready:
            raise PlacementError(f"tasks {sorted(pending)} wait on each other (a cycle)")
        job = min(ready, key=lambda j: (-ranks[j.name], j.name))
        preds = [(placed[d].finish, by_proc.get(placed[d].proc, Proc(placed[d].proc, 1.0)), out_bytes.get(d, 0)) for d in job.deps]
        best: tuple[float, float, Proc] | None = None
        for p in procs:
            if job.allowed is not None and p.name not in job.allowed:
                continue
            start, finish = earliest_finish(job, p, min(free[p.name]), preds)
            if best is None or finish < best[1] - 1e-12:
                best = (start, finish, p)
        assert best is not None
        start, finish, p = best
        slots = free[p.name]
        slots[slots.index(min(slots))] = finish
        placed[job.name] = Done(p.name, finish)
        schedule.slots.append(Slot(job.name, p.name, start, finish))
        del pending[job.name]
    return schedule


def serial_time(jobs: Iterable[Job], proc: Proc) -> float:
    """Everything on one processor, back to back: the one-device baseline of a schedule."""
    return sum(exec_time(j, proc) for j in jobs)


__all__ = [
    "Done",
    "Job",
    "Proc",
    "Schedule",
    "Slot",
    "comm_time",
    "earliest_finish",
    "exec_time",
    "heft",
    "serial_time",
    "upward_ranks",
]
