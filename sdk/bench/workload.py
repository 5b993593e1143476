"""What `bench simulate` serves: devices arriving (a Poisson rate or a trace), each with a device
class (its drafter's step time), a round-trip time and an acceptance rate.

    arrivals       a Poisson process over `duration_s`, prompt and answer lengths lognormal; or a
                   trace file: CSV with a header naming a timestamp, the prompt tokens and the
                   answer tokens (BurstGPT's `Timestamp, Request tokens, Response tokens`, Azure's
                   `TIMESTAMP, ContextTokens, GeneratedTokens`, or our own names), or JSONL with
                   `timestamp`, `prompt_tokens`, `answer_tokens`
    device classes `NAME:SHARE:DRAFT_MS[:ALPHA]`, e.g. `phone:0.7:45:0.7,laptop:0.3:20:0.75`
    rtt            `20` (fixed, ms), `lognormal:MEDIAN_MS:SIGMA`, or `file:PATH` (one value in ms a
                   line, drawn from at random)

Everything is drawn from one seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

SAMPLE_TRACE = Path(__file__).with_name("data") / "sample_trace.csv"

# column names accepted for each field, lower-cased (BurstGPT, Azure LLM inference traces, ours)
_COLUMNS = {
    "timestamp": ("timestamp", "time", "arrival_s"),
    "prompt_tokens": ("prompt_tokens", "request tokens", "contexttokens", "input_tokens"),
    "answer_tokens": ("answer_tokens", "response tokens", "generatedtokens", "output_tokens"),
}


@dataclass(frozen=True)
class DeviceClass:
    name: str
    share: float
    draft_s: float  # the drafter's time per token on this device
    alpha: float  # acceptance of its drafts by the target


@dataclass
class Arrivals:
    """One row per device request, sorted by time (seconds from the start)."""

    t: np.ndarray
    prompt_tokens: np.ndarray
    answer_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.t)


def poisson(n: int, duration_s: float, rng: np.random.Generator, *, prompt_median: float = 200,
            answer_median: float = 150, sigma: float = 0.8, max_tokens: int = 4096) -> Arrivals:
    """`n` requests at a constant rate over `duration_s` (exponential gaps)."""
    gaps = rng.exponential(duration_s / max(n, 1), n)
    lengths = lambda median: np.clip(rng.lognormal(np.log(median), sigma, n), 1, max_tokens).astype(np.int64)  # noqa: E731
    return Arrivals(np.cumsum(gaps), lengths(prompt_median), lengths(answer_median))


def _stamp(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.strip()).timestamp()


def load_trace(path: str | Path, limit: int | None = None) -> Arrivals:
    """A trace file (see the module docstring); times are shifted to start at 0."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trace file not found: {p}")
    rows: list[tuple[float, int, int]] = []
    if p.suffix == ".jsonl":
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    rows.append((_stamp(str(r["timestamp"])), int(r["prompt_tokens"]), int(r["answer_tokens"])))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{p}:{lineno}: expected timestamp, prompt_tokens, answer_tokens: {exc}") from exc
    else:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            names = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            cols = {}
            for want, options in _COLUMNS.items():
                found = next((names[o] for o in options if o in names), None)
                if found is None:
                    raise ValueError(f"{p}: no column for {want} (one of: {', '.join(options)}); columns: {', '.join(names)}")
                cols[want] = found
            for lineno, r in enumerate(reader, 2):
                try:
                    rows.append((_stamp(r[cols["timestamp"]]), int(float(r[cols["prompt_tokens"]])),
                                 int(float(r[cols["answer_tokens"]]))))
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{p}:{lineno}: {exc}") from exc
    rows = [r for r in rows if r[2] > 0][:limit]
    if not rows:
        raise ValueError(f"{p}: no requests with answer tokens")
    rows.sort()
    t = np.array([r[0] for r in rows], dtype=float)
    return Arrivals(t - t[0], np.array([max(1, r[1]) for r in rows]), np.array([r[2] for r in rows]))


def parse_classes(text: str, default_alpha: float) -> list[DeviceClass]:
    """`NAME:SHARE:DRAFT_MS[:ALPHA],...`; shares are normalised to sum to 1."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"device class '{item}': expected NAME:SHARE:DRAFT_MS[:ALPHA]")
        try:
            share, draft_ms = float(parts[1]), float(parts[2])
            alpha = float(parts[3]) if len(parts) == 4 else default_alpha
        except ValueError:
            raise ValueError(f"device class '{item}': SHARE, DRAFT_MS and ALPHA are numbers") from None
        if share <= 0 or draft_ms < 0 or not 0 <= alpha < 1:
            raise ValueError(f"device class '{item}': SHARE > 0, DRAFT_MS >= 0, 0 <= ALPHA < 1")
        out.append(DeviceClass(parts[0], share, draft_ms / 1000, alpha))
    if not out:
        raise ValueError("no device classes")
    total = sum(c.share for c in out)
    return [DeviceClass(c.name, c.share / total, c.draft_s, c.alpha) for c in out]


def rtt_sampler(spec: str):
    """A function (rng, n) -> n round-trip times in seconds, from `spec` (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    try:
        if not rest:
            fixed = float(kind) / 1000
            return lambda rng, n: np.full(n, fixed)
        if kind == "lognormal":
            median, sigma = (float(x) for x in rest.split(":"))
            return lambda rng, n: rng.lognormal(np.log(median / 1000), sigma, n)
        if kind == "file":
            values = np.array([float(x) for x in Path(rest).read_text().split()]) / 1000
            if not len(values):
                raise ValueError("empty")
            return lambda rng, n: rng.choice(values, n)
    except (ValueError, OSError) as exc:
        raise ValueError(f"--rtt '{spec}': {exc}") from exc
    raise ValueError(f"--rtt '{spec}': a number (ms), lognormal:MEDIAN_MS:SIGMA or file:PATH")


__all__ = ["Arrivals", "DeviceClass", "poisson", "load_trace", "parse_classes", "rtt_sampler", "SAMPLE_TRACE"]
