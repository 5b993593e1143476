"""`tandem bench capacity`: how many devices one gateway core serves, cloud-only against speculative.

One gateway process, pinned to one core, serves N devices at once (N = 1, 2, 4, ...), each
generating T tokens greedily on its own prompt, over real HTTP on loopback:

    cloud         each device streams `/v1/generate`; the gateway steps every live stream in
                  one packed pass (iteration-level batching)
    speculative   each device opens a session and verifies drafts of k tokens; the drafts are
                  the real drafter's, replayed: before any timing, the drafter's greedy draft is
                  recorded for every prefix of the target's greedy output (`record_drafts`). At
                  temperature 0 that is exactly what a live device would send, and replaying it
                  costs the gateway's core nothing (the devices run on the other core)

Per N and mode: server output tokens/s (the whole run, prefill included, and the decode phase
alone), inter-token latency p50/p99 over every token after each device's first (a verify that
delivers m tokens spreads its gap over them), rows per packed pass, the gateway's peak RSS.
Capacity is the largest N whose ITL p99 stays within the SLO (default 1.5x cloud's ITL p99 at
the fewest devices).

The cost model's batch extension predicts every point from passes timed apart, before the runs
(`pass_costs`): S sessions verifying j rows each at once, for S over the device counts and
j = 1 (a cloud step) and k + 1 (a verify), read from the gateway's own pass timer (/metrics).
A point's cycle is the pass of its rows (interpolated over total rows) plus the gateway's
per-request handling, measured the same way; a prompt fills at the rate its opens took; `efficiency` is measured over predicted tokens/s.
Acceptance (tokens per round) is the one input read from the run, as in `bench speculative`.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ...protocols.http import HttpTransport
from ...protocols.messages import GenerateRequest, OpenSession, VerifyRequest
from ..costmodel import PassCosts
from .gateway import percentile
from .launch import GatewayProcess
from .machine import cpu_flags, pin, split_cores

MODES = ("cloud", "speculative")


# -- the drafts a live device would send ---------------------------------------------------------


def record_drafts(engine, prompt: list[int], target: list[int], k: int) -> list[list[int]]:
    """table[p]: the drafter's greedy draft after `prompt + target[:p]`, k tokens (fewer near the
    end: a verify never drafts past the last target token)."""
    engine.reset()
    engine.prefill(list(prompt))
    table = []
    for p in range(len(target)):
        draft = engine.draft(max(0, min(k, len(target) - p - 1)))
        table.append(list(draft.tokens))
        engine.truncate(len(prompt) + p)
        engine.append([target[p]])
    return table


# -- one device ----------------------------------------------------------------------------------


@dataclass
class DeviceRun:
    tokens: list[int] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens delivered)
    verifies: int = 0
    drafted: int = 0

    def itls(self) -> list[float]:
        """Seconds per token after the first delivery: each gap spread over the tokens it brought."""
        out = []
        for (t0, _), (t1, n) in zip(self.arrivals, self.arrivals[1:]):
            out += [(t1 - t0) / n] * n
        return out


async def cloud_device(transport: HttpTransport, prompt: list[int], fingerprint: str, max_new: int) -> DeviceRun:
    run = DeviceRun()
    req = GenerateRequest(prompt_tokens=prompt, tokenizer_fingerprint=fingerprint, max_new_tokens=max_new)
    async for chunk in transport.stream(req):
        if chunk.tokens:
            run.arrivals.append((time.perf_counter(), len(chunk.tokens)))
            run.tokens += chunk.tokens
    return run


async def speculative_device(transport: HttpTransport, prompt: list[int], fingerprint: str, max_new: int,
                             drafts: list[list[int]]) -> DeviceRun:
    run = DeviceRun()
    opened = await transport.request(OpenSession(prompt_tokens=prompt, tokenizer_fingerprint=fingerprint, max_new_tokens=max_new))
    pos, finished = opened.position, False
    while not finished:
        draft = drafts[len(run.tokens)] if len(run.tokens) < len(drafts) else []
        r = await transport.request(VerifyRequest(
            session_id=opened.session_id, position=pos, draft_tokens=draft, draft_probs=[1.0] * len(draft)))
        run.arrivals.append((time.perf_counter(), max(1, len(r.tokens))))
        run.tokens += r.tokens
        run.verifies += 1
        run.drafted += len(draft)
        pos, finished = r.position, r.finished
    return run


# -- the gateway's own counters ------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """The pass counters of /metrics: passes, packed rows and seconds in passes, requests so far."""
    text = httpx.get(url + "/metrics", timeout=10).text
    want = {"tandem_verify_batch_tokens_sum": "rows", "tandem_forward_seconds_sum": "seconds",
            "tandem_forward_seconds_count": "passes"}
    out = dict.fromkeys(want.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            out[want[name]] = float(value)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def peak_rss_mb(pid: int, reset: bool = False) -> float | None:
    """A process's resident high-water mark (VmHWM, MiB); `reset` starts a new one after reading."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)
        if reset:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        return hwm
    except OSError:
        return None


