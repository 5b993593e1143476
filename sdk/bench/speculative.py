"""`tandem bench speculative` and `tandem bench modes`: every comparison measured side by side in one run,
next to what the cost model predicts from calibration passes of its own."""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from contextlib import contextmanager

from ...local_runtime.speculative import expected_tokens_per_round
from ..auto import break_even_rtt_s
from ..client import Client
from ..costmodel import ceiling_s_per_token, predict, predict_rounds
from .calibrate import Calibration, calibrate
from .machine import cpu_flags, pin, split_cores
from .plots import plot_modes
from .prompts import BUILTIN_PROMPTS


@contextmanager
def gateway_link(target: str, gateway: str = "inproc", rtt_ms: float | None = None, cores: set[int] | None = None):
    """Where the client should connect. Without an RTT or cores: the given gateway ("inproc": one
    in this process). Otherwise a gateway process on `cores` (or the given URL), behind the link
    simulator adding rtt_ms / 2 each way when an RTT is given."""
    if rtt_ms is None and cores is None:
        yield gateway
        return
    from .launch import GatewayProcess
    from .linksim import LinkProxy

    with contextlib.ExitStack() as stack:
        if gateway == "inproc":
            proc = stack.enter_context(GatewayProcess(target, quiet=True, cores=cores))
            url, port = proc.url, proc.port
        else:
            url, port = gateway, int(gateway.rstrip("/").rsplit(":", 1)[1])
        if rtt_ms is not None:
            url = stack.enter_context(LinkProxy(port, delay_ms=rtt_ms / 2)).url
        yield url


@contextmanager
def placed(split: bool):
    """With `split`: this process (the device) on one half of the cores, the gateway process on
    the other; yields (device cores, gateway cores), or (None, None) on one core or without."""
    halves = split_cores() if split else None
    if halves is None:
        yield None, None
        return
    before = os.sched_getaffinity(0)
    pin(halves[0])
    try:
        yield halves
    finally:
        os.sched_setaffinity(0, before)


def machine(device_cores, gateway_cores) -> dict:
    return {"cpu_flags": cpu_flags(), "cores": {"device": sorted(device_cores) if device_cores else "all",
                                                "gateway": sorted(gateway_cores) if gateway_cores else "all"}}


async def bench_speculative(
    *,
    drafter: str,
    target: str,
    prompts: list[str],
    max_new_tokens: int = 64,
    draft_len: int | str = 4,
    gateway: str = "inproc",
    rtt_ms: float | None = None,
    pipeline: bool | None = None,
    split: bool = False,
    baseline: str | None = None,
    progress=None,
) -> dict:
    """Target alone (cloud), drafter alone (local) and speculative, per prompt, in one run, after
    calibration passes that measure the cost model's inputs (calibrate.py); then what the cost
    model predicts for the rounds the run made, beside what it measured.

    mismatches counts prompts whose speculative greedy output differs from the target's own.
    acceptance_rate is accepted / tested over the draft tokens the target judged.
    theory_tokens_per_round averages E(a, k) = (1 - a^(k+1)) / (1 - a) over the rounds, with each
    round's k and its prompt's own acceptance rate a; theory_tokens_per_round_global_alpha uses
    the run's single rate instead (E is convex in a, so one pooled rate under-predicts).
    predicted_speedup_vs_cloud comes from the calibration timings, each round's k and each
    prompt's acceptance (costmodel.py); efficiency is speedup_vs_cloud over it.
    Both s_per_token figures include the prompt's prefill, which the two modes pay alike (so a
    long prompt dilutes the speed-up). decode_s_per_token counts only what comes after each
    generation's first piece of text, and decode_speedup_vs_cloud is the steady-state ratio the
    cost model's per-token figure (predicted_decode_speedup_vs_cloud) is about.
    ceiling_speedup_vs_cloud (and ceiling_decode_speedup_vs_cloud) is the same prediction with
    drafting free and never discarded (costmodel.ceiling_s_per_token): what no pipelining or
    drafting schedule can beat at this pair's acceptance and this target's verify curve.
    `baseline`: a model measured alone on its own engine's loop, on the gateway's cores once the
    gateway has stopped (baseline.py: speedup_vs_baseline, cloud_vs_engine).
    """
    with placed(split) as (device_cores, gateway_cores):
        with gateway_link(target, gateway, rtt_ms, gateway_cores) as url:
            out = await _bench_speculative(drafter, target, url, prompts, max_new_tokens, draft_len, pipeline, progress)
        out.update(machine(device_cores, gateway_cores))
        if baseline is not None:
            from .baseline import compare, engine_baseline

            base = engine_baseline(baseline, prompts, max_new_tokens, gateway_cores)
            out.update({"baseline": baseline, **compare(out, base, out.pop("cloud_outputs"))})
        else:
            out.pop("cloud_outputs")
    if rtt_ms is not None:
        out["rtt_ms"] = rtt_ms
    return out


