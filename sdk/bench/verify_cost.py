"""`tandem bench verify-cost`: what a verify costs a target, by block length and concurrency.

A random-initialised target of a named architecture (no weights travel) runs the gateway's own
packed multi-session forward pass (`remote_gateway.batching.forward_packed`) over sessions that
each hold a prompt's keys and values; for every number of sessions S and block length j it
times a pass that gives each session j new tokens. From the single-session curve the cost model
(costmodel.py) predicts speculative decoding's speed-up over cloud-only decoding; from the
multi-session curves, the gateway's capacity: how many sessions it serves at a per-user rate,
speculative against cloud-only.

    tandem bench verify-cost --device cuda --arch qwen2.5-7b --json
"""

from __future__ import annotations

import time
from typing import Any

from ...local_runtime.speculative import expected_tokens_per_round
from ..costmodel import Timings, best_draft_len, predict

# Qwen2.5 shapes (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
ARCHES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "tiny": (64, 128, 2, 4, 2, 320, True),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-32b": (5120, 27648, 64, 40, 8, 152064, False),
}


def random_target(arch: str, device: str, dtype: str = "bfloat16") -> Any:
    """A LoadedModel of `arch` with random weights, on `device` in `dtype`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ...local_runtime.models import LoadedModel, byte_tokenizer

    if arch not in ARCHES:
        raise ValueError(f"unknown architecture '{arch}' (known: {', '.join(ARCHES)})")
    hidden, inter, layers, heads, kv, vocab, tied = ARCHES[arch]
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA device")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype)).eval()
    return LoadedModel(name=f"random-{arch}", model=model, tokenizer=byte_tokenizer(max(vocab, 258)), source="random init")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(lm: Any, device: str, sessions: list[int], blocks: list[int], context: int = 512, reps: int = 3) -> dict:
    """times[S][j]: seconds of one packed pass giving each of S sessions j new tokens, each session
    already holding `context` tokens (median of `reps`)."""
    import statistics

    import torch

    from ...remote_gateway.batching import SessionEngine, forward_packed, install

    if not install(lm.model):
        raise ValueError("this model's attention cannot be packed across sessions")
    vocab = lm.vocab_size
    gen = torch.Generator().manual_seed(1)
    engines = [SessionEngine(lm) for _ in range(max(sessions))]
    for e in engines:
        e.append(torch.randint(0, vocab, (context,), generator=gen).tolist())
        e.fill_cache(context)
    times: dict[int, dict[int, float]] = {}
    with torch.inference_mode():
        for s in sessions:
            times[s] = {}
            for j in blocks:
                runs = []
                for _ in range(reps + 1):  # the first warms up
                    for e in engines[:s]:
                        e.append(torch.randint(0, vocab, (j,), generator=gen).tolist())
                    _sync(device)
                    t0 = time.perf_counter()
                    forward_packed(lm.model, engines[:s]) if s > 1 else engines[0].compute()
                    _sync(device)
                    runs.append(time.perf_counter() - t0)
                    for e in engines[:s]:
                        e.truncate(context)
                times[s][j] = statistics.median(runs[1:])
    return times


def capacity(times: dict[int, dict[int, float]], *, alpha: float, k: int, draft_s: float, rtt_s: float, rate: float) -> dict:
    """Sessions served with every user getting at least `rate` tokens/s: cloud-only (one token a
    session a pass) against speculative (a round of k drafts a session a pass, E(alpha, k) tokens;
    the devices draft in parallel with each other)."""
    e = expected_tokens_per_round(alpha, k)
    best = {"cloud": 0, "speculative": 0}
    for s, row in sorted(times.items()):
        if 1 / row[1] >= rate:
            best["cloud"] = s
        verify = row.get(k + 1) or row[max(row)]
        if e / (verify + rtt_s + k * draft_s) >= rate:
            best["speculative"] = s
    return best


def bench_verify_cost(*, arch: str, device: str = "cuda", dtype: str = "bfloat16", sessions: list[int] | None = None,
                      blocks: list[int] | None = None, context: int = 512, alpha: float = 0.79, draft_s: float = 0.043,
                      rtts_ms: tuple[float, ...] = (5.0, 50.0, 150.0), rate: float = 20.0, progress=None) -> dict:
    """Measure, then predict (alpha, draft_s: the device side, e.g. Qwen2.5-Coder 0.5B on one CPU
    core with llama.cpp; they are inputs, not measured here)."""
    sessions = sessions or [1, 2, 4, 8, 16, 32, 64]
    blocks = blocks or list(range(1, 17))
    t0 = time.perf_counter()
    lm = random_target(arch, device, dtype)
    load_s = time.perf_counter() - t0
    if progress:
        progress(f"{lm.name} on {device} ({dtype}) built in {load_s:.1f} s; timing {len(sessions)} x {len(blocks)} passes")
    times = measure(lm, device, sessions, blocks, context)
    single = times[min(times)]
    out: dict[str, Any] = {"arch": arch, "device": device, "dtype": dtype, "context": context, "build_s": round(load_s, 1),
                           "step_ms": round(single[1] * 1000, 2),
                           "verify_ms": {s: {j: round(v * 1000, 2) for j, v in row.items()} for s, row in times.items()},
                           "alpha": alpha, "draft_ms": draft_s * 1000, "predicted": {}}
    verify_curve = tuple(single[j] for j in sorted(single))
    for rtt_ms in rtts_ms:
        t = Timings(draft_s=draft_s, step_s=single[1], verify_s=verify_curve, rtt_s=rtt_ms / 1000)
        row = {}
        for pipeline in (False, True):
            k = best_draft_len(t, alpha, pipeline, k_max=max(blocks) - 1)
            cloud = predict("cloud", t, alpha).s_per_token
            spec = predict("speculative", t, alpha, k=k, pipeline=pipeline)
            row["pipelined" if pipeline else "sequential"] = {
                "k": k, "speedup_vs_cloud": round(cloud / spec.s_per_token, 3),
                "capacity_at_%g_tok_s" % rate: capacity(times, alpha=alpha, k=k, draft_s=0.0 if pipeline else draft_s,
                                                        rtt_s=rtt_ms / 1000, rate=rate),
            }
        out["predicted"][f"rtt_{rtt_ms:g}ms"] = row
    return out


__all__ = ["ARCHES", "bench_verify_cost", "measure", "capacity", "random_target"]