# -- the cost model's batch extension, timed apart -------------------------------------------------


async def _timed_passes(url: str, transport: HttpTransport, sessions: list[tuple[str, int]], rows: int) -> tuple[float, float, float]:
    """Every session verifies `rows - 1` drafts at once: (server seconds per pass, rows per pass,
    client seconds per request), the sessions truncated back afterwards by the next call."""
    before = scrape(url)
    t0 = time.perf_counter()

    async def one(sid: str, pos: int):
        draft = [13] * (rows - 1)  # rejected or not, the pass costs the same
        return await transport.request(VerifyRequest(session_id=sid, position=pos, draft_tokens=draft, draft_probs=[1.0] * len(draft)))

    replies = await asyncio.gather(*(one(sid, pos) for sid, pos in sessions))
    wall = time.perf_counter() - t0
    for i, r in enumerate(replies):
        sessions[i] = (sessions[i][0], r.position)
    d = _delta(scrape(url), before)
    passes = max(1.0, d["passes"])
    return d["seconds"] / passes, d["rows"] / passes, wall


async def pass_costs(url: str, fingerprint: str, prompts: list[list[int]], counts: list[int], k: int, reps: int = 3) -> PassCosts:
    """Time packed passes apart from any run: S sessions x j rows, S over `counts`, j = 1 and k + 1.
    Session i holds prompt i mod P, as device i of the runs does, so that each S sees the context
    lengths of the point with S devices (attention grows with them: a bfloat16 target's pass at 700
    tokens of context costs far more than at 50)."""
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=httpx.Limits(max_connections=max(counts) + 4)) as http:
        transport = HttpTransport(url, client=http)
        opened, open_s, filled = [], 0.0, 0
        for i in range(max(counts)):
            prompt = prompts[i % len(prompts)]
            t0 = time.perf_counter()
            opened.append(await transport.request(OpenSession(prompt_tokens=prompt, tokenizer_fingerprint=fingerprint,
                                                              max_new_tokens=512)))
            open_s += time.perf_counter() - t0
            filled += len(prompt) - 1  # an open fills all of its prompt but the last token (the first step feeds it)
        state = [(o.session_id, o.position) for o in opened]  # where each session is now
        points: dict[int, list[float]] = {}
        single_rtt = []
        for s in counts:
            for j in sorted({1, k + 1}):
                for _ in range(reps):
                    sessions = state[:s]
                    per_pass, rows, wall = await _timed_passes(url, transport, sessions, j)
                    state[:s] = sessions
                    points.setdefault(round(rows), []).append(per_pass)
                    if s == 1:
                        single_rtt.append((wall, per_pass))
        # a streamed cloud step beyond its pass: a short generation's mean gap, minus one pass
        t0, gaps = None, []
        async for chunk in transport.stream(GenerateRequest(prompt_tokens=prompts[0], tokenizer_fingerprint=fingerprint, max_new_tokens=17)):
            now = time.perf_counter()
            if t0 is not None:
                gaps.append(now - t0)
            t0 = now
    rows = tuple(sorted(points))
    seconds = tuple(statistics.median(points[r]) for r in rows)
    costs = PassCosts(rows, seconds, 0.0, 0.0)
    verify_overhead = statistics.median(max(0.0, w - p) for w, p in single_rtt)
    stream_overhead = max(0.0, statistics.median(gaps) - costs.pass_s(1)) if gaps else 0.0
    prefill = max(0.0, open_s - len(opened) * verify_overhead) / max(1, filled)
    return PassCosts(rows, seconds, verify_overhead, stream_overhead, prefill)


