"""One cost model: seconds per token and cloud passes per token of each mode, from measured times.

Inputs (seconds) come from calibration passes of their own (`sdk/bench/calibrate.py`), or from a
client's live link estimate (`auto`); the acceptance rate alpha belongs to the pair and the
prompts, not to the speed, so it is the one input read from a run.

    draft_s         the device's time per drafted token (one drafter step)
    step_s          the gateway's time per token when it decodes alone (cloud mode)
    verify_s(j)     the gateway's time to verify a block of j tokens (the last committed token
                    and j - 1 drafts): measured for j = 1..J, linear beyond. Flat in j when the
                    target is memory-bound (a GPU, bf16 on a CPU with AVX512-BF16), ~j steps when
                    it is compute-bound (a quantised model on one CPU core)
    rtt_s           the network round trip; prefill_s the gateway's prefill of a prompt

Per mode, over a generation of n tokens (E(a, k) = (1 - a^(k+1)) / (1 - a) tokens per round):

    local        draft_s                                                  passes/token 0
    cloud        step_s + (rtt + prefill) / n                             1
    speculative  R(k) / E(a, k) + (rtt + prefill) / n                     1 / E(a, k)
                   R(k) = k draft_s + verify_s(k + 1) + rtt               (no pipelining)
                   R(k) = verify_s(k + 1) + rtt + (k - s m) draft_s       (pipelining: while the
                          verify is in flight the device drafts on as if all k were accepted;
                          that block survives with s = a^(k+1), when all k drafts and its guess
                          at the bonus token are right, and saves drafting m = min(k, W/draft_s - 1)
                          tokens of the next round, W = verify_s(k + 1) + rtt)
    assist       draft_s + p (rtt + step_s) + (rtt + prefill) / n         p (escalated share)

k is the draft length the run uses, or (None) the best one for these times:
argmin_k R(k) / E(a, k), 1 <= k <= k_max.

The ceiling of speculation at acceptance a: min_k (verify_s(k + 1) + rtt) / E(a, k), what a chain
drafter would reach if drafting were free (hidden behind every verify and never thrown away).
No pipelining scheme can beat it at that acceptance and that verify curve; only a flatter curve
(a memory-bound target) or a better-matched drafter moves it.

Batches (`PassCosts`, what `bench capacity` times and `bench simulate` runs on): one packed pass
costs pass_s(R) for R rows over all its sessions, and each request adds the gateway's handling
outside the pass. N devices stepped together then see, per cycle,
    cloud        pass_s(N) + N stream_overhead              N tokens
    speculative  pass_s(N (k + 1)) + N verify_overhead      N E(a, k) tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..local_runtime.speculative import expected_tokens_per_round

if TYPE_CHECKING:
    import numpy as np

MODES = ("local", "cloud", "speculative", "assist")


@dataclass(frozen=True)
class Timings:
    draft_s: float
    step_s: float
    verify_s: tuple[float, ...]  # verify_s[j - 1]: a block of j tokens
    rtt_s: float = 0.0
    prefill_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.verify_s:
            raise ValueError("verify_s needs the time of at least a block of one token")

    def verify(self, tokens: int) -> float:
        """The time to verify a block of `tokens`: measured, or extended linearly from the last
        two measured lengths (flat if only one was measured)."""
        v = self.verify_s
        if tokens <= len(v):
            return v[max(tokens, 1) - 1]
        slope = v[-1] - v[-2] if len(v) >= 2 else 0.0
        return v[-1] + max(slope, 0.0) * (tokens - len(v))


@dataclass(frozen=True)
class Prediction:
    s_per_token: float
    cloud_passes_per_token: float
    k: int | None = None
    tokens_per_round: float | None = None
    round_s: float | None = None
    details: dict = field(default_factory=dict)


def round_seconds(t: Timings, alpha: float, k: int, pipeline: bool) -> float:
    """R(k): the expected time of one speculative round of k drafts (see the module docstring)."""
    wait = t.verify(k + 1) + t.rtt_s
    if not pipeline:
        return k * t.draft_s + wait
    ahead = min(k, max(0, int(wait / t.draft_s) - 1)) if t.draft_s > 0 else k
    return wait + (k - alpha ** (k + 1) * ahead) * t.draft_s


def best_draft_len(t: Timings, alpha: float, pipeline: bool, k_max: int = 16) -> int:
    """argmin_k R(k) / E(alpha, k) over 1..k_max (ties to the shorter draft)."""
    return min(range(1, k_max + 1), key=lambda k: (round_seconds(t, alpha, k, pipeline) / expected_tokens_per_round(alpha, k), k))


def ceiling_s_per_token(t: Timings, alpha: float, k_max: int = 16) -> tuple[float, int]:
    """(seconds per token, k) of speculation with free drafting: min_k (verify_s(k+1) + rtt) / E."""
    k = min(range(1, k_max + 1), key=lambda j: ((t.verify(j + 1) + t.rtt_s) / expected_tokens_per_round(alpha, j), j))
    return (t.verify(k + 1) + t.rtt_s) / expected_tokens_per_round(alpha, k), k


def predict(
    mode: str,
    t: Timings,
    alpha: float,
    *,
    k: int | None = None,
    pipeline: bool = False,
    n_tokens: int = 128,
    escalate_rate: float = 0.2,
    k_max: int = 16,
) -> Prediction:
    """Seconds per token and cloud forward passes per token of `mode`."""
    once = (t.rtt_s + t.prefill_s) / max(1, n_tokens)
    if mode == "local":
        return Prediction(t.draft_s, 0.0)
    if mode == "cloud":
        return Prediction(t.step_s + once, 1.0)
    if mode == "assist":
        return Prediction(t.draft_s + escalate_rate * (t.rtt_s + t.step_s) + once, escalate_rate)
    if mode == "speculative":
        k = best_draft_len(t, alpha, pipeline, k_max) if k is None else k
        e = expected_tokens_per_round(alpha, k)
        r = round_seconds(t, alpha, k, pipeline)
        return Prediction(r / e + once, 1.0 / e, k=k, tokens_per_round=e, round_s=r)
    raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")


def predict_rounds(t: Timings, alphas: list[float], ks: list[int], pipeline: bool) -> tuple[float, float]:
    """(seconds, tokens) a list of rounds is predicted to take and yield, round r having k = ks[r]
    drafts at acceptance alphas[r] (its prompt's): how a benchmark predicts what it measured."""
    seconds = sum(round_seconds(t, a, k, pipeline) for a, k in zip(alphas, ks))
    tokens = sum(expected_tokens_per_round(a, k) for a, k in zip(alphas, ks))
    return seconds, tokens


def speedup_vs_cloud(t: Timings, alpha: float, **kwargs) -> float:
    """Predicted cloud seconds per token over speculative seconds per token."""
    return predict("cloud", t, alpha, **kwargs).s_per_token / predict("speculative", t, alpha, **kwargs).s_per_token


@dataclass(frozen=True)
class PassCosts:
    """Seconds of one packed pass by its total rows (measured at a few row counts, interpolated
    linearly between them and extended from the last two beyond), and the gateway's handling of
    one request outside the pass: a verify (HTTP in and out) and a streamed cloud step."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]
    verify_overhead_s: float
    stream_overhead_s: float
    prefill_s_per_token: float | None = None  # a prompt's fill, measured apart (None: as pass rows)

    def prefill_s(self, tokens: int, as_pass: float | None = None) -> float:
        """A prompt chunk of `tokens`: at the measured prefill rate, else as a pass of that many rows."""
        if self.prefill_s_per_token is not None:
            return tokens * self.prefill_s_per_token
        return self.pass_s(tokens) if as_pass is None else as_pass

    def pass_s(self, rows: float) -> float:
        xs, ys = self.rows, self.seconds
        if rows <= xs[0] or len(xs) == 1:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if rows <= x1:
                return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + max(slope, 0.0) * (rows - xs[-1])

    def table(self, max_rows: int) -> "np.ndarray":
        """pass_s(r) for r = 0..max_rows, as an array (the simulation looks passes up in it)."""
        import numpy as np

        r = np.arange(max_rows + 1, dtype=float)
        out = np.interp(r, self.rows, self.seconds)
        if len(self.rows) > 1:
            slope = max((self.seconds[-1] - self.seconds[-2]) / (self.rows[-1] - self.rows[-2]), 0.0)
            beyond = r > self.rows[-1]
            out[beyond] = self.seconds[-1] + slope * (r[beyond] - self.rows[-1])
        return out

    def cloud(self, n: int) -> tuple[float, float]:
        """(tokens/s, ITL s) of n streams stepped together."""
        cycle = self.pass_s(n) + n * self.stream_overhead_s
        return n / cycle, cycle

    def speculative(self, n: int, rows_per_verify: float, tokens_per_round: float) -> tuple[float, float]:
        """(tokens/s, ITL s) of n devices whose verifies share each pass."""
        cycle = self.pass_s(n * rows_per_verify) + n * self.verify_overhead_s
        return n * tokens_per_round / cycle, cycle / tokens_per_round

    @classmethod
    def from_dict(cls, d: dict) -> "PassCosts":
        """The inverse of `to_dict` (the `pass_costs` of a `bench capacity` JSON)."""
        rows = sorted(d["pass_ms_by_rows"], key=float)
        prefill = d.get("prefill_ms_per_token")
        return cls(tuple(int(float(r)) for r in rows), tuple(d["pass_ms_by_rows"][r] / 1000 for r in rows),
                   d["verify_overhead_ms"] / 1000, d["stream_overhead_ms"] / 1000, None if prefill is None else prefill / 1000)

    def to_dict(self) -> dict:
        return {"pass_ms_by_rows": {r: round(s * 1000, 2) for r, s in zip(self.rows, self.seconds)},
                "verify_overhead_ms": round(self.verify_overhead_s * 1000, 2),
                "stream_overhead_ms": round(self.stream_overhead_s * 1000, 2),
                "prefill_ms_per_token": None if self.prefill_s_per_token is None else round(self.prefill_s_per_token * 1000, 3)}


__all__ = [
    "Timings", "Prediction", "MODES", "predict", "predict_rounds", "round_seconds", "best_draft_len", "speedup_vs_cloud",
    "ceiling_s_per_token", "PassCosts",
]
