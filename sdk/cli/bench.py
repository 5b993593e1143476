"""`tandem bench speculative|modes|rtt-plot|verify-cost|capacity`: ratios measured side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..client import DEFAULT_DRAFTER, DEFAULT_TARGET
from .common import add_commands, err, fail, print_result, run

PIPELINE_HELP = ("Draft the next block while a verify is in flight (default: on for a gateway in another "
                 "process). Off is fairer when the gateway shares this machine's cores.")
SPLIT_HELP = ("Run the gateway in its own process on one half of the cores and the device on the other (threads to "
              "match), so drafting and verifying truly run in parallel. Default: on where there are at least 2 cores.")
PROMPTS_HELP = "Spec-Bench style JSONL (default ../shared/data/specbench/question.jsonl)."



def _prompts(path, limit):
    from ..bench.prompts import load_prompts

    try:
        return load_prompts(path, limit)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), code=2)





def _split(flag: bool | None, gateway: str) -> bool:
    from ..bench.machine import split_cores

    if flag is None:
        return gateway == "inproc" and split_cores() is not None
    if flag and gateway != "inproc":
        fail("--split-cores places a gateway this command starts; it cannot move one running at --gateway URL", 2)
    return flag


def speculative(
    drafter: str = typer.Option(DEFAULT_DRAFTER),
    target: str = typer.Option(DEFAULT_TARGET),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    limit: int = typer.Option(10, min=1, help="Prompts to run, spread evenly over the file."),
    max_new_tokens: int = typer.Option(64, min=1),
    draft_len: str = typer.Option("4", help="A fixed draft length, or 'auto' (per round from the link)."),
    rtt_ms: Optional[float] = typer.Option(None, min=0, help="Run the gateway in its own process behind the link simulator with this round-trip time."),
    gateway: str = typer.Option("inproc", help="'inproc' or a running gateway's URL."),
    pipeline: Optional[bool] = typer.Option(None, "--pipeline/--no-pipeline", help=PIPELINE_HELP),
    split_cores: Optional[bool] = typer.Option(None, "--split-cores/--shared-cores", help=SPLIT_HELP),
    baseline: Optional[str] = typer.Option(None, help="Also measure this model alone on its own engine's loop (a GGUF model: llama.cpp's, what llama-server runs), on the gateway's cores."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Speculative vs target alone vs drafter alone, greedy, on the same prompts; beside them what
    the cost model predicts from calibration passes (predicted_speedup_vs_cloud, efficiency), and
    with --baseline the same model run by the engine a user would pick instead."""
    from ..bench.speculative import bench_speculative

    k = "auto" if draft_len == "auto" else int(draft_len) if draft_len.isdigit() else fail("--draft-len: a number or 'auto'", 2)

    def progress(i, n, rec):
        err.print(f"[{i}/{n}] {len(rec.tokens)} tokens, {rec.usage.rounds} rounds, acceptance {rec.usage.acceptance_rate:.0%}")

    result = run(bench_speculative(
        drafter=drafter, target=target, prompts=_prompts(prompts, limit), max_new_tokens=max_new_tokens,
        draft_len=k, gateway=gateway, rtt_ms=rtt_ms, pipeline=pipeline, split=_split(split_cores, gateway),
        baseline=baseline, progress=progress,
    ))
    print_result(result, "bench speculative", as_json)