async def _bench_speculative(drafter, target, gateway, prompts, max_new_tokens, draft_len, pipeline, progress) -> dict:
    client = Client(drafter=drafter, target=target if gateway == "inproc" else None, gateway=gateway, draft_len=draft_len,
                    pipeline=pipeline)
    totals = {m: dict.fromkeys(("s", "tokens", "first_s", "decode_s", "decode_tokens"), 0.0)
              for m in ("cloud", "local", "speculative")}
    mismatches, rounds, examples, prompt_alpha, cloud_outputs = 0, [], [], [], []
    accepted = tested = 0
    predicted = {"cloud": 0.0, "speculative": 0.0, "ceiling": 0.0}
    ceiling_decode_s = 0.0  # free drafting at each prompt's acceptance, over its tokens
    try:
        _ = client.drafter, client.transport  # load both models before timing anything
        served = await client.transport.info()  # what the gateway runs (NAME@auto: what it chose and why)
        cal = await calibrate(client)
        tok = client.drafter.tokenizer
        for i, prompt in enumerate(prompts):
            runs = {}
            for mode in ("cloud", "local", "speculative"):
                runs[mode], timing = await timed(client, prompt, mode, max_new_tokens)
                for key, value in timing.items():
                    totals[mode][key] += value
            spec, ref = runs["speculative"], runs["cloud"]
            cloud_outputs.append(list(ref.tokens))
            if spec.tokens != ref.tokens:
                mismatches += 1
                examples.append({"prompt": prompt[:80], "target": ref.text[:200], "speculative": spec.text[:200]})
            rounds.extend(spec.rounds)
            alpha_i = spec.usage.acceptance_rate
            prompt_alpha.extend([alpha_i] * len(spec.rounds))
            accepted += spec.usage.accepted_tokens
            tested += spec.usage.tested_tokens
            n_prompt = len(tok.prompt_tokens(prompt))
            predicted["cloud"] += _predicted_cloud_s(cal, n_prompt, len(ref.tokens))
            predicted["speculative"] += _predicted_speculative_s(cal, n_prompt, spec, alpha_i, client.pipelining)
            predicted["ceiling"] += _predicted_speculative_s(cal, n_prompt, spec, alpha_i, client.pipelining, ceiling=True)
            ceiling_decode_s += ceiling_s_per_token(cal.timings(), alpha_i)[0] * len(spec.tokens)
            if progress:
                progress(i + 1, len(prompts), spec)
    finally:
        await client.aclose()

    alpha = accepted / tested if tested else 0.0
    spt = {m: v["s"] / max(1, v["tokens"]) for m, v in totals.items()}
    decode = {m: v["decode_s"] / max(1, v["decode_tokens"]) for m, v in totals.items()}
    seconds, expected = predict_rounds(cal.timings(), prompt_alpha, [r.k for r in rounds], client.pipelining)
    pred = {m: predicted[m] / max(1, totals[m if m != "ceiling" else "speculative"]["tokens"]) for m in predicted}
    emitted = sum(r.emitted for r in rounds)
    speedup = spt["cloud"] / spt["speculative"]
    predicted_speedup = pred["cloud"] / pred["speculative"] if pred["speculative"] else float("nan")
    out = {
        "prompts": len(prompts),
        "mismatches": mismatches,
        "acceptance_rate": round(alpha, 4),
        "tokens_per_round": round(emitted / max(1, len(rounds)), 4),
        "theory_tokens_per_round": round(
            sum(expected_tokens_per_round(a, r.k) for a, r in zip(prompt_alpha, rounds)) / max(1, len(rounds)), 4
        ),
        "theory_tokens_per_round_global_alpha": round(
            sum(expected_tokens_per_round(alpha, r.k) for r in rounds) / max(1, len(rounds)), 4
        ),
        "cloud_passes_per_token": round(len(rounds) / max(1, emitted), 4),
        "speedup_vs_cloud": round(speedup, 3),
        "speedup_vs_local": round(spt["local"] / spt["speculative"], 3),
        "predicted_speedup_vs_cloud": round(predicted_speedup, 3),
        "efficiency": round(speedup / predicted_speedup, 3),
        "s_per_token": {m: round(v, 5) for m, v in spt.items()},
        "first_piece_s": {m: round(v["first_s"] / max(1, len(prompts)), 3) for m, v in totals.items()},
        "ttft_ms": {m: round(v["first_s"] / max(1, len(prompts)) * 1000, 1) for m, v in totals.items()},  # the same, in ms
        "decode_s_per_token": {m: round(v, 5) for m, v in decode.items()},
        "decode_speedup_vs_cloud": round(decode["cloud"] / decode["speculative"], 3) if decode["speculative"] else None,
        "predicted_decode_speedup_vs_cloud": round(cal.step_s / (seconds / expected), 3) if seconds else None,
        "predicted_s_per_token": {m: round(v, 5) for m, v in pred.items()},
        "ceiling_speedup_vs_cloud": round(pred["cloud"] / pred["ceiling"], 3) if pred["ceiling"] else None,
        "ceiling_decode_speedup_vs_cloud": (
            round(cal.step_s * totals["speculative"]["tokens"] / ceiling_decode_s, 3) if ceiling_decode_s else None
        ),
        "calibration": cal.to_dict(),
        "drafter": drafter,
        "target": target,
        "target_served": served.model,
        "target_choice": served.target,
        "gateway_load_s": served.load_s,
        "device_load_s": round(client.drafter_load_s, 2) if client.drafter_load_s is not None else None,
        "target_dtype": target_dtype(served.model),
        "draft_len": draft_len,
        "mean_draft_len": round(sum(r.k for r in rounds) / max(1, len(rounds)), 2),
        "pipeline": client.pipelining,
        "max_new_tokens": max_new_tokens,
        "rounds": len(rounds),
        "tokens": emitted,
        "cloud_outputs": cloud_outputs,  # for a baseline's comparison; not printed
    }
    if client._owned_gateway is not None:
        out["tie_recomputes"] = client._owned_gateway.stats.get("tie_recomputes", 0)
    if examples:
        out["mismatch_examples"] = examples[:3]
    return out


