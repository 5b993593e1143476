"""Capacity planning on the simulation (simulate.py): check it against a measured `bench
capacity` run, then size a fleet.

    validate(capacity_json)     the capacity bench's own setup replayed (N devices at once on one
                                replica, its prompts, its acceptance, no RTT, drafts free): the
                                predicted over measured tokens/s and ITL p99 at every point
    plan(...)                   devices from a Poisson rate or a trace, per mode (cloud, hybrid,
                                routed): the fleet's TTFT/ITL/throughput/rejections at R replicas,
                                or with `find` the fewest replicas holding the ITL SLO
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..costmodel import PassCosts
from .simulate import (
    MODES,
    GatewayRules,
    Requests,
    alpha_for,
    fewest_replicas,
    requests,
    simulate,
    simulate_replica,
    summary,
)
from .workload import Arrivals, DeviceClass, rtt_sampler

DEFAULT_CURVES = Path(__file__).with_name("data") / "capacity_curves.json"
SAMPLE = 16  # a fleet's figures come from its busiest replica and 15 others drawn at random
DEFAULT_CLASSES = "phone:0.7:45,laptop:0.3:22"  # ms per drafted token: one laptop core (llama.cpp, 0.5B); a phone at half that


def load_curves(path: str | Path | None) -> dict:
    """A `bench capacity --json` output (its pass costs, draft length, points)."""
    p = Path(path) if path else DEFAULT_CURVES
    if not p.exists():
        raise FileNotFoundError(f"curves file not found: {p} (write one with `tandem bench capacity --json`)")
    try:
        data = json.loads(p.read_text())
        PassCosts.from_dict(data["pass_costs"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{p}: not a `bench capacity --json` output ({exc})") from exc
    data["source"] = str(p)
    return data


def measured_alpha(curves: dict) -> float | None:
    """The acceptance behind the capacity run's speculative points (their tokens per round)."""
    tpr = [pt["tokens_per_round"] for pt in curves.get("points", []) if pt.get("mode") == "speculative"]
    return alpha_for(float(np.mean(tpr)), int(curves["draft_len"])) if tpr else None


def validate(curves: dict) -> dict:
    costs, k = PassCosts.from_dict(curves["pass_costs"]), int(curves["draft_len"])
    prompts = curves.get("prompt_tokens")
    if not prompts:
        raise ValueError(f"{curves['source']}: no prompt_tokens (written by an older `bench capacity`; run it again)")
    rows, ratios_tps, ratios_itl = [], [], []
    for pt in curves["points"]:
        n, hybrid = pt["devices"], pt["mode"] == "speculative"
        alpha = alpha_for(pt["tokens_per_round"], k) if hybrid else 0.0
        req = Requests(t=np.zeros(n), gate=np.zeros(n), prompt=np.array([prompts[i % len(prompts)] for i in range(n)]),
                       answer=np.full(n, curves["max_new_tokens"]), hybrid=np.full(n, hybrid), alpha=np.full(n, alpha),
                       draft_s=np.zeros(n), rtt=np.zeros(n))
        rules = GatewayRules.of(max_sessions=max(64, 2 * n))
        st = simulate_replica(req, costs, rules, k, np.random.default_rng(n))
        tps = st.n["tokens"] / st.end_s
        itl = st.itl.quantile(0.99) * 1000
        r_tps, r_itl = tps / pt["tokens_per_s"], itl / pt["itl_p99_ms"]
        ratios_tps.append(r_tps)
        ratios_itl.append(r_itl)
        rows.append({"mode": pt["mode"], "devices": n, "measured_tokens_per_s": pt["tokens_per_s"],
                     "predicted_tokens_per_s": round(tps, 3), "tokens_per_s_ratio": round(r_tps, 3),
                     "measured_itl_p99_ms": pt["itl_p99_ms"], "predicted_itl_p99_ms": round(itl, 2),
                     "itl_p99_ratio": round(r_itl, 3)})
    return {"curves": curves["source"], "target": curves.get("target"), "cpu_flags": curves.get("cpu_flags"),
            "points": rows,
            "tokens_per_s_ratio_range": [round(min(ratios_tps), 3), round(max(ratios_tps), 3)],
            "itl_p99_ratio_range": [round(min(ratios_itl), 3), round(max(ratios_itl), 3)],
            "within_15_percent": all(0.85 <= r <= 1.15 for r in ratios_tps + ratios_itl)}


def plan(arr: Arrivals, curves: dict, *, classes: list[DeviceClass], rtt: str, cloud_share: float, replicas: int | None,
         find: bool, itl_slo_ms: float | None, rules: GatewayRules, draft_len: int | None = None, seed: int = 0,
         slo_metric: str = "itl", modes: tuple[str, ...] = MODES, progress=None) -> dict:
    say = progress or (lambda m: None)
    costs = PassCosts.from_dict(curves["pass_costs"])
    k = int(draft_len or curves["draft_len"])
    slo_s = itl_slo_ms / 1000 if itl_slo_ms else 1.5 * costs.cloud(1)[1]
    rtt_of = rtt_sampler(rtt)
    span = float(arr.t[-1]) if len(arr) else 0.0
    out: dict = {"devices": len(arr), "span_s": round(span, 1), "curves": curves["source"], "target": curves.get("target"),
                 "curves_cpu_flags": curves.get("cpu_flags"), "draft_len": k, "rtt": rtt, "cloud_share": cloud_share,
                 "classes": [c.__dict__ for c in classes], "itl_slo_ms": round(slo_s * 1000, 2), "slo_metric": slo_metric,
                 "rules": {"max_sessions": rules.limits.max_sessions, "kv_budget_mb": rules.limits.kv_cache_budget_mb,
                           "prefill_chunk_tokens": rules.limits.prefill_chunk_tokens, "max_batch": rules.batching.max_batch,
                           "max_batch_tokens": rules.batching.max_batch_tokens},
                 "modes": {}}
    t_start = time.perf_counter()
    for mode in modes:
        t0 = time.perf_counter()
        req, local = requests(arr, mode, classes, rtt_of, cloud_share, np.random.default_rng(seed))
        fleet = None
        if find:
            r, fleet = fewest_replicas(req, local, costs, rules, k, slo_s, seed=seed, metric=slo_metric, sample=SAMPLE)
        else:
            r = replicas
        entry: dict = {"replicas": r}
        if r is None:
            entry["why"] = "no replica count up to 4096 holds the SLO: a single device's ITL is above it on these curves"
        else:
            if fleet is None:
                fleet = simulate(req, local, max(r, 1), costs, rules, k, seed, sample=SAMPLE)[0]
            entry.update(summary(fleet, max(fleet.end_s, span)))
            entry["simulated_replicas"] = min(max(r, 1), SAMPLE)
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        say(f"{mode}: {r} replica(s) ({entry['wall_s']} s)")
        out["modes"][mode] = entry
    rep = {m: out["modes"][m]["replicas"] for m in out["modes"]}
    out["replicas"] = rep
    out["replicas_ratio"] = round(rep["cloud"] / rep["hybrid"], 3) if rep.get("cloud") and rep.get("hybrid") else None
    out["wall_s"] = round(time.perf_counter() - t_start, 2)
    return out


__all__ = ["validate", "plan", "load_curves", "measured_alpha", "DEFAULT_CURVES", "DEFAULT_CLASSES"]
