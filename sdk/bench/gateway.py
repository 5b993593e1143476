"""`tandem bench gateway`: many concurrent sessions against one gateway over real HTTP (uvicorn
on 127.0.0.1), the same load run twice in one process: with batched verification off, then on.

Each of N sessions opens with its own prompt (different lengths, so caches differ), then all of
them verify `rounds` drafts of k tokens at the same moment (a barrier), then close; `waves`
repeats that with fresh sessions (a longer run, for memory). Drafts come from a prompt-lookup
drafter (the tokens that followed the last occurrence of the context's final bigram), which is
cheap, deterministic and accepted now and then, so the client costs the gateway's CPU nothing.
Both runs see identical requests, so their outputs must be identical token for token
(`mismatches`).

    verify_per_s          verifies answered per second in the verify phase (batched run)
    batched_vs_unbatched  that rate over the unbatched run's
    p99_ms                99th percentile of one verify's round trip, as the client sees it (batched run)
    peak_rss_mb           the process's peak resident memory while serving (model weights, caches,
                          buffers; both runs): the high-water mark is reset once the model is
                          loaded, since loading a GGUF file peaks far above what serving needs
                          (`load_peak_rss_mb`)
"""

from __future__ import annotations

import asyncio
import gc
import resource
import time

import httpx

from ...local_runtime.models import LoadedModel, load_model
from ...protocols.http import HttpTransport
from ...protocols.messages import CloseSession, OpenSession, VerifyRequest
from ...remote_gateway.app import create_app
from ...remote_gateway.batching import BatchingConfig
from ...remote_gateway.service import Gateway, GatewayLimits
from .launch import serving

PROMPTS = [
    "Explain how a hash table works.",
    "Write a short poem about the sea.",
    "What is the capital of Australia, and why was it chosen?",
    "Summarize in two sentences: The city council met on Tuesday to discuss the new park. Residents "
    "spoke for and against the plan, which would replace a parking lot with trees and benches.",
    "Translate German to English: Das Wetter ist heute schön, und wir gehen in den Park.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
]


def lookup_draft(context: list[int], k: int) -> list[int]:
    """Prompt-lookup drafting: the k tokens after the latest earlier occurrence of the context's
    last two tokens (else of its last token), else the last token repeated."""
    if k == 0 or not context:
        return []
    for n in (2, 1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for i in range(len(context) - n - 1, -1, -1):
            if context[i : i + n] == tail:
                follow = context[i + n : i + n + k]
                if follow:
                    return (follow + [follow[-1]] * k)[:k]
    return [context[-1]] * k


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM) of this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


async def _wave(url: str, prompts: list[list[int]], fingerprint: str, rounds: int, k: int, max_new: int) -> dict:
    n = len(prompts)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:
        transport = HttpTransport(url, client=http)
        latencies: list[float] = []
        outputs: list[list[int]] = [[] for _ in range(n)]
        errors = 0
        verifies = 0
        accepted = 0
        drafted = 0
        opened_all = asyncio.Event()
        ready = 0
        go_time = [0.0]

        async def one(i: int) -> None:
            nonlocal errors, verifies, accepted, drafted, ready
            opened = None
            try:
                opened = await transport.request(
                    OpenSession(prompt_tokens=prompts[i], tokenizer_fingerprint=fingerprint, max_new_tokens=max_new)
                )
            except Exception:
                errors += 1
            finally:
                ready += 1
                if ready == n:
                    go_time[0] = time.perf_counter()
                    opened_all.set()
            await opened_all.wait()
            if opened is None:
                return
            context, pos, r = list(prompts[i]), opened.position, None
            try:
                for _ in range(rounds):
                    draft = lookup_draft(context, k)
                    t0 = time.perf_counter()
                    r = await transport.request(
                        VerifyRequest(session_id=opened.session_id, position=pos, draft_tokens=draft, draft_probs=[0.5] * len(draft))
                    )
                    latencies.append(time.perf_counter() - t0)
                    verifies += 1
                    accepted += r.accepted
                    drafted += len(draft)
                    context = context[:pos] + r.tokens
                    pos = r.position
                    outputs[i].extend(r.tokens)
                    if r.finished:
                        break
                if r is None or not r.finished:
                    await transport.request(CloseSession(session_id=opened.session_id))
            except Exception:
                errors += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - go_time[0]
    return {"wall_s": wall, "verifies": verifies, "latencies": latencies, "errors": errors,
            "outputs": outputs, "accepted": accepted, "drafted": drafted}


