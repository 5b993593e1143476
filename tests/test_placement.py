"""HEFT placement against schedules worked out by hand (the arithmetic is in each docstring)."""

import math

import pytest

from tandem.protocols.errors import PlacementError
from tandem.sdk.taskgraph.placement import (
    Done,
    Job,
    Proc,
    comm_time,
    earliest_finish,
    exec_time,
    heft,
    upward_ranks,
)


def test_cost_terms():
    a = Proc("a", speed=10, latency_s=0.25, bytes_per_s=1000)
    b = Proc("b", speed=5, latency_s=0.5, bytes_per_s=500)
    job = Job("j", work=20, fixed_s=0.1)
    assert exec_time(job, a) == pytest.approx(2.1)
    assert exec_time(job, b) == pytest.approx(4.1)
    # up a's link, down b's: 0.25 + 0.5 + 100/1000 + 100/500
    assert comm_time(100, a, b) == pytest.approx(1.05)
    assert comm_time(100, a, a) == 0.0
    # EST = max(avail 1.0, 0.5 + c(100 from b to a) = 0.5 + 0.75 + 0.1 + 0.2 = 1.55); EFT = 1.55 + 2.1
    assert earliest_finish(job, a, 1.0, [(0.5, b, 100)]) == pytest.approx((1.55, 3.65))


FORK_JOIN = [
    Job("s", work=10),
    Job("a", work=20, deps=("s",)),
    Job("b", work=20, deps=("s",)),
    Job("t", work=10, deps=("a", "b")),
]
TWIN = [Proc("A", speed=10, latency_s=0.25), Proc("B", speed=10, latency_s=0.25)]


def test_upward_ranks_fork_join():
    """w: s=1, a=b=2, t=1 on both; mean c over (A,A),(A,B),(B,A),(B,B) = (0+.5+.5+0)/4 = .25.
    rank t = 1; rank a = rank b = 2 + .25 + 1 = 3.25; rank s = 1 + .25 + 3.25 = 4.5."""
    assert upward_ranks(FORK_JOIN, TWIN) == pytest.approx({"s": 4.5, "a": 3.25, "b": 3.25, "t": 1.0})


def test_heft_fork_join_on_two_devices():
    """s: A and B both finish at 1, tie -> A [0, 1].
    a: A starts at 1 (data local) -> 3; B starts at 1 + .5 -> 3.5. A [1, 3].
    b: A starts at 3 -> 5; B at 1.5 -> 3.5. B [1.5, 3.5].
    t: A: max(free 3, a 3 + 0, b 3.5 + .5) = 4 -> 5; B: max(free 3.5, a 3 + .5, b 3.5) = 3.5 -> 4.5. B."""
    sched = heft(FORK_JOIN, TWIN)
    got = {s.job: (s.proc, round(s.start, 9), round(s.finish, 9)) for s in sched.slots}
    assert got == {"s": ("A", 0, 1), "a": ("A", 1, 3), "b": ("B", 1.5, 3.5), "t": ("B", 3.5, 4.5)}
    assert sched.makespan == pytest.approx(4.5)


def test_heft_gives_the_slow_device_only_what_it_finishes_sooner():
    """Three independent jobs of 20 tokens; F does 20 tok/s, S 8 tok/s.
    j1: F 1.0 vs S 2.5 -> F [0, 1]. j2: F 1 -> 2 vs S 2.5 -> F [1, 2]. j3: F 2 -> 3 vs S 0 -> 2.5 -> S.
    Makespan 2.5, against 3.0 with everything on F."""
    jobs = [Job(f"j{i}", work=20) for i in (1, 2, 3)]
    procs = [Proc("F", speed=20), Proc("S", speed=8)]
    sched = heft(jobs, procs)
    assert sched.placement() == {"j1": "F", "j2": "F", "j3": "S"}
    assert sched.of("j3").finish == pytest.approx(2.5)
    assert sched.makespan == pytest.approx(2.5)


def test_heft_respects_private_data_and_the_gateway():
    """p reads data held only by the phone; g must run on the cloud. The fast laptop gets neither.
    p on phone: 10 / 5 = [0, 2]. g on cloud: 2 + (0.1 + 0.05) = 2.15 -> + 100/100 = 3.15.
    q (phone or laptop, needs p): laptop starts at 2 + (.1 + .01) = 2.11, ends 2.11 + 10/50 = 2.31;
    phone starts at 2, ends 2 + 10/5 = 4. Laptop."""
    jobs = [
        Job("p", work=10, allowed=frozenset({"phone"})),
        Job("g", work=100, deps=("p",), allowed=frozenset({"cloud"})),
        Job("q", work=10, deps=("p",), allowed=frozenset({"phone", "laptop"})),
    ]
    procs = [
        Proc("phone", speed=5, latency_s=0.1),
        Proc("laptop", speed=50, latency_s=0.01),
        Proc("cloud", speed=100, latency_s=0.05),
    ]
    sched = heft(jobs, procs)
    assert sched.placement() == {"p": "phone", "g": "cloud", "q": "laptop"}
    assert (sched.of("g").start, sched.of("g").finish) == pytest.approx((2.15, 3.15))
    assert (sched.of("q").start, sched.of("q").finish) == pytest.approx((2.11, 2.31))


def test_heft_uses_running_tasks_and_busy_devices():
    """r runs on B and will finish at 0.5 (a `Done`); A is busy until 2.0, B is free.
    x (needs r, 1000 bytes, 10 tokens at 10 tok/s): A: max(2.0, .5 + c) -> 3.0; B: max(0, .5) -> 1.5. B."""
    procs = [Proc("A", speed=10, ready_at=2.0, bytes_per_s=1e4), Proc("B", speed=10, bytes_per_s=1e4)]
    sched = heft([Job("x", work=10, deps=("r",))], procs, {"r": Done("B", 0.5, out_bytes=1000)})
    assert (sched.of("x").proc, sched.of("x").start, sched.of("x").finish) == ("B", 0.5, 1.5)


def test_slots_run_side_by_side():
    """One processor with two slots takes two 1 s jobs at once."""
    sched = heft([Job("a", work=10), Job("b", work=10)], [Proc("P", speed=10, slots=2)])
    assert [(s.start, s.finish) for s in sched.on("P")] == [(0, 1), (0, 1)]


def test_no_allowed_processor_is_a_clear_error():
    with pytest.raises(PlacementError, match="'p'.*allowed: phone"):
        heft([Job("p", work=1, allowed=frozenset({"phone"}))], [Proc("laptop", speed=1)])
    with pytest.raises(PlacementError, match="depends on 'ghost'"):
        heft([Job("x", work=1, deps=("ghost",))], [Proc("laptop", speed=1)])


def test_unbounded_bandwidth_and_zero_work():
    p = Proc("p", speed=1)
    assert comm_time(10**9, p, Proc("q", speed=1)) == 0.0
    assert exec_time(Job("f", fixed_s=0.5), p) == 0.5
    assert math.isinf(p.bytes_per_s)
