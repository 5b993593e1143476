"""`tandem bench structured`: speculative decoding under a JSON Schema, against cloud mode under
the same schema and against the same prompts without it, in one run.

For each {"prompt", "schema"} line: cloud mode with the schema (the reference), speculative with
it, and speculative without it. `valid` counts speculative outputs that parse and validate
(jsonschema, independent of the grammar that produced them); `mismatches` those that differ, token
for token, from cloud mode under the same grammar; `forced_share` is the share of the output's
tokens that the grammar forced (drafted without the model, always accepted). tokens_per_round
(constrained) over tokens_per_round_unconstrained is what the grammar gives speculation.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..client import Client
from .speculative import gateway_link, machine, placed, timed

DEFAULT_SCHEMAS = Path(__file__).with_name("data") / "schemas.jsonl"


def load_schemas(path: str | Path | None, limit: int | None = None) -> list[dict]:
    """The JSONL file's {"prompt", "schema"} lines (the bundled sample without a path)."""
    path = Path(path) if path else DEFAULT_SCHEMAS
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{i}: not JSON ({exc})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not isinstance(item.get("schema"), dict):
            raise ValueError(f"{path}:{i}: a line is {{\"prompt\": ..., \"schema\": {{...}}}}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no schemas")
    return items[:limit] if limit else items


def _valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def _run(drafter: str, target: str, url: str, items: list[dict], max_new_tokens: int, draft_len, progress) -> dict:
    client = Client(drafter=drafter, target=target if url == "inproc" else None, gateway=url, draft_len=draft_len)
    sums = {k: 0.0 for k in ("cloud_s", "cloud_tokens", "spec_s", "spec_tokens", "free_s", "free_tokens")}
    rounds = {"constrained": [0, 0], "unconstrained": [0, 0]}  # [tokens, rounds]
    valid = mismatches = forced = accepted = tested = 0
    examples = []
    try:
        _ = client.drafter, client.transport
        served = await client.transport.info()
        await timed(client, items[0]["prompt"], "speculative", 4)  # warm both sides (grammar tokenizers included)
        for i, item in enumerate(items):
            prompt, schema = item["prompt"], item["schema"]
            cloud, ct = await timed(client, prompt, "cloud", max_new_tokens, response_format=schema)
            spec, st = await timed(client, prompt, "speculative", max_new_tokens, response_format=schema)
            free, ft = await timed(client, prompt, "speculative", max_new_tokens)
            for key, t in (("cloud", ct), ("spec", st), ("free", ft)):
                sums[f"{key}_s"] += t["s"]
                sums[f"{key}_tokens"] += t["tokens"]
            ok = _valid(spec.text, schema)
            valid += ok
            if spec.tokens != cloud.tokens:
                mismatches += 1
                examples.append({"prompt": prompt[:80], "cloud": cloud.text[:200], "speculative": spec.text[:200]})
            forced += spec.usage.forced_tokens
            accepted += spec.usage.accepted_tokens
            tested += spec.usage.tested_tokens
            for name, rec in (("constrained", spec), ("unconstrained", free)):
                rounds[name][0] += sum(r.emitted for r in rec.rounds)
                rounds[name][1] += len(rec.rounds)
            if progress:
                progress(i + 1, len(items), spec, ok)
    finally:
        await client.aclose()

    def per_round(name: str) -> float:
        tokens, n = rounds[name]
        return round(tokens / max(1, n), 3)

    spt = {k: sums[f"{k}_s"] / max(1, sums[f"{k}_tokens"]) for k in ("cloud", "spec", "free")}
    out = {
        "n": len(items), "valid": valid, "mismatches": mismatches,
        "tokens_per_round": per_round("constrained"), "tokens_per_round_unconstrained": per_round("unconstrained"),
        "tokens_per_round_ratio": round(per_round("constrained") / max(1e-9, per_round("unconstrained")), 3),
        "forced_share": round(forced / max(1, sums["spec_tokens"]), 3),
        "acceptance_rate": round(accepted / max(1, tested), 3),
        "speedup_vs_cloud": round(spt["cloud"] / spt["spec"], 3) if spt["spec"] else None,
        "unconstrained_speedup_vs_cloud": round(spt["cloud"] / spt["free"], 3) if spt["free"] else None,
        "s_per_token": {"cloud": round(spt["cloud"], 5), "speculative": round(spt["spec"], 5),
                        "speculative_unconstrained": round(spt["free"], 5)},
        "drafter": drafter, "target": target, "target_served": served.model, "target_choice": served.target,
        "max_new_tokens": max_new_tokens, "draft_len": draft_len,
    }
    if examples:
        out["mismatch_examples"] = examples[:3]
    return out


async def bench_structured(*, drafter: str, target: str, items: list[dict], max_new_tokens: int = 128, draft_len=6,
                           rtt_ms: float | None = None, split: bool = False, progress=None) -> dict:
    with placed(split) as (device_cores, gateway_cores):
        with gateway_link(target, "inproc", rtt_ms, gateway_cores) as url:
            out = await _run(drafter, target, url, items, max_new_tokens, draft_len, progress)
        out.update(machine(device_cores, gateway_cores))
    out["rtt_ms"] = rtt_ms
    return out


__all__ = ["bench_structured", "load_schemas", "DEFAULT_SCHEMAS"]