# -- one point -----------------------------------------------------------------------------------


async def run_point(url: str, mode: str, n: int, prompts: list[list[int]], fingerprint: str, max_new: int,
                    drafts: list[list[list[int]]]) -> tuple[list[DeviceRun], float, dict[str, float]]:
    """N devices at once (device i on prompt i mod P): their runs, the wall time, the pass counters."""
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=httpx.Limits(max_connections=n + 4)) as http:
        transport = HttpTransport(url, client=http)
        before = scrape(url)
        t0 = time.perf_counter()
        if mode == "cloud":
            jobs = [cloud_device(transport, prompts[i % len(prompts)], fingerprint, max_new) for i in range(n)]
        else:
            jobs = [speculative_device(transport, prompts[i % len(prompts)], fingerprint, max_new, drafts[i % len(prompts)])
                    for i in range(n)]
        runs = await asyncio.gather(*jobs)
        wall = time.perf_counter() - t0
        return list(runs), wall, _delta(scrape(url), before)


def summarize(mode: str, n: int, runs: list[DeviceRun], wall: float, counters: dict[str, float], start: float) -> dict:
    tokens = sum(len(r.tokens) for r in runs)
    itls = [x for r in runs for x in r.itls()]
    first = max(r.arrivals[0][0] for r in runs if r.arrivals) - start
    last = max(r.arrivals[-1][0] for r in runs if r.arrivals) - start
    after_first = sum(len(r.tokens) - r.arrivals[0][1] for r in runs if r.arrivals)
    passes = max(1.0, counters["passes"])
    out = {
        "mode": mode, "devices": n, "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 3) if wall else None,
        "decode_tokens_per_s": round(after_first / (last - first), 3) if last > first else None,
        "itl_p50_ms": round(percentile(itls, 0.5) * 1000, 2), "itl_p99_ms": round(percentile(itls, 0.99) * 1000, 2),
        "rows_per_pass": round(counters["rows"] / passes, 2), "pass_ms": round(counters["seconds"] / passes * 1000, 2),
        "passes": int(counters["passes"]),
    }
    if mode == "speculative":
        verifies = sum(r.verifies for r in runs)
        out["tokens_per_round"] = round(tokens / max(1, verifies), 3)
        out["rows_per_verify"] = round((sum(r.drafted for r in runs) + verifies) / max(1, verifies), 3)
    return out