def modes(
    drafter: str = typer.Option(DEFAULT_DRAFTER),
    target: str = typer.Option(DEFAULT_TARGET),
    rtt_ms: Optional[float] = typer.Option(None, min=0, help="Round-trip time the link simulator adds (the gateway then runs in its own process)."),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    limit: int = typer.Option(6, min=1),
    max_new_tokens: int = typer.Option(48, min=1),
    auto_modes: str = typer.Option("cloud,speculative", help="Modes auto may choose, comma-separated."),
    modes_: str = typer.Option("local,cloud,speculative,assist@0.3,assist,assist@0.8", "--modes",
                               help="Fixed modes to measure; assist@T is assist at threshold T (plain assist: 0.5)."),
    token_router: str = typer.Option("confidence", help="The token router assist uses."),
    gateway: str = typer.Option("inproc", help="'inproc' or a running gateway's URL."),
    pipeline: Optional[bool] = typer.Option(None, "--pipeline/--no-pipeline", help=PIPELINE_HELP),
    split_cores: Optional[bool] = typer.Option(None, "--split-cores/--shared-cores", help=SPLIT_HELP),
    png: Path = typer.Option(Path("bench-modes.png"), help="Where to draw measured against predicted seconds per token."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every mode and `auto` on the same prompts through the same link: seconds per token (and
    what the cost model predicts from calibration passes), cloud passes per token, agreement with
    the cloud model's text."""
    from ..bench.speculative import bench_modes

    allowed = tuple(m.strip() for m in auto_modes.split(",") if m.strip())

    def progress(i, n, records):
        err.print(f"[{i}/{n}] " + ", ".join(f"{m}: {r.usage.wall_s / max(1, len(r.tokens)) * 1000:.0f} ms/tok"
                                              + (f" ({r.mode})" if m == "auto" else "") for m, r in records.items()))

    result = run(bench_modes(
        drafter=drafter, target=target, prompts=_prompts(prompts, limit), max_new_tokens=max_new_tokens,
        rtt_ms=rtt_ms, gateway=gateway, auto_modes=allowed, progress=progress, token_router=token_router, pipeline=pipeline,
        modes=tuple(m.strip() for m in modes_.split(",") if m.strip()), split=_split(split_cores, gateway), out_png=str(png),
    ))
    print_result(result, f"bench modes (rtt {rtt_ms} ms)", as_json)


def rtt_plot(
    rtts: str = typer.Option("0,50,150", help="Round-trip times in ms, comma-separated."),
    drafter: str = typer.Option(DEFAULT_DRAFTER),
    target: str = typer.Option(DEFAULT_TARGET),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    limit: int = typer.Option(3, min=1),
    max_new_tokens: int = typer.Option(48, min=1),
    out: Path = typer.Option(Path("rtt.png"), help="Where to write the PNG."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Seconds per token against RTT for each mode, measured, with the analytical prediction
    (sdk/auto.py, fed with the speeds measured at the lowest RTT) drawn beside."""
    from ..bench.launch import GatewayProcess
    from ..bench.linksim import LinkProxy
    from ..bench.plots import plot_rtt
    from ..bench.speculative import bench_modes

    points = sorted(float(x) for x in rtts.split(","))
    prompt_list = _prompts(prompts, limit)
    results = []
    # one gateway process for every point; only the link in front of it changes
    with GatewayProcess(target, quiet=True) as gateway:
        for rtt in points:
            err.print(f"rtt {rtt:.0f} ms ...")
            with LinkProxy(gateway.port, delay_ms=rtt / 2) as link:
                result = run(bench_modes(drafter=drafter, target=target, prompts=prompt_list,
                                          max_new_tokens=max_new_tokens, gateway=link.url))
            result["rtt_ms"] = rtt
            results.append(result)
            err.print(json.dumps(result))
    summary = plot_rtt(results, out)
    summary["png"] = str(out)
    print_result(summary, "seconds per token vs RTT", as_json)


def verify_cost(
    arch: str = typer.Option("qwen2.5-1.5b", help="Target architecture (random weights): tiny, qwen2.5-0.5b|1.5b|7b|32b."),
    device: str = typer.Option("cuda", help="cuda, cuda:N or cpu."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 (what a GPU runs) or float32."),
    sessions: str = typer.Option("1,2,4,8,16,32,64", help="Concurrent sessions to time, comma-separated."),
    max_block: int = typer.Option(16, min=1, max=64, help="Verify blocks of 1..N tokens."),
    context: int = typer.Option(512, min=1, help="Tokens each session already holds."),
    alpha: float = typer.Option(0.79, min=0.0, max=1.0, help="Acceptance rate of the pair (an input, not measured here)."),
    draft_ms: float = typer.Option(43.0, min=0.0, help="The device's time per drafted token (an input)."),
    rate: float = typer.Option(20.0, min=0.1, help="Per-user tokens/s the capacity figures are for."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Time a random-initialised target's verify blocks (1..N tokens) at 1..64 concurrent sessions,
    through the gateway's packed forward pass, and predict from them the speed-up of speculation
    over cloud-only decoding and the gateway's capacity at a per-user rate (costmodel.py)."""
    from ..bench.verify_cost import bench_verify_cost

    counts = _counts(sessions, "--sessions")
    try:
        result = bench_verify_cost(arch=arch, device=device, dtype=dtype, sessions=counts, blocks=list(range(1, max_block + 1)),
                                   context=context, alpha=alpha, draft_s=draft_ms / 1000, rate=rate,
                                   progress=lambda m: err.print(f"[dim]{m}[/]"))
    except ValueError as exc:
        fail(str(exc), 2)
    print_result(result, f"bench verify-cost: {arch} on {device}", as_json)


def _counts(text: str, option: str) -> list[int]:
    try:
        counts = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        fail(f"{option}: comma-separated numbers, not '{text}'", 2)
    if not counts or counts[0] < 1:
        fail(f"{option}: positive numbers, not '{text}'", 2)
    return counts


def capacity(
    drafter: str = typer.Option(DEFAULT_DRAFTER, help="The device model whose drafts are recorded and replayed."),
    target: str = typer.Option(DEFAULT_TARGET, help="The gateway's model (its own process, on one core)."),
    devices: str = typer.Option("1,2,4,8,16,32", help="Numbers of devices served at once, comma-separated."),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    limit: int = typer.Option(8, min=1, help="Prompts (device i generates on prompt i mod limit)."),
    max_new_tokens: int = typer.Option(48, min=2, help="Tokens each device generates."),
    draft_len: int = typer.Option(6, min=1, max=32, help="Draft tokens per verify."),
    itl_slo_ms: Optional[float] = typer.Option(None, min=0.1, help="ITL p99 a device may see (default: 1.5x cloud's ITL at the fewest devices)."),
    split_cores: Optional[bool] = typer.Option(None, "--split-cores/--shared-cores", help=SPLIT_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """N devices against one gateway core, cloud-only against speculative (the real drafter's
    drafts, recorded and replayed): server tokens/s, ITL p50/p99, rows per pass, peak RSS, the
    capacity at an ITL SLO, and the cost model's prediction of every point."""
    from ..bench.capacity import bench_capacity
    from ..bench.machine import split_cores as halves

    counts = _counts(devices, "--devices")
    split = halves() is not None if split_cores is None else split_cores
    try:
        result = bench_capacity(drafter=drafter, target=target, prompts=_prompts(prompts, limit), devices=counts,
                                max_new_tokens=max_new_tokens, draft_len=draft_len, itl_slo_ms=itl_slo_ms, split=split,
                                progress=lambda m: err.print(f"[dim]{m}[/]"))
    except ValueError as exc:
        fail(str(exc), 2)
    print_result(result, "bench capacity", as_json)


def simulate(
    devices: int = typer.Option(100_000, min=1, help="Device requests over the run (a Poisson rate), unless --trace."),
    duration_s: float = typer.Option(3600.0, min=1.0, help="Simulated seconds the requests arrive over."),
    trace: Optional[Path] = typer.Option(None, help="A trace (CSV: BurstGPT's or Azure's columns, or JSONL): timestamp, prompt and answer tokens. 'sample' for the bundled one."),
    prompt_tokens: float = typer.Option(200, min=1, help="Median prompt length (Poisson arrivals; lognormal)."),
    answer_tokens: float = typer.Option(150, min=1, help="Median answer length (Poisson arrivals; lognormal)."),
    curves: Optional[Path] = typer.Option(None, help="A `bench capacity --json` output: the pass costs (default: the bundled measurement)."),
    device_classes: Optional[str] = typer.Option(None, help="NAME:SHARE:DRAFT_MS[:ALPHA],... (default: phone:0.7:45,laptop:0.3:22; ALPHA: --alpha)."),
    alpha: Optional[float] = typer.Option(None, min=0.0, max=0.999, help="Acceptance of drafts (default: the curves' speculative points)."),
    rtt: str = typer.Option("20", help="Round trip: MS, lognormal:MEDIAN_MS:SIGMA or file:PATH (ms a line)."),
    cloud_share: float = typer.Option(0.35, min=0.0, max=1.0, help="Routed mode: the query router's share of requests sent to the cloud."),
    replicas: int = typer.Option(1, min=1, help="Gateway replicas (without --find-replicas)."),
    find_replicas: bool = typer.Option(False, "--find-replicas", help="The fewest replicas holding the ITL SLO with no rejection, per mode."),
    itl_slo_ms: Optional[float] = typer.Option(None, min=0.1, help="The p99 SLO, ms (default: 1.5x one cloud stream's ITL on the curves)."),
    slo_metric: str = typer.Option("itl", help="What the SLO bounds: itl (every token's gap) or tpot (a request's mean time a token)."),
    max_sessions: int = typer.Option(64, min=1, help="Sessions a replica holds (the gateway's max_sessions)."),
    kv_budget_mb: Optional[float] = typer.Option(None, min=1.0, help="KV cache budget a replica (default: none)."),
    draft_len: Optional[int] = typer.Option(None, min=0, max=32, help="Draft tokens a verify (default: the curves')."),
    seed: int = typer.Option(0),
    validate: Optional[Path] = typer.Option(None, help="Replay this `bench capacity --json` run's own setup and compare with what it measured."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Gateway replicas serving many devices, simulated on measured pass costs: TTFT and ITL
    p50/p99, throughput, rejections and evictions for cloud-only, hybrid (speculative) and routed
    modes; --find-replicas sizes each; --validate checks the simulation against a measured run."""
    import numpy as np

    from ..bench.plan import DEFAULT_CLASSES, DEFAULT_CURVES, load_curves, measured_alpha, plan
    from ..bench.plan import validate as check
    from ..bench.simulate import GatewayRules
    from ..bench.workload import SAMPLE_TRACE, load_trace, parse_classes, poisson

    if slo_metric not in ("itl", "tpot"):
        fail(f"--slo-metric: itl or tpot, not '{slo_metric}'", 2)
    try:
        if validate is not None:
            print_result(check(load_curves(validate)), "bench simulate --validate", as_json)
            return
        data = load_curves(curves or DEFAULT_CURVES)
        a = alpha if alpha is not None else (measured_alpha(data) or 0.7)
        classes = parse_classes(device_classes or DEFAULT_CLASSES, a)
        if trace is not None:
            arr = load_trace(SAMPLE_TRACE if str(trace) == "sample" else trace)
        else:
            arr = poisson(devices, duration_s, np.random.default_rng(seed), prompt_median=prompt_tokens, answer_median=answer_tokens)
        rules = GatewayRules.of(max_sessions=max_sessions, kv_budget_mb=kv_budget_mb)
        result = plan(arr, data, classes=classes, rtt=rtt, cloud_share=cloud_share, replicas=replicas, find=find_replicas,
                      itl_slo_ms=itl_slo_ms, rules=rules, draft_len=draft_len, seed=seed, slo_metric=slo_metric,
                      progress=lambda m: err.print(f"[dim]{m}[/]"))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    print_result(result, "bench simulate", as_json)


def ttft(
    drafter: str = typer.Option(DEFAULT_DRAFTER, help="The device model."),
    target: str = typer.Option(DEFAULT_TARGET, help="The gateway's model (its own process)."),
    prompt_tokens: int = typer.Option(700, min=1, max=32000, help="Prompt length in tokens, built from Spec-Bench text."),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    reps: int = typer.Option(2, min=1, max=20, help="Runs per mode (the median is reported)."),
    rtt_ms: Optional[float] = typer.Option(None, min=0, help="Put the gateway behind the link simulator with this round trip."),
    split_cores: Optional[bool] = typer.Option(None, "--split-cores/--shared-cores", help=SPLIT_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Time to first token on a long prompt: cloud, speculative and local against the same gateway,
    beside llama.cpp's own batched prefill of that prompt for the target and the device model."""
    from ..bench.machine import split_cores as halves
    from ..bench.ttft import bench_ttft

    split = halves() is not None if split_cores is None else split_cores
    try:
        result = bench_ttft(drafter=drafter, target=target, texts=_prompts(prompts, None), prompt_tokens=prompt_tokens,
                            split=split, rtt_ms=rtt_ms, reps=reps, progress=lambda m: err.print(f"[dim]{m}[/]"))
    except ValueError as exc:
        fail(str(exc), 2)
    print_result(result, "bench ttft", as_json)


def structured(
    drafter: str = typer.Option(DEFAULT_DRAFTER, help="The device model."),
    target: str = typer.Option(DEFAULT_TARGET, help="The gateway's model."),
    schemas: Optional[Path] = typer.Option(None, help="JSONL, one {\"prompt\": ..., \"schema\": {...}} a line (default: the bundled sample)."),
    limit: Optional[int] = typer.Option(None, min=1, help="The first N lines only."),
    max_new_tokens: int = typer.Option(128, min=1),
    draft_len: str = typer.Option("6", help="Device-model drafts per round (forced drafts come on top), fixed so both runs "
                                             "draft alike; or 'auto'."),
    rtt_ms: Optional[float] = typer.Option(None, min=0, help="Put the gateway behind the link simulator with this round trip."),
    split_cores: Optional[bool] = typer.Option(None, "--split-cores/--shared-cores", help=SPLIT_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Speculative decoding under a JSON Schema vs cloud mode under the same schema (valid,
    mismatches, speed-up), and vs the same prompts without it (tokens per round, forced share)."""
    from ..bench.machine import split_cores as halves
    from ..bench.structured import bench_structured, load_schemas

    try:
        items = load_schemas(schemas, limit)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    k = "auto" if draft_len == "auto" else int(draft_len) if draft_len.isdigit() else fail("--draft-len: a number or 'auto'", 2)

    def progress(i, n, rec, ok):
        err.print(f"[{i}/{n}] {len(rec.tokens)} tokens, {rec.usage.rounds} rounds, {rec.usage.forced_tokens} forced, "
                  f"{'valid' if ok else '[red]not valid[/]'}")

    split = halves() is not None if split_cores is None else split_cores
    result = run(bench_structured(drafter=drafter, target=target, items=items, max_new_tokens=max_new_tokens, draft_len=k,
                                  rtt_ms=rtt_ms, split=split, progress=progress))
    print_result(result, "bench structured", as_json)


def register(bench_app: typer.Typer) -> None:
    add_commands(bench_app, {"simulate": simulate, "capacity": capacity, "verify-cost": verify_cost,
                             "speculative": speculative, "modes": modes, "rtt-plot": rtt_plot, "ttft": ttft,
                             "structured": structured})
