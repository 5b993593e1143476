"""Short calibration passes that measure the cost model's inputs, apart from any run they predict.

    rtt_s             median of light round trips (GET /v1/info) through the same link
    draft_s           the drafter's time per drafted token, on its own engine
    device_prefill_s  the drafter's prefill, per prompt token
    step_s            the gateway's time per token in cloud mode (after its first token)
    prefill_s         the gateway's prefill, per prompt token (opening a session, minus the RTT)
    verify_s(j)       a verify of a block of j tokens (j - 1 drafts), j = 1..max_block, minus the RTT

Every figure is a median of a few repetitions on a calibration prompt that is not one of the
benchmark's, so nothing is fitted to the speed being predicted.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass

from ...protocols.messages import OpenSession, VerifyRequest, VerifyTextRequest
from ..client import Client
from ..costmodel import Timings

CALIBRATION_PROMPT = (
    "Write a short Python function that returns the n-th Fibonacci number, and explain in two "
    "sentences how it works."
)


@dataclass
class Calibration:
    rtt_s: float
    draft_s: float
    device_prefill_s: float  # per prompt token
    step_s: float
    prefill_s: float  # per prompt token
    verify_s: tuple[float, ...]

    def timings(self, prompt_tokens: int = 0) -> Timings:
        """The cost model's inputs; `prompt_tokens` sets the gateway's prefill of one prompt."""
        return Timings(self.draft_s, self.step_s, self.verify_s, self.rtt_s, self.prefill_s * prompt_tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v]) for k, v in d.items()}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


async def calibrate(client: Client, *, max_block: int = 12, steps: int = 16, reps: int = 3,
                    prompt: str = CALIBRATION_PROMPT) -> Calibration:
    """Measure the cost model's inputs through `client`'s own link, device model and gateway."""
    link, tok = client.link, client.drafter.tokenizer
    rtts = []
    for _ in range(5):
        t0 = time.perf_counter()
        await link.transport.info()
        rtts.append(time.perf_counter() - t0)
    rtt = _median(rtts)
    ids = tok.prompt_tokens(prompt)

    def device() -> tuple[float, float]:
        engine = client.device.new_engine()
        prefills, drafts = [], []
        for _ in range(reps):
            engine.reset()
            engine.append(ids)
            t0 = time.perf_counter()
            engine.next_logits()
            prefills.append((time.perf_counter() - t0) / len(ids))
            d = engine.draft(steps)
            drafts.append(d.seconds / max(1, len(d.tokens)))
        return _median(prefills), _median(drafts)

    device_prefill, draft = await asyncio.to_thread(device)

    steps_s = []
    for _ in range(reps):
        gen = client.stream(prompt, mode="cloud", max_new_tokens=steps + 1)
        stamps = []  # (time, tokens so far) at each piece of text; a piece may carry several tokens
        async for _piece in gen:
            stamps.append((time.perf_counter(), len(gen.record.tokens)))
        if len(stamps) >= 2 and stamps[-1][1] > stamps[0][1]:
            steps_s.append((stamps[-1][0] - stamps[0][0]) / (stamps[-1][1] - stamps[0][1]))

    token_space = await link.shares_tokenizer(tok.fingerprint)
    budget = max_block * (max_block + 1)
    prefills, verify = [], {j: [] for j in range(1, max_block + 1)}
    for _ in range(reps):
        if token_space:
            msg = OpenSession(prompt_tokens=ids, tokenizer_fingerprint=tok.fingerprint, max_new_tokens=budget)
        else:
            msg = OpenSession(prompt_text=prompt, max_new_tokens=budget)
        t0 = time.perf_counter()
        opened = await link.request(msg)
        prefills.append(max(0.0, time.perf_counter() - t0 - rtt) / len(ids))
        position, offset = opened.position, 0
        for j in range(1, max_block + 1):
            if token_space:  # any ids will do: the block is computed whole before any is judged
                drafts = [ids[(position + i) % len(ids)] for i in range(j - 1)]
                req = VerifyRequest(session_id=opened.session_id, position=position, draft_tokens=drafts,
                                    draft_probs=[1.0] * len(drafts))
            else:  # about one target token per word
                req = VerifyTextRequest(session_id=opened.session_id, position=position, text_offset=offset,
                                        draft_text=" the" * (j - 1))
            t0 = time.perf_counter()
            r = await link.request(req)
            verify[j].append(max(1e-5, time.perf_counter() - t0 - rtt))
            position, offset = r.position, getattr(r, "text_offset", 0)
        await link.close(opened.session_id)
    return Calibration(
        rtt_s=rtt, draft_s=draft, device_prefill_s=device_prefill, step_s=_median(steps_s),
        prefill_s=_median(prefills), verify_s=tuple(_median(verify[j]) for j in range(1, max_block + 1)),
    )


__all__ = ["Calibration", "calibrate", "CALIBRATION_PROMPT"]