async def timed(client: Client, prompt: str, mode: str, max_new_tokens: int, **kwargs):
    """One generation, streamed: its record, and its seconds and tokens in all, up to the first
    piece of text (the prompt's prefill and the first round), and after it (the decode phase)."""
    gen = client.stream(prompt, mode=mode, max_new_tokens=max_new_tokens, **kwargs)
    t0 = time.perf_counter()
    first, first_tokens = None, 0
    async for _piece in gen:
        if first is None:
            first, first_tokens = time.perf_counter(), len(gen.record.tokens)
    end = time.perf_counter()
    first = end if first is None else first
    n = len(gen.record.tokens)
    return gen.record, {"s": end - t0, "tokens": n, "first_s": first - t0, "decode_s": end - first,
                        "decode_tokens": n - first_tokens}


def _predicted_cloud_s(cal: Calibration, prompt_tokens: int, tokens: int) -> float:
    """Cloud mode for one prompt: a round trip, the gateway's prefill, one step per token."""
    return cal.rtt_s + cal.prefill_s * prompt_tokens + tokens * cal.step_s


def _predicted_speculative_s(cal: Calibration, prompt_tokens: int, rec, alpha: float, pipeline: bool,
                             ceiling: bool = False) -> float:
    """Speculation for one prompt: the open (the gateway's prefill beside the device's), then
    the rounds it made, at the cost model's predicted time per expected token (with `ceiling`,
    at its best with free drafting)."""
    timings = cal.timings()
    if ceiling:
        per_token = ceiling_s_per_token(timings, alpha)[0]
    else:
        seconds, tokens = predict_rounds(timings, [alpha] * len(rec.rounds), [r.k for r in rec.rounds], pipeline)
        per_token = seconds / tokens if tokens else 0.0
    opening = cal.rtt_s + max(cal.prefill_s, cal.device_prefill_s) * prompt_tokens
    return opening + per_token * len(rec.tokens) + cal.rtt_s  # the last round trip: the close