def _run(lm: LoadedModel, batched: bool, prompts, rounds: int, waves: int, k: int) -> dict:
    n = len(prompts)
    limits = GatewayLimits(max_sessions=max(64, 2 * n), max_draft_tokens=max(32, k), max_new_tokens=4096)
    gateway = Gateway(lm, limits, batching=BatchingConfig(enabled=batched, max_batch=max(64, n)))
    try:
        with serving(create_app(gateway)) as url:
            waves_out = [
                asyncio.run(_wave(url, prompts, lm.tokenizer.fingerprint, rounds, k, max_new=rounds * (k + 1) + 8))
                for _ in range(waves)
            ]
    finally:
        gateway.close()
    wall = sum(w["wall_s"] for w in waves_out)
    verifies = sum(w["verifies"] for w in waves_out)
    latencies = [x for w in waves_out for x in w["latencies"]]
    batches = gateway.batcher.batches
    return {
        "verify_per_s": verifies / wall if wall > 0 else 0.0,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "verifies": verifies,
        "errors": sum(w["errors"] for w in waves_out),
        "wall_s": wall,
        "mean_batch_size": gateway.batcher.batched_jobs / batches if batches else 1.0,
        "acceptance_rate": sum(w["accepted"] for w in waves_out) / max(1, sum(w["drafted"] for w in waves_out)),
        "outputs": [w["outputs"] for w in waves_out],
    }


def _warm_up(lm: LoadedModel) -> None:
    import torch

    with torch.inference_mode():
        for n in (8, 64):
            lm.model(input_ids=torch.zeros((1, n), dtype=torch.long), use_cache=False)


def bench_gateway(
    *, model: str | LoadedModel = "gemma3-270m", sessions: int = 32, rounds: int = 8, waves: int = 1, draft_len: int = 4, progress=None
) -> dict:
    say = progress or (lambda msg: None)
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    tok = lm.tokenizer
    base = [tok.prompt_tokens(p) for p in PROMPTS]
    prompts = [base[i % len(base)] + base[(i // len(base)) % len(base)][: 1 + i % 7] for i in range(sessions)]
    _warm_up(lm)
    load_peak = _peak_mb()
    t0 = time.perf_counter()
    say(f"unbatched: {sessions} sessions x {rounds} verifies x {waves} wave(s) ...")
    # unbatched first: the model still has its own attention function then
    _reset_peak()
    plain = _run(lm, False, prompts, rounds, waves, draft_len)
    plain["peak_rss_mb"] = _peak_mb()
    say(f"unbatched: {plain['verify_per_s']:.1f} verifies/s; batched ...")
    gc.collect()
    _reset_peak()
    packed = _run(lm, True, prompts, rounds, waves, draft_len)
    packed["peak_rss_mb"] = _peak_mb()
    say(f"batched: {packed['verify_per_s']:.1f} verifies/s (mean batch {packed['mean_batch_size']:.1f})")
    mismatches = sum(
        a != b for wa, wb in zip(plain["outputs"], packed["outputs"]) for a, b in zip(wa, wb)
    )
    peak_rss_mb = max(plain["peak_rss_mb"], packed["peak_rss_mb"])
    strip = lambda r: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "outputs"}  # noqa: E731
    return {
        "sessions": sessions,
        "errors": plain["errors"] + packed["errors"],
        "verify_per_s": round(packed["verify_per_s"], 3),
        "batched_vs_unbatched": round(packed["verify_per_s"] / plain["verify_per_s"], 3) if plain["verify_per_s"] else None,
        "p99_ms": round(packed["p99_ms"], 1),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "load_peak_rss_mb": round(load_peak, 1),
        "rss_end_mb": round(_status_mb("VmRSS") or 0.0, 1),
        "mismatches": mismatches,
        "model": lm.name,
        "rounds": rounds,
        "waves": waves,
        "draft_len": draft_len,
        "batched": strip(packed),
        "unbatched": strip(plain),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


__all__ = ["bench_gateway", "lookup_draft", "serving"]
