"""Time to first token for a long prompt (`tandem bench ttft`): cloud, speculative and local
against the same gateway, beside llama.cpp's own batched prefill of the same prompt for the
target and for the device model, in one run.

    prompt          Spec-Bench turns joined until the tokenizer counts `--prompt-tokens`, cut
                    there (raw text, no chat template, so the count is the prompt's)
    <mode>_ttft_ms  the request sent to the first piece of text on the device (the median over
                    `reps` runs), through the link simulator when `--rtt-ms` is given
    *_llama_cpp_prefill_ms
                    `Llama.eval` of those tokens on a fresh context (n_batch 512), what
                    llama-server's prompt processing costs: the target's on the gateway's cores
                    once the gateway has stopped, the drafter's on the device's
    mismatches      runs whose speculative tokens differ from cloud mode's (greedy: none may)
    gateway_load_s  the gateway's cold start (process start to ready, as `/v1/info` reports it)
    device_load_s   the device model's load on the device, its backend's set-up included

Speculative TTFT is max(device prefill, cloud prefill + RTT): the device drafts its first block
only once its own prompt is in, and the gateway verifies it once its prompt is in.
"""

from __future__ import annotations

import asyncio
import statistics

from ...local_runtime.backends import gguf_path, split_backend
from ...local_runtime.models import load_tokenizer
from ..client import Client
from .baseline import on_cores
from .speculative import gateway_link, machine, placed

MODES = ("cloud", "speculative", "local")


def long_prompt(tokenizer, texts: list[str], n_tokens: int) -> tuple[str, int]:
    """Texts joined (blank lines between) and cut at `n_tokens` tokens: (text, its token count)."""
    if not texts:
        raise ValueError("no prompt texts to build a long prompt from")
    joined = ""
    while len(tokenizer.encode(joined)) < n_tokens:
        joined += ("\n\n" if joined else "") + "\n\n".join(texts)
    text = tokenizer.decode(tokenizer.encode(joined)[:n_tokens])
    return text, len(tokenizer.encode(text))


def llama_cpp_prefill_ms(name: str, text: str, cores: set[int] | None, reps: int) -> float:
    """llama.cpp's own batched prefill of `text` (raw tokens) on `cores`: the fastest of `reps`."""
    from ...local_runtime.backends.llamacpp import LlamaCppModel, native_generate_rate

    model, _ = split_backend(name)
    model = model.partition(":")[0]  # the GGUF the target's variant was made from
    tok = load_tokenizer(model, progress=False)
    ids = tok.encode(text)
    with on_cores(cores):
        llm = LlamaCppModel(model, gguf_path(model, progress=False), tok, n_threads=len(cores) if cores else None,
                            n_batch=512, n_ctx=max(1024, len(ids) + 64))
        try:
            rates = [native_generate_rate(llm, ids, 1)[0] for _ in range(reps)]
        finally:
            llm.close()
    return len(ids) / max(rates) * 1000


async def _modes(drafter: str, target: str, url: str, texts: list[str], prompt_tokens: int, reps: int,
                 max_new_tokens: int, progress) -> dict:
    ttft: dict[str, list[float]] = {m: [] for m in MODES}
    mismatches = 0
    async with Client(drafter=drafter, target=target if url == "inproc" else None, gateway=url, progress=False) as client:
        text, n = long_prompt(client.drafter.tokenizer, texts, prompt_tokens)
        info = await client.transport.info()
        await client.generate("Hello", max_new_tokens=2, chat=False, mode="speculative")  # both sides warm
        for rep in range(reps):
            tokens = {}
            for mode in MODES:
                rec = await client.generate(text, max_new_tokens=max_new_tokens, chat=False, mode=mode)
                ttft[mode].append(rec.ttft_ms)
                tokens[mode] = rec.tokens
                if progress:
                    progress(f"[{rep + 1}/{reps}] {mode}: first token after {rec.ttft_ms:,.0f} ms")
            mismatches += tokens["speculative"] != tokens["cloud"]
    load_s = client.drafter_load_s
    return {"served": info.model, "gateway_load_s": info.load_s, "device_load_s": round(load_s, 2) if load_s is not None else None,
            "text": text, "prompt_tokens": n, "mismatches": mismatches, "ttft": {m: statistics.median(v) for m, v in ttft.items()}}


def bench_ttft(*, drafter: str, target: str, texts: list[str], prompt_tokens: int, split: bool = True,
               rtt_ms: float | None = None, reps: int = 2, max_new_tokens: int = 4, progress=None) -> dict:
    with placed(split) as (device_cores, gateway_cores):
        with gateway_link(target, "inproc", rtt_ms, gateway_cores) as url:
            run = asyncio.run(_modes(drafter, target, url, texts, prompt_tokens, reps, max_new_tokens, progress))
        text, n = run["text"], run["prompt_tokens"]
        if progress:
            progress("llama.cpp's own prefill of the prompt, the target on the gateway's cores, the drafter on the device's ...")
        target_ms = llama_cpp_prefill_ms(run["served"], text, gateway_cores, reps)
        device_ms = llama_cpp_prefill_ms(drafter, text, device_cores, reps)
        out = machine(device_cores, gateway_cores)
    t = run["ttft"]
    return {
        "drafter": drafter, "target": target, "target_served": run["served"], "prompt_tokens": n, "reps": reps,
        "rtt_ms": rtt_ms, **{f"{m}_ttft_ms": round(t[m], 1) for m in MODES},
        "target_llama_cpp_prefill_ms": round(target_ms, 1), "device_llama_cpp_prefill_ms": round(device_ms, 1),
        "cloud_over_target_prefill": round(t["cloud"] / target_ms, 3),
        "local_over_device_prefill": round(t["local"] / device_ms, 3),
        "speculative_over_cloud": round(t["speculative"] / t["cloud"], 3),
        "gateway_load_s": run["gateway_load_s"], "device_load_s": run["device_load_s"],
        "mismatches": run["mismatches"], **out,
    }


__all__ = ["bench_ttft", "long_prompt", "llama_cpp_prefill_ms"]
