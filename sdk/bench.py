"""Benchmarks behind `tandem bench ...`: every comparison is measured side by side in one run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..local_runtime.speculative import expected_tokens_per_round
from .client import Client

# Where the Spec-Bench prompts live when the repository sits beside `shared/`.
DEFAULT_PROMPTS = Path("../shared/data/specbench/question.jsonl")

# Used when no prompt file is given and none is found: one per Spec-Bench category.
BUILTIN_PROMPTS = [
    "Translate German to English: Das Wetter ist heute schön, und wir gehen in den Park.",
    "Summarize in two sentences: The city council met on Tuesday to discuss the new park. "
    "Residents spoke for and against the plan, which would replace a parking lot with trees and benches.",
    "What is the capital of Australia, and why was it chosen?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a short poem about the sea.",
    "Explain how a hash table works.",
]


def load_prompts(path: str | Path | None, limit: int | None) -> list[str]:
    """First user turns of a Spec-Bench style JSONL file, spread evenly over the file (so a
    small limit still samples every category)."""
    if path is None and DEFAULT_PROMPTS.exists():
        path = DEFAULT_PROMPTS
    if path is None:
        prompts = list(BUILTIN_PROMPTS)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"prompt file not found: {p}")
        prompts = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row["turns"][0] if "turns" in row else row["prompt"])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"{p}:{lineno}: expected a JSON object with 'turns' (or 'prompt'): {exc}") from exc
    if limit is not None and 0 < limit < len(prompts):
        step = len(prompts) / limit
        prompts = [prompts[int(i * step)] for i in range(limit)]
    return prompts


async def bench_speculative(
    *,
    drafter: str,
    target: str,
    prompts: list[str],
    max_new_tokens: int = 64,
    draft_len: int = 4,
    gateway: str = "inproc",
    progress=None,
) -> dict:
    """Target alone (cloud), drafter alone (local) and speculative, per prompt, in one run.

    mismatches counts prompts whose speculative greedy output differs from the target's own.
    acceptance_rate is accepted / tested over the draft tokens the target judged;
    theory_tokens_per_round averages (1 - a^(k+1)) / (1 - a) over the rounds, with each round's k.
    """
    client = Client(drafter=drafter, target=target, gateway=gateway, draft_len=draft_len)
    totals = {m: {"s": 0.0, "tokens": 0} for m in ("cloud", "local", "speculative")}
    mismatches, rounds, examples = 0, [], []
    accepted = tested = 0
    try:
        # load both models before timing anything
        _ = client.drafter, client.transport
        for i, prompt in enumerate(prompts):
            runs = {}
            for mode in ("cloud", "local", "speculative"):
                t0 = time.perf_counter()
                runs[mode] = await client.generate(prompt, mode=mode, max_new_tokens=max_new_tokens)
                totals[mode]["s"] += time.perf_counter() - t0
                totals[mode]["tokens"] += len(runs[mode].tokens)
            spec, ref = runs["speculative"], runs["cloud"]
            if spec.tokens != ref.tokens:
                mismatches += 1
                examples.append({"prompt": prompt[:80], "target": ref.text[:200], "speculative": spec.text[:200]})
            rounds.extend(spec.rounds)
            accepted += spec.usage.accepted_tokens
            tested += spec.usage.tested_tokens
            if progress:
                progress(i + 1, len(prompts), spec)
    finally:
        await client.aclose()

    alpha = accepted / tested if tested else 0.0
    spt = {m: v["s"] / max(1, v["tokens"]) for m, v in totals.items()}
    emitted = sum(r.emitted for r in rounds)
    out = {
        "prompts": len(prompts),
        "mismatches": mismatches,
        "acceptance_rate": round(alpha, 4),
        "tokens_per_round": round(emitted / max(1, len(rounds)), 4),
        "theory_tokens_per_round": round(
            sum(expected_tokens_per_round(alpha, r.k) for r in rounds) / max(1, len(rounds)), 4
        ),
        "cloud_passes_per_token": round(len(rounds) / max(1, emitted), 4),
        "speedup_vs_cloud": round(spt["cloud"] / spt["speculative"], 3),
        "speedup_vs_local": round(spt["local"] / spt["speculative"], 3),
        "s_per_token": {m: round(v, 5) for m, v in spt.items()},
        "drafter": drafter,
        "target": target,
        "draft_len": draft_len,
        "max_new_tokens": max_new_tokens,
        "rounds": len(rounds),
        "tokens": emitted,
    }
    if client._owned_gateway is not None:
        out["tie_recomputes"] = client._owned_gateway.stats.get("tie_recomputes", 0)
    if examples:
        out["mismatch_examples"] = examples[:3]
    return out


__all__ = ["bench_speculative", "load_prompts", "BUILTIN_PROMPTS"]