def target_dtype(target: str) -> str:
    """How the target's weights are held, from its name (`NAME:bf16`, `NAME@llama.cpp`, ...)."""
    base, _, variant = target.partition(":")
    if "@llama" in target:
        return "gguf (llama.cpp)"
    return {"bf16": "bfloat16", "int8": "int8 weights", "w8a8": "int8 weights and activations (W8A8)",
            "fp32": "float32"}.get(variant, "float32")


def similarity(a: str, b: str) -> float:
    """How much of two texts agrees: difflib's ratio, 2 x matched characters / total characters
    (1.0 identical, 0.0 nothing in common). Tokenizer-agnostic, so outputs of models with
    different vocabularies compare."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


# "assist" is the assist mode at the client's default threshold (0.5); assist@T at threshold T
FIXED_MODES = ("local", "cloud", "speculative", "assist@0.3", "assist", "assist@0.8")


def _mode_args(mode: str) -> dict:
    """'assist@0.6' -> assist mode at threshold 0.6; other names as they are."""
    name, _, threshold = mode.partition("@")
    args = {"mode": name}
    if threshold:
        args["assist_threshold"] = float(threshold)
    return args


async def bench_modes(
    *,
    drafter: str,
    target: str,
    prompts: list[str],
    max_new_tokens: int = 48,
    rtt_ms: float | None = None,
    gateway: str = "inproc",
    modes: tuple[str, ...] = FIXED_MODES,
    auto_modes: tuple[str, ...] = ("cloud", "speculative"),
    token_router: str = "confidence",
    pipeline: bool | None = None,
    split: bool = False,
    out_png: str | None = "bench-modes.png",
    progress=None,
) -> dict:
    """Every mode on the same prompts, through the same link, in one run, each beside what the
    cost model predicts from calibration passes (`predicted_s_per_token`, drawn in `out_png`); then `auto`, which
    decides per prompt from what the client measured during the fixed modes' runs. `assist@T`
    is the assist mode with `token_router` at threshold T.

    s_per_token is wall time over tokens (prefill included); agreement_with_target compares each
    mode's text with the cloud model's own (`similarity`); auto_vs_best is auto's s_per_token over
    the best fixed mode among those auto may choose (`auto_vs_fastest`: over every fixed mode).
    break_even_rtt_ms is the RTT below which speculative is predicted to beat cloud, from the
    client's estimates after the run (`auto.break_even_rtt_s`: 0 = never, null = past 2 s).
    """
    with placed(split) as (device_cores, gateway_cores), gateway_link(target, gateway, rtt_ms, gateway_cores) as url:
        client = Client(drafter=drafter, target=target if url == "inproc" else None, gateway=url, auto_modes=auto_modes,
                        token_router=token_router, pipeline=pipeline)
        try:
            _ = client.drafter, client.transport
            for mode in modes:  # warm up: load, connect, first measurements for auto
                await client.generate(BUILTIN_PROMPTS[2], max_new_tokens=8, **_mode_args(mode))
            cal = await calibrate(client)
            tested = accepted = 0
            stats = {m: {"s": 0.0, "tokens": 0, "passes": 0.0, "agree": 0.0} for m in (*modes, "auto")}
            chosen: dict[str, int] = {}
            for i, prompt in enumerate(prompts):
                records = {}
                for mode in (*modes, "auto"):
                    t0 = time.perf_counter()
                    rec = await client.generate(prompt, max_new_tokens=max_new_tokens, **_mode_args(mode))
                    st = stats[mode]
                    st["s"] += time.perf_counter() - t0
                    st["tokens"] += len(rec.tokens)
                    u = rec.usage
                    st["passes"] += u.rounds if rec.mode in ("speculative", "assist") else (len(rec.tokens) if rec.mode == "cloud" else 0)
                    records[mode] = rec
                    if mode == "speculative":
                        tested, accepted = tested + u.tested_tokens, accepted + u.accepted_tokens
                    if mode == "auto":
                        chosen[rec.mode] = chosen.get(rec.mode, 0) + 1
                reference = records["cloud"].text if "cloud" in records else None
                for mode, rec in records.items():
                    stats[mode]["agree"] += similarity(rec.text, reference) if reference is not None else 0.0
                if progress:
                    progress(i + 1, len(prompts), records)
        finally:
            await client.aclose()
    n = max(1, len(prompts))
    table = {
        m: {
            "s_per_token": round(st["s"] / max(1, st["tokens"]), 5),
            "cloud_passes_per_token": round(st["passes"] / max(1, st["tokens"]), 4),
            "agreement_with_target": round(st["agree"] / n, 4),
        }
        for m, st in stats.items()
    }
    allowed = [m for m in auto_modes if m in modes] or list(modes)
    best = min(table[m]["s_per_token"] for m in allowed)
    fastest = min(table[m]["s_per_token"] for m in modes)
    spec, cloud = table.get("speculative"), table.get("cloud")
    be = break_even_rtt_s(client.estimate, max_new_tokens)
    alpha = accepted / tested if tested else client.estimate.alpha
    predicted = {
        m: round(predict(m.partition("@")[0], cal.timings(), alpha, pipeline=client.pipelining, n_tokens=max_new_tokens,
                         escalate_rate=table[m]["cloud_passes_per_token"]).s_per_token, 5)
        for m in modes
    }
    for m, v in predicted.items():
        table[m]["predicted_s_per_token"] = v
    png = plot_modes(table, out_png) if out_png else None
    return {
        "png": png,
        **machine(device_cores, gateway_cores),
        "calibration": cal.to_dict(),
        "acceptance_rate": round(alpha, 4),
        "modes": table,
        "auto_vs_best": round(table["auto"]["s_per_token"] / best, 3),
        "auto_vs_fastest": round(table["auto"]["s_per_token"] / fastest, 3),
        "auto_chose": chosen,
        "auto_modes": list(auto_modes),
        "speculative_beats_cloud": bool(spec and cloud and spec["s_per_token"] < cloud["s_per_token"]),
        # predicted from this run's estimates: speculation beats streaming below this RTT
        "break_even_rtt_ms": None if be is None else round(be * 1000, 1),
        "rtt_ms": rtt_ms,
        "pipeline": client.pipelining,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "drafter": drafter,
        "target": target,
        "estimates": client.estimate.to_dict(),
    }


__all__ = ["bench_speculative", "bench_modes", "gateway_link", "similarity"]
