"""The `assist` mode: the device writes, and asks the cloud only for the tokens it is unsure of.

    loop: the device model proposes its next token t
          a token router scores t (confidence, entropy, or the learned reward head)
          score >= threshold  -> keep t: it joins the text, nothing travels
          score <  threshold  -> send the device's tokens since the last call (the gateway takes
                                 them as they are) and take the cloud model's next token instead

Lossy by design: the output is the device's except where the router escalated. Cheaper than
speculation (one cloud forward pass per escalation, none for kept tokens); the threshold trades
cloud calls for agreement with the cloud model. With different tokenizers the same happens in
text: the device sends the text of its pending tokens, the gateway tokenises it, and the
cloud's token comes back as text for the device to re-tokenise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..local_runtime.models import LoadedModel
from ..local_runtime.text import IncrementalDecoder
from ..protocols.errors import TandemError, TransportError, UnknownSessionError
from ..protocols.messages import AppendRequest, ChatMessage, CloseSession, OpenSession, SamplingParams
from .usage import GenerationRecord, Round

if TYPE_CHECKING:
    from .client import Client

# Device tokens that may wait for the next cloud call; past this the device asks anyway, which
# keeps every append small.
MAX_PENDING = 256


class AssistRun:
    def __init__(
        self, client: "Client", rec: GenerationRecord, prompt: str, chat: bool, sampling: SamplingParams,
        max_new_tokens: int, router: str, threshold: float,
    ) -> None:
        from ..routing.base import get_token_router  # noqa: F401 - fail early if routing is missing

        self.client, self.rec, self.prompt, self.chat = client, rec, prompt, chat
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.router_name, self.threshold = router, threshold
        self.lm = client.drafter
        self.tok = self.lm.tokenizer
        if router == "reward" and not isinstance(self.lm, LoadedModel):
            raise TandemError(
                f"the reward token router reads the device model's hidden state, which the "
                f"'{client.drafter_backend}' backend does not expose; use a torch drafter or another router"
            )
        # the device model's own drafting backend (torch, llama.cpp, ...) writes the tokens
        self.engine = client.new_drafter_engine()
        self._generator = None
        if sampling.seed is not None:
            import torch

            self._generator = torch.Generator().manual_seed(sampling.seed)

    def _choose(self, logits) -> int:
        import torch

        from ..local_runtime.sampling import logits_to_probs

        if self.sampling.greedy:
            return int(torch.argmax(logits))
        probs = logits_to_probs(logits, self.sampling.temperature, self.sampling.top_p)
        return int(torch.multinomial(probs.float(), 1, generator=self._generator))

    async def run(self) -> AsyncIterator[str]:
        from ..routing.base import TokenContext, get_token_router, token_to_cloud

        text_space = not await self.client._shares_tokenizer()
        tok, engine, rec, transport = self.tok, self.engine, self.rec, self.client.transport
        router = get_token_router(self.router_name)
        tap = None
        if self.router_name == "reward":
            from ..routing.token import HiddenStateTap

            tap = HiddenStateTap(self.lm)
        base = tok.prompt_tokens(self.prompt, self.chat)
        engine.append(base)
        decoder = IncrementalDecoder(tok.decode, skip_ids=tok.special_ids)

        def open_msg() -> OpenSession:
            """A session for the prompt plus everything generated so far (a re-open starts there)."""
            budget = max(1, self.max_new_tokens - len(rec.tokens))
            if text_space:
                return OpenSession(
                    messages=[ChatMessage(role="user", content=self.prompt)] if self.chat else None,
                    prompt_text=None if self.chat else self.prompt, resume_text=decoder.text or None,
                    sampling=self.sampling, max_new_tokens=budget, model=self.client.target_name,
                )
            return OpenSession(
                prompt_tokens=base + rec.tokens, tokenizer_fingerprint=tok.fingerprint, sampling=self.sampling,
                max_new_tokens=budget, model=self.client.target_name,
            )

        up, down = transport.bytes_up, transport.bytes_down
        session_id = (await transport.request(open_msg())).session_id
        decoder = IncrementalDecoder(tok.decode, skip_ids=tok.special_ids)
        eos = set(tok.eos_token_ids)
        pending: list[int] = []  # device tokens the gateway has not seen yet
        synced_text = 0  # text space: characters of the device's text the gateway has seen
        session_base = 0  # text space: where the current session's own text starts (a re-open moves it)
        cloud_position = 0  # text space: target tokens the gateway has generated
        finished = False
        offline = False
        try:
            while not finished and len(rec.tokens) < self.max_new_tokens:
                logits = await asyncio.to_thread(engine.next_logits)
                t = self._choose(logits)
                score = router.score(TokenContext(logits, hidden=tap.last_row() if tap else None, tokens=engine.tokens), t)
                ask = not offline and (token_to_cloud(score, self.threshold) or len(pending) >= MAX_PENDING)
                if ask and text_space and decoder.pending_text():
                    ask = False  # the device's text ends mid-character: finish it first
                if not ask:
                    engine.append([t])
                    pending.append(t)
                    rec.tokens.append(t)
                    rec.usage.local_tokens += 1
                    if piece := decoder.push([t]):
                        yield piece
                    finished = t in eos
                    continue
                if text_space:
                    new_text = decoder.text[synced_text:]
                    req = AppendRequest(session_id=session_id, position=cloud_position, text=new_text,
                                        text_offset=synced_text - session_base)
                else:
                    req = AppendRequest(session_id=session_id, position=len(base) + len(rec.tokens) - len(pending),
                                        tokens=pending)
                try:
                    res = await transport.request(req)
                except UnknownSessionError:
                    # expired or evicted: a new session re-prefilled with everything so far
                    session_id = (await transport.request(open_msg())).session_id
                    pending, synced_text, cloud_position = [], len(decoder.text), 0
                    session_base = synced_text
                    continue
                except TransportError:
                    if self.client.fallback != "local":
                        raise
                    rec.usage.fallbacks += 1
                    offline = True  # the cloud is away: the device writes on alone
                    continue
                rec.usage.rounds += 1
                rec.rounds.append(Round(len(pending), len(pending), len(pending) + (res.next_token is not None)))
                pending = []
                if text_space:
                    cloud_ids = tok.encode(res.text) if res.text else []
                    cloud_position = res.position
                    synced_text = session_base + (res.text_offset or 0)
                else:
                    cloud_ids = [res.next_token] if res.next_token is not None else []
                engine.append(cloud_ids)
                rec.tokens.extend(cloud_ids)
                rec.usage.cloud_tokens += 1 if res.next_token is not None else 0
                if piece := decoder.push(cloud_ids):
                    yield piece
                finished = res.finished
                if finished:
                    rec.finish_reason = res.finish_reason
            if tail := decoder.flush():
                yield tail
            rec.finish_reason = rec.finish_reason or ("eos" if finished else "length")
        finally:
            if tap is not None:
                tap.close()
            if not finished:
                try:
                    await transport.request(CloseSession(session_id=session_id))
                except TandemError:
                    pass
            rec.usage.bytes_up += transport.bytes_up - up
            rec.usage.bytes_down += transport.bytes_down - down
            rec.decision = {**(rec.decision or {}), "token_router": self.router_name, "threshold": self.threshold}


__all__ = ["AssistRun", "MAX_PENDING"]
