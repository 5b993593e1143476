"""Plots written by the benchmarks (matplotlib, no display needed)."""

from __future__ import annotations

import copy
from pathlib import Path

from ..auto import predict_s_per_token
from ..estimates import LinkEstimate


def crossover_rtt_s(e: LinkEstimate, n_tokens: int, limit_s: float = 2.0) -> float | None:
    """The smallest RTT at which speculative stops beating cloud, by the model in sdk/auto.py
    (None if it never beats it, or still does at `limit_s`)."""
    probe = copy.copy(e)
    step = 0.001
    rtt = 0.0
    probe.rtt_s = 0.0
    if predict_s_per_token("speculative", probe, n_tokens) >= predict_s_per_token("cloud", probe, n_tokens):
        return None
    while rtt <= limit_s:
        probe.rtt_s = rtt
        if predict_s_per_token("speculative", probe, n_tokens) >= predict_s_per_token("cloud", probe, n_tokens):
            return rtt
        rtt += step
    return None


def plot_modes(table: dict[str, dict], out: str | Path) -> str:
    """Bars of measured seconds per token per mode, each beside the cost model's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in table if "predicted_s_per_token" in table[m]]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(modes))
    ax.bar([x - 0.2 for x in xs], [table[m]["s_per_token"] * 1000 for m in modes], 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [table[m]["predicted_s_per_token"] * 1000 for m in modes], 0.4, label="predicted", alpha=0.7)
    if "auto" in table:
        ax.axhline(table["auto"]["s_per_token"] * 1000, color="k", linestyle=":", label="auto (measured)")
    ax.set_xticks(list(xs), modes)
    ax.set_ylabel("ms per token")
    ax.set_title("each mode, measured and predicted by the cost model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)


def plot_rtt(results: list[dict], out: str | Path) -> dict:
    """One line per mode: measured seconds per token at each RTT (markers) and the prediction
    from the speeds measured in the first (lowest-RTT) run (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["rtt_ms"] or 0.0)
    base = LinkEstimate(**results[0]["estimates"])
    base_rtt = base.rtt_s - (results[0]["rtt_ms"] or 0.0) / 1000  # the loopback's own overhead
    n_tokens = results[0]["max_new_tokens"]
    modes = [m for m in results[0]["modes"] if m != "auto"]
    rtts = [r["rtt_ms"] or 0.0 for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    predicted: dict[str, list[float]] = {}
    grid = [x * max(rtts) / 50 for x in range(51)] if max(rtts) > 0 else [0.0]
    for i, mode in enumerate(modes):
        color = f"C{i}"
        ax.plot(rtts, [r["modes"][mode]["s_per_token"] * 1000 for r in results], "o-", color=color, label=f"{mode} (measured)")
        line = []
        kind = mode.partition("@")[0]  # assist@T: assist, escalating as often as measured at the lowest RTT
        for rtt in grid:
            e = copy.copy(base)
            e.rtt_s = max(0.0, base_rtt) + rtt / 1000
            if kind == "assist":
                e.escalate_rate = results[0]["modes"][mode]["cloud_passes_per_token"]
            line.append(predict_s_per_token(kind, e, n_tokens) * 1000)
        ax.plot(grid, line, "--", color=color, alpha=0.7, label=f"{mode} (predicted)")
        predicted[mode] = [round(v, 2) for v in line]
    ax.plot(rtts, [r["modes"]["auto"]["s_per_token"] * 1000 for r in results], "k*", markersize=10, label="auto (measured)")
    ax.set_xlabel("round-trip time (ms)")
    ax.set_ylabel("ms per token")
    ax.set_title("seconds per token against RTT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)

    measured_cross = next(
        (r["rtt_ms"] for r in results if r["modes"]["speculative"]["s_per_token"] >= r["modes"]["cloud"]["s_per_token"]),
        None,
    ) if "speculative" in modes and "cloud" in modes else None
    predicted_cross = crossover_rtt_s(base, n_tokens) if "speculative" in modes else None
    return {
        "rtt_ms": rtts,
        "measured_ms_per_token": {m: [round(r["modes"][m]["s_per_token"] * 1000, 2) for r in results] for m in [*modes, "auto"]},
        "auto_vs_best": [r["auto_vs_best"] for r in results],
        "speculative_stops_beating_cloud_at_rtt_ms": {
            "measured_first_rtt_where_cloud_wins": measured_cross,
            "predicted": None if predicted_cross is None else round(predicted_cross * 1000, 1),
        },
    }


__all__ = ["plot_modes", "plot_rtt", "crossover_rtt_s"]