def bench_capacity(*, drafter: str, target: str, prompts: list[str], devices: list[int], max_new_tokens: int = 48,
                   draft_len: int = 6, itl_slo_ms: float | None = None, split: bool = True,
                   progress: Callable[[str], None] | None = None) -> dict:
    from ...local_runtime.backends import drafter_engine, load_drafter, split_backend

    say = progress or (lambda msg: None)
    halves = split_cores() if split else None
    device_cores, gateway_cores = halves if halves else (None, None)
    if gateway_cores:
        gateway_cores = {min(gateway_cores)}  # one core, whatever the machine has
        pin(device_cores)
    name, backend = split_backend(drafter)
    dmodel = load_drafter(name, backend)
    tok = dmodel.tokenizer
    n_prompts = min(max(devices), len(prompts))
    ids = [tok.prompt_tokens(p) for p in prompts[:n_prompts]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "gateway.yaml"
        cfg.write_text(f"model: {target}\nmax_draft_tokens: {max(draft_len, 8)}\nmax_sessions: {max(64, 2 * max(devices))}\n"
                       "log_level: warning\nkv_cache_budget_mb: null\n")
        t_load = time.perf_counter()
        with GatewayProcess(config=cfg, quiet=True, cores=gateway_cores) as gw:
            load_s = time.perf_counter() - t_load
            info = httpx.get(gw.url + "/v1/info", timeout=10).json()
            fp = tok.fingerprint
            if info.get("tokenizer_fingerprint") not in (None, fp):
                raise ValueError(f"the drafter '{drafter}' and the target '{target}' do not share a tokenizer")
            say(f"gateway up in {load_s:.1f} s; the target's greedy output for {n_prompts} prompt(s) ...")
            ref_runs, _, _ = asyncio.run(run_point(gw.url, "cloud", n_prompts, ids, fp, max_new_tokens, []))
            reference = [r.tokens for r in ref_runs]
            say("recording the drafter's draft at every prefix ...")
            engine = drafter_engine(dmodel, backend)
            drafts = [record_drafts(engine, p, ref, draft_len) for p, ref in zip(ids, reference)]
            say("timing packed passes apart ...")
            costs = asyncio.run(pass_costs(gw.url, fp, ids, sorted(set(devices)), draft_len))
            points, mismatches = [], 0
            pid = gw.proc.pid
            for n in devices:
                for mode in MODES:
                    peak_rss_mb(pid, reset=True)
                    start = time.perf_counter()
                    runs, wall, counters = asyncio.run(run_point(gw.url, mode, n, ids, fp, max_new_tokens, drafts))
                    point = summarize(mode, n, runs, wall, counters, start)
                    point["peak_rss_mb"] = peak_rss_mb(pid)
                    point["mismatches"] = sum(r.tokens != reference[i % n_prompts] for i, r in enumerate(runs))
                    mismatches += point["mismatches"]
                    if mode == "cloud":
                        tps, itl = costs.cloud(n)
                    else:
                        tps, itl = costs.speculative(n, point["rows_per_verify"], point["tokens_per_round"])
                    point["predicted_tokens_per_s"] = round(tps, 3)
                    point["predicted_itl_ms"] = round(itl * 1000, 2)
                    point["efficiency"] = round(point["decode_tokens_per_s"] / tps, 3) if point["decode_tokens_per_s"] else None
                    say(f"N={n} {mode}: {point['tokens_per_s']:.1f} tok/s, ITL p99 {point['itl_p99_ms']:.0f} ms, "
                        f"{point['rows_per_pass']:.1f} rows/pass, efficiency {point['efficiency']}")
                    points.append(point)
    return _report(points, costs, devices, itl_slo_ms, mismatches, drafter=drafter, target=target,
                   target_served=info.get("model"), target_choice=info.get("target"), load_s=round(load_s, 1),
                   draft_len=draft_len, max_new_tokens=max_new_tokens, prompts=n_prompts, prompt_tokens=[len(p) for p in ids],
                   cores={"device": sorted(device_cores) if device_cores else "all",
                          "gateway": sorted(gateway_cores) if gateway_cores else "all"})


def _report(points: list[dict], costs: PassCosts, devices: list[int], itl_slo_ms: float | None, mismatches: int, **about) -> dict:
    by = {(p["mode"], p["devices"]): p for p in points}
    cloud1 = by.get(("cloud", min(devices)))
    slo = itl_slo_ms if itl_slo_ms is not None else (1.5 * cloud1["itl_p99_ms"] if cloud1 else math.inf)
    capacity = {m: max((n for n in devices if by[(m, n)]["itl_p99_ms"] <= slo), default=0) for m in MODES}
    ratio = lambda key: {str(n): round(by[("speculative", n)][key] / by[("cloud", n)][key], 3)  # noqa: E731
                         for n in devices if by[("cloud", n)][key]}
    return {
        **about, "devices": devices, "mismatches": mismatches, "cpu_flags": cpu_flags(),
        "itl_slo_ms": round(slo, 2), "capacity": capacity,
        "capacity_ratio": round(capacity["speculative"] / capacity["cloud"], 3) if capacity["cloud"] else None,
        "throughput_ratio": ratio("tokens_per_s"), "decode_throughput_ratio": ratio("decode_tokens_per_s"),
        "itl_p99_ratio": ratio("itl_p99_ms"),
        "efficiency_range": [min(p["efficiency"] for p in points), max(p["efficiency"] for p in points)],
        "pass_costs": costs.to_dict(), "points": points,
    }


__all__ = ["bench_capacity", "record_drafts", "pass_costs", "DeviceRun"]
