"""`tandem bench device`: every device backend on one model, measured side by side in one run.

For each backend:

    prefill_tok_per_s    an N-token prompt (Spec-Bench text) from an empty cache
    decode_tok_per_s     greedy drafting of `decode_tokens` tokens after a short prompt, through the
                         backend's `DraftingEngine.draft` (what the speculative loop calls); for
                         `llama.cpp`, llama.cpp's own generation loop (`Llama.generate`) after the
                         same prompt. `decode_vs_llama_cpp` is the median over rounds of the
                         best drafter's speed over llama.cpp's in that round (paired)
    greedy_agreement     share of Spec-Bench prompts whose next-token argmax after prefill equals
                         the fp32 reference's
    max_abs_logit_err    the largest |logit - reference logit| over those prompts
    resident_mb          the backend's own copy of the model (weights, plus llama.cpp's context)

Backends: reference-fp32 (the model's float forward), cpu-int8 (W8A8 chunked prefill, compiled),
cpu-int8-mixed (the same with the MLP down-projections in float), onnx (the W8A8 chunk graph in
ONNX Runtime, on an NPU execution provider when there is one), torch-int8 (the lean int8-weight
loop), llama.cpp (its own eval/generate loop; `llama.cpp-draft` is tandem's drafting engine over
it). `reference_top2_gap` gives quantiles of the reference's top-1 minus top-2 logit over the
agreement prompts: a prompt whose gap is below a backend's logit error can flip either way, so
these bound the agreement any approximation reaches.

Timings are medians over `reps` rounds, each round running every backend once in turn (the
order rotating), so load from other processes falls on all of them alike; llama.cpp's loop and the
drafting loop over it decode in PAIRED_DECODE_ROUNDS rounds.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from .machine import cpu_flags
from .prompts import load_prompts

Progress = Callable[[str], None]

DEFAULT_BACKENDS = ("reference-fp32", "cpu-int8", "cpu-int8-mixed", "onnx", "torch-int8", "llama.cpp")
ACCELERATED = ("cpu-int8", "cpu-int8-mixed", "onnx")  # the prefill backends the summary compares
# cpu-int8-mixed: W8A8 except the MLP down-projections, kept in float. Their input (the SwiGLU
# product) is the hardest activation to quantise; in float they halve the logit error.
MIXED_FLOAT_GROUPS = ("down",)
PAIRED_DECODE_ROUNDS = 9


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def _bench_prompt(tokenizer: Any, prompts: list[str], n: int) -> list[int]:
    """Exactly n token ids: Spec-Bench prompts run together through the chat template."""
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tokenizer.prompt_tokens(prompts[i % len(prompts)])
        i += 1
    return ids[:n]


def bench_device(
    model: str = "smollm2-135m",
    tokens: int = 512,
    *,
    decode_tokens: int = 128,
    prompts_path: str | None = None,
    limit: int | None = None,
    reps: int = 3,
    backends: list[str] | None = None,
    threads: int | None = None,
    chunk: int = 128,
    compile: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure the device backends on `model`; returns the `bench device` JSON object."""
    import torch

    from ...local_runtime.backends import gguf_path, prefill_backend
    from ...local_runtime.engine import Engine
    from ...local_runtime.models import load_model
    from ...local_runtime.quant_w8a8 import kernel_report
    from ...protocols.errors import BackendUnavailable, ModelLoadError

    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    wanted = set(backends or DEFAULT_BACKENDS)
    unknown = sorted(wanted - set(DEFAULT_BACKENDS))
    if unknown:
        raise ValueError(f"unknown device backend(s) {unknown} (known: {', '.join(DEFAULT_BACKENDS)})")

    lm = load_model(model, progress=False)
    texts = load_prompts(prompts_path, None)
    agree_prompts = load_prompts(prompts_path, limit)
    bench_ids = _bench_prompt(lm.tokenizer, texts, tokens)
    agree_ids = [lm.tokenizer.prompt_tokens(p)[:tokens] for p in agree_prompts]
    decode_prompt = bench_ids[: min(64, tokens)]

    out: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    prefill_fns: dict[str, Callable[[list[int]], Any]] = {}  # name -> tokens -> logits
    decode_fns: dict[str, Callable[[], float]] = {}  # name -> seconds for decode_tokens tokens

    def entry(name: str, device: str, resident: int, setup_s: float, role: str) -> None:
        out[name] = {
            "prefill_tok_per_s": None, "decode_tok_per_s": None, "greedy_agreement": None,
            "max_abs_logit_err": None, "resident_mb": round(resident / 2**20, 1), "device": device,
            "setup_s": round(setup_s, 2), "role": role,
        }

    def torch_decode(make_engine: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            engine = make_engine()
            engine.prefill(decode_prompt)
            t0 = time.perf_counter()
            engine.draft(decode_tokens)
            return time.perf_counter() - t0

        return run

    # -- build ------------------------------------------------------------------------------------
    ref = prefill_backend("reference-fp32", lm)
    entry(ref.name, ref.device, ref.resident_bytes(), 0.0, "prefill+decode")
    prefill_fns[ref.name] = lambda ids: ref.prefill(ids).logits
    decode_fns[ref.name] = torch_decode(lambda: Engine(lm))

    kernel_shape = None  # the shape the cpu-int8 backend timed its int8 GEMM on
    chunked = (
        ("cpu-int8", "cpu-int8", {"chunk": chunk, "compile": compile}),
        ("cpu-int8-mixed", "cpu-int8", {"chunk": chunk, "compile": compile, "float_groups": MIXED_FLOAT_GROUPS}),
        ("onnx", "onnx", {"chunk": chunk, "threads": threads}),
    )
    for name, kind, opts in chunked:
        if name not in wanted:
            continue
        say(f"building {name} (calibration, quantisation, {'export' if kind == 'onnx' else 'compile'}) ...")
        t0 = time.perf_counter()
        try:
            b = prefill_backend(kind, lm, **opts)
            b.prefill(bench_ids[: chunk + 1])  # compile / first-run costs belong to setup
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
            continue
        entry(name, b.device, b.resident_bytes(), time.perf_counter() - t0, "prefill")
        prefill_fns[name] = lambda ids, b=b: b.prefill(ids).logits
        if kind == "cpu-int8":
            kernel_shape = b.runner.kernel_shape

    if "torch-int8" in wanted:
        from ...local_runtime.backends.lean import StaticInt8Model

        t0 = time.perf_counter()
        lean = StaticInt8Model(lm, capacity=tokens + decode_tokens + 8)
        entry("torch-int8", "torch cpu, int8 weights, static cache (lean loop)", lean.resident_bytes(),
              time.perf_counter() - t0, "prefill+decode")
        prefill_fns["torch-int8"] = lambda ids: lean.new_engine().prefill(ids)
        decode_fns["torch-int8"] = torch_decode(lean.new_engine)

    if "llama.cpp" in wanted:
        try:
            from ...local_runtime.backends.llamacpp import LlamaCppModel, native_generate_rate

            path = gguf_path(model.partition(":")[0])
            t0 = time.perf_counter()
            n_ctx = max(2048, tokens + decode_tokens + 64)
            native = LlamaCppModel(model, path, lm.tokenizer, n_ctx=n_ctx, n_threads=threads)
            drafter = LlamaCppModel(model, path, lm.tokenizer, n_ctx=n_ctx, n_threads=threads)
            setup = time.perf_counter() - t0
        except (BackendUnavailable, ModelLoadError) as exc:
            skipped["llama.cpp"] = str(exc)
        else:
            entry("llama.cpp", f"llama.cpp ({native.n_threads} threads), its own eval and generate loop",
                  native.resident_bytes(), setup, "prefill+decode (reference implementation)")
            entry("llama.cpp-draft", f"tandem DraftingEngine over llama.cpp ({drafter.n_threads} threads)",
                  drafter.resident_bytes(), setup, "decode")
            native_rates: dict[str, list[float]] = {"prefill": [], "decode": []}

            def native_run() -> float:
                p, d = native_generate_rate(native, bench_ids, decode_tokens, decode_prompt)
                native_rates["prefill"].append(p)
                native_rates["decode"].append(d)
                return decode_tokens / d

            def draft_prefill(ids: list[int]) -> Any:
                return drafter.new_engine().prefill(ids)

            prefill_fns["llama.cpp"] = draft_prefill  # logits for agreement; speed from native_run
            decode_fns["llama.cpp"] = native_run
            decode_fns["llama.cpp-draft"] = torch_decode(drafter.new_engine)

    # -- speed, interleaved ---------------------------------------------------------------------
    prefill_t: dict[str, list[float]] = {n: [] for n in prefill_fns if n != "llama.cpp"}
    decode_t: dict[str, list[float]] = {n: [] for n in decode_fns}
    order = list(prefill_t) + [n for n in decode_t if n not in prefill_t]
    for rep in range(reps):
        say(f"timing round {rep + 1}/{reps} ...")
        rot = order[rep % len(order):] + order[: rep % len(order)]
        for name in rot:
            if name in prefill_t:
                gc.collect()
                t0 = time.perf_counter()
                prefill_fns[name](bench_ids)
                prefill_t[name].append(time.perf_counter() - t0)
            if name in decode_t:
                gc.collect()
                decode_t[name].append(decode_fns[name]())
    # llama.cpp's loop and tandem's drafting loop over it are the same llama_decode, so their ratio
    # is close to 1 and a few rounds of noise decide it: more decode-only rounds, in pairs
    # alternating which goes first (each takes seconds)
    if "llama.cpp" in decode_t and "llama.cpp-draft" in decode_t:
        for rep in range(reps, max(reps, PAIRED_DECODE_ROUNDS)):
            say(f"decode round {rep + 1}/{PAIRED_DECODE_ROUNDS} (llama.cpp against the drafting loop) ...")
            for name in ("llama.cpp", "llama.cpp-draft")[:: 1 if rep % 2 else -1]:
                gc.collect()
                decode_t[name].append(decode_fns[name]())
    # time to first token of the bench prompt: its tokenisation, the prefill, the argmax
    bench_text = lm.tokenizer.decode(bench_ids)
    tokenize_s = _median([_timed(lambda: lm.tokenizer.encode(bench_text)) for _ in range(3)])
    for name, ts in prefill_t.items():
        out[name]["prefill_tok_per_s"] = round(tokens / _median(ts), 1)
        out[name]["ttft_ms"] = round((tokenize_s + _median(ts)) * 1000, 1)
    for name, ts in decode_t.items():
        out[name]["decode_tok_per_s"] = round(decode_tokens / _median(ts), 1)
    if "llama.cpp" in decode_t:
        out["llama.cpp"]["prefill_tok_per_s"] = round(_median(native_rates["prefill"]), 1)
        out["llama.cpp"]["ttft_ms"] = round((tokenize_s + tokens / out["llama.cpp"]["prefill_tok_per_s"]) * 1000, 1)

    # -- agreement with the fp32 reference ------------------------------------------------------
    say(f"agreement over {len(agree_ids)} prompts ...")
    errs: dict[str, list[float]] = {n: [] for n in prefill_fns}
    gaps: list[float] = []
    agree: dict[str, int] = {n: 0 for n in prefill_fns}
    step = max(1, len(agree_ids) // 10)
    for n_done, ids in enumerate(agree_ids):
        if n_done and n_done % step == 0:
            say(f"agreement: {n_done}/{len(agree_ids)} prompts ...")
        reference = prefill_fns[ref.name](ids).float()
        top = int(reference.argmax())
        two = reference.topk(2).values
        gaps.append(float(two[0] - two[1]))
        for name, fn in prefill_fns.items():
            logits = reference if name == ref.name else fn(ids).float()
            agree[name] += int(int(logits.argmax()) == top)
            errs[name].append(float((logits[: reference.shape[0]] - reference).abs().max()))
    for name in prefill_fns:
        out[name]["greedy_agreement"] = round(agree[name] / len(agree_ids), 4)
        out[name]["max_abs_logit_err"] = round(max(errs[name]), 4)
        out[name]["median_abs_logit_err"] = round(statistics.median(errs[name]), 4)
    if "llama.cpp-draft" in out:
        for key in ("greedy_agreement", "max_abs_logit_err", "median_abs_logit_err"):
            out["llama.cpp-draft"][key] = out["llama.cpp"][key]
        out["llama.cpp-draft"]["prefill_tok_per_s"] = out["llama.cpp"]["prefill_tok_per_s"]

    # -- summary ----------------------------------------------------------------------------------
    summary: dict[str, Any] = {}
    accel = {n: v for n, v in out.items() if n in ACCELERATED and v["greedy_agreement"] is not None}
    if accel:
        best = max(accel, key=lambda n: accel[n]["prefill_tok_per_s"])
        summary["best_prefill"] = best
        summary["prefill_vs_reference"] = round(out[best]["prefill_tok_per_s"] / out[ref.name]["prefill_tok_per_s"], 2)
        if "llama.cpp" in out:
            summary["prefill_vs_llama_cpp"] = round(out[best]["prefill_tok_per_s"] / out["llama.cpp"]["prefill_tok_per_s"], 2)
        if "llama.cpp" in out and out["llama.cpp"]["greedy_agreement"] is not None:
            # only what is at least as accurate as llama.cpp on the same weights counts
            bar = out["llama.cpp"]["greedy_agreement"]
            eligible = [n for n in accel if accel[n]["greedy_agreement"] >= bar]
            if eligible:
                fast = max(eligible, key=lambda n: accel[n]["prefill_tok_per_s"])
                summary["best_prefill_as_accurate_as_llama_cpp"] = fast
                summary["its_prefill_vs_reference"] = round(out[fast]["prefill_tok_per_s"] / out[ref.name]["prefill_tok_per_s"], 2)
                summary["its_prefill_vs_llama_cpp"] = round(out[fast]["prefill_tok_per_s"] / out["llama.cpp"]["prefill_tok_per_s"], 2)
        exact = max(accel, key=lambda n: (accel[n]["greedy_agreement"], accel[n]["prefill_tok_per_s"]))
        summary["most_accurate_prefill"] = exact
        summary["most_accurate_vs_reference"] = round(
            out[exact]["prefill_tok_per_s"] / out[ref.name]["prefill_tok_per_s"], 2
        )
    drafters = {n: v for n, v in out.items() if n != "llama.cpp" and v["decode_tok_per_s"] is not None}
    if drafters:
        best = max(drafters, key=lambda n: drafters[n]["decode_tok_per_s"])
        summary["best_drafter"] = best
        if "llama.cpp" in out:
            # paired: each round's llama.cpp time over the same round's drafter time, so load that
            # comes and goes between rounds falls on both sides of every ratio
            pairs = [n / b for n, b in zip(decode_t["llama.cpp"], decode_t[best]) if n and b]
            summary["decode_vs_llama_cpp"] = round(_median(pairs), 3)
            summary["decode_vs_llama_cpp_per_round"] = [round(x, 3) for x in pairs]
    gaps.sort()
    summary["reference_top2_gap"] = {
        f"p{q:02d}": round(gaps[min(len(gaps) - 1, len(gaps) * q // 100)], 4) for q in (1, 2, 5, 10)
    }
    return {
        "model": model,
        "tokens": tokens,
        "decode_tokens": decode_tokens,
        "prompts": len(agree_ids),
        "reps": reps,
        "threads": threads,
        "cpu_flags": cpu_flags(),
        "int8_kernel": kernel_report(*kernel_shape) if kernel_shape else None,
        "backends": out,
        "skipped": skipped,
        **summary,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


__all__ = ["bench_device"]
