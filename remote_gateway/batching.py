"""Batched verification: many sessions' pending tokens in one target forward pass.

Sessions hold caches of different lengths, so a batch is *packed*, not padded: the new tokens of
every session in the batch are laid end to end as one sequence of N tokens, each with its own
position id. Every linear layer (projections, MLP, LM head) then runs once over all N tokens:
that is where a forward pass spends its time, and a matrix of N rows costs far less than N/k
matrices of k rows, since the weights are read once. Only attention is per session:

    packed tokens   [ a1 a2 a3 | b1 b2 | c1 c2 c3 c4 ]      one forward pass
    keys/values     session a: cache_a + a1..a3    (each session's own cache, appended in place)
                    session b: cache_b + b1..b2
    attention       softmax(q_a K_a^T) V_a, ... one small SDPA call per session and layer,
                    causal from the session's own offset (and windowed on sliding layers)

`RaggedBatch` stands in for the model's `past_key_values`: its `update` appends each session's
slice of the new keys/values to that session's own DynamicCache, and the attention function
registered here (`tandem_ragged`) reads them back per session. Outside a batch the function hands
over to the model's original attention implementation, so a single-session forward is unchanged.

Per-session attention is the same computation, with the same shapes, as the unbatched pass; the
linear layers differ only in floating-point summation order (~1e-6 on logits). Greedy decisions
go through `Engine.greedy_token`, whose near-tie rule recomputes any choice whose top-two logit
gap is under the tie margin canonically, so batched and unbatched verification emit identical
tokens (tested in tests/test_batching.py).

`Batcher` is the scheduler: verify and append jobs from different sessions that arrive within a
short collection window (or while the previous batch is running: continuous batching) are run
as one packed forward on the model worker thread, up to a token budget per batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..local_runtime.engine import Engine
from ..local_runtime.invariant import INVARIANT, invariant_attention, invariant_attention_rows

log = logging.getLogger("tandem.gateway.batching")

RAGGED = "tandem_ragged"
_active = threading.local()  # the RaggedBatch of the forward running on this thread, if any


class SessionEngine(Engine):
    """An Engine whose uncached tokens can join a packed multi-session forward pass."""

    def pending(self) -> list[int]:
        return self.tokens[self.cached :]

    @torch.inference_mode()
    def fill_cache(self, upto: int) -> None:
        """Forward tokens[cached:upto] into the cache without materialising their logits (a long
        prompt's full logits would be prompt x vocabulary floats)."""
        if upto > self.cached:
            self._run(self.cached, upto, last=True)
            self.cached = upto
            self.forward_passes += 1


class RaggedBatch:
    """`past_key_values` for one packed forward: routes each session's slice of the new keys and
    values into that session's own cache."""

    def __init__(self, engines: list[SessionEngine]) -> None:
        self.segments: list[tuple[int, int]] = []
        self.offsets: list[int] = []
        self.caches = []
        n = 0
        for e in engines:
            k = len(e.tokens) - e.cached
            self.segments.append((n, n + k))
            self.offsets.append(e.cached)
            self.caches.append(e.kv_cache())
            n += k
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = [
            cache.update(key_states[:, :, s:e], value_states[:, :, s:e], layer_idx)
            for cache, (s, e) in zip(self.caches, self.segments)
        ]
        return key_states, value_states

    def rollback(self) -> None:
        """Undo a forward that failed half-way: drop whatever some layers already appended."""
        for cache, offset in zip(self.caches, self.offsets):
            for layer in getattr(cache, "layers", []):
                keys = getattr(layer, "keys", None)
                if keys is not None and keys.dim() == 4 and keys.shape[-2] > offset:
                    layer.keys = layer.keys[..., :offset, :]
                    layer.values = layer.values[..., :offset, :]


def _window_mask(q_len: int, offset: int, window: int | None, device=None) -> torch.Tensor | None:
    """Boolean (q_len, offset + q_len) mask: query j sits at position offset + j and sees keys at
    positions <= its own, and on a sliding layer only the last `window` of them (transformers'
    rule: kv > q - window). None when that is every key (a single query without a window)."""
    kv_len = offset + q_len
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    q = torch.arange(offset, kv_len, device=device)[:, None]
    kv = torch.arange(kv_len, device=device)[None, :]
    mask = kv <= q
    if window is not None:
        mask &= kv > q - window
    return mask


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def ragged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs):
    batch: RaggedBatch | None = getattr(_active, "batch", None)
    if batch is None:
        fallback = _ORIGINAL.get(id(module.config))
        if fallback is None:  # a model this module was never installed on (cannot happen via install())
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as fallback
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, softcap=softcap, **kwargs)
    groups = query.shape[1] // key.shape[1]
    outs = []
    invariant = _ORIGINAL.get(id(module.config)) is invariant_attention
    for (s, e), (k, v), offset in zip(batch.segments, batch.kv[module.layer_idx], batch.offsets):
        q = query[:, :, s:e]
        if invariant:  # each query exactly as a one-token step computes it (invariant.py)
            outs.append(invariant_attention_rows(q, k, v, scaling=scaling, window=sliding_window).transpose(1, 2))
            continue
        mask = _window_mask(e - s, offset, sliding_window, q.device)
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if softcap is None:
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling))
        else:  # Gemma 2 style logit soft-capping: the eager formula
            w = torch.matmul(q, k.transpose(2, 3)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
            w = torch.tanh(w / softcap) * softcap
            if mask is not None:
                w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
            outs.append(torch.matmul(torch.softmax(w.float(), dim=-1).to(q.dtype), v))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


_ORIGINAL: dict[int, Callable] = {}  # id(config) -> the attention function the model had before
_install_lock = threading.Lock()


def install(model) -> bool:
    """Give `model` the ragged attention function (a no-op outside batches). Returns False for a
    model it cannot serve (an attention implementation other than sdpa/flash, e.g. eager-only
    models): those are verified one session at a time."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _install_lock:
        current = model.config._attn_implementation
        if current == RAGGED or id(model.config) in _ORIGINAL:
            return True
        if current not in ("sdpa", INVARIANT):
            log.info("batched verification is off for this model: its attention implementation is %r", current)
            return False
        AttentionInterface.register(RAGGED, ragged_attention)
        # the single-session path builds the same masks as before
        AttentionMaskInterface.register(RAGGED, ALL_MASK_ATTENTION_FUNCTIONS[current])
        _ORIGINAL[id(model.config)] = ALL_ATTENTION_FUNCTIONS[current]
        try:
            model.set_attn_implementation(RAGGED)
        except (KeyError, ValueError) as exc:  # pragma: no cover - depends on the transformers version
            log.info("batched verification is off: cannot set the attention implementation (%s)", exc)
            del _ORIGINAL[id(model.config)]
            return False
        if model.config._attn_implementation != RAGGED:  # pragma: no cover
            del _ORIGINAL[id(model.config)]
            return False
        return True


def token_groups(engines: list[SessionEngine], budget: int) -> list[list[SessionEngine]]:
    """`engines` in order, cut into groups whose pending tokens total at most `budget` (an engine
    with more than that on its own is a group of its own)."""
    groups: list[list[SessionEngine]] = []
    total = budget + 1
    for e in engines:
        n = len(e.pending())
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(e)
        total += n
    return groups


# a 4-D placeholder: transformers returns a ready-made 4-D mask as it is, so no mask is built
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


@torch.inference_mode()
def forward_packed(model, engines: list[SessionEngine]) -> list[torch.Tensor]:
    """One forward pass over every engine's uncached tokens; returns each engine's logits rows
    (one per uncached token, as `Engine.compute()` would) and marks the tokens cached."""
    batch = RaggedBatch(engines)
    ids = [t for e in engines for t in e.pending()]
    positions = [p for e in engines for p in range(e.cached, len(e.tokens))]
    _active.batch = batch
    try:
        out = model(
            input_ids=torch.tensor([ids], device=model.device), position_ids=torch.tensor([positions], device=model.device),
            cache=batch,
            attention_mask=_NO_MASK.to(model.device), use_cache=True,
        )
    except BaseException:
        batch.rollback()
        raise
    finally:
        _active.batch = None
    logits = out.logits[0].float().cpu()
    rows = []
    for e, (s, t) in zip(engines, batch.segments):
        e.cached = len(e.tokens)
        e.forward_passes += 1
        rows.append(logits[s:t])
    return rows


# ---------------------------------------------------------------------------------------------
# the scheduler


@dataclass
class Block:
    """One session's share of a forward pass. Its tokens are already appended to `engine`
    (uncached); `finish(rows)` runs on the model worker with the logits rows for them and returns
    the reply. If the pass fails, the engine is cut back to `start` tokens."""

    engine: Any  # SessionEngine, or a backend's equivalent
    start: int
    finish: Callable[[torch.Tensor], Any]

    @property
    def tokens(self) -> int:
        return len(self.engine.tokens) - self.engine.cached


@dataclass
class BatchingConfig:
    enabled: bool = True
    window_ms: float = 20.0  # the longest a batch waits for other live sessions' jobs (see company_wait_s)
    max_batch: int = 64  # sessions per forward pass
    max_batch_tokens: int = 512  # packed tokens per forward pass (bounds the logits buffer)


# A batch short of the live sessions waits for company at most this share of the last pass's
# time (and never over `window_ms`): a job that arrives just after a pass started would otherwise
# wait the whole pass, and two clients would take turns, one row each, for good.
WAIT_SHARE = 0.1


def company_wait_s(window_ms: float, last_pass_s: float | None, queued: int, live: int, max_batch: int) -> float:
    """How long the next batch waits for more jobs: 0 when every live session is queued (or the
    batch is full), else min(window, WAIT_SHARE x the last pass) (the window alone before any)."""
    if window_ms <= 0 or queued >= min(live, max_batch):
        return 0.0
    window = window_ms / 1000
    return window if last_pass_s is None else min(window, WAIT_SHARE * last_pass_s)


@dataclass
class _LoopState:
    queue: list = field(default_factory=list)
    task: asyncio.Task | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class Batcher:
    """Collects Blocks from concurrent requests and runs them as packed forward passes.

    Continuous batching: the scheduler task runs one batch at a time on the model worker; jobs
    that arrive meanwhile queue up and form the next batch as soon as it is done. A batch with
    fewer jobs than there are live sessions waits for company, up to `company_wait_s` (the window,
    and a tenth of the last pass), and goes as soon as every live session is in (a lone client is
    never delayed)."""

    def __init__(
        self,
        backend,
        executor: Executor,
        config: BatchingConfig | None = None,
        *,
        busy: Callable[[], int] = lambda: 0,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.backend = backend  # backends.TargetBackend: forward(engines) -> rows
        self.executor = executor
        self.config = config or BatchingConfig()
        self.packed = self.config.enabled and backend.batched
        self._busy = busy  # live sessions: whether waiting for company can pay off
        self._on_batch = on_batch
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self.batches = 0
        self.batched_jobs = 0
        self.last_pass_s: float | None = None  # the last forward's time: bounds the wait for company

    async def run(self, block: Block) -> Any:
        loop = asyncio.get_running_loop()
        if not self.packed:
            return (await loop.run_in_executor(self.executor, self._run_batch, [block]))[0].unwrap()
        state = self._loops.setdefault(loop, _LoopState())
        fut = loop.create_future()
        state.queue.append((block, fut))
        state.arrived.set()
        if state.task is None or state.task.done():
            state.task = loop.create_task(self._drain(state))
        return await fut

    async def _drain(self, state: _LoopState) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while state.queue:
            await self._wait_for_company(state)
            jobs, tokens = [], 0
            while state.queue and len(jobs) < cfg.max_batch:
                n = state.queue[0][0].tokens
                if jobs and tokens + n > cfg.max_batch_tokens:
                    break
                jobs.append(state.queue.pop(0))
                tokens += n
            jobs = [(b, f) for b, f in jobs if not f.cancelled()]
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._run_batch, [b for b, _ in jobs])
            except BaseException as exc:  # the executor is gone (shutdown): fail the jobs, not the loop
                results = [_Outcome(error=exc if isinstance(exc, Exception) else RuntimeError(str(exc)))] * len(jobs)
            for (_, fut), outcome in zip(jobs, results):
                if fut.done():
                    continue
                if outcome.error is not None:
                    fut.set_exception(outcome.error)
                else:
                    fut.set_result(outcome.value)

    async def _wait_for_company(self, state: _LoopState) -> None:
        """Hold the next batch until every live session has a job queued, up to `company_wait_s`."""
        cfg = self.config
        wait = company_wait_s(cfg.window_ms, self.last_pass_s, len(state.queue), self._busy(), cfg.max_batch)
        deadline = time.monotonic() + wait
        while wait > 0:
            state.arrived.clear()
            try:
                await asyncio.wait_for(state.arrived.wait(), wait)
            except TimeoutError:
                return
            wait = min(deadline - time.monotonic(),
                       company_wait_s(cfg.window_ms, self.last_pass_s, len(state.queue), self._busy(), cfg.max_batch))

    def _run_batch(self, blocks: list[Block]) -> list["_Outcome"]:
        """On the model worker: one forward over every block (plain for a single one), then each
        block's decisions."""
        t0 = time.perf_counter()
        forward = [b for b in blocks if b.tokens > 0]
        try:
            if len(forward) == 1 or not self.packed:
                rows = [self.backend.forward_one(b.engine) for b in forward]
            else:
                rows = self.backend.forward([b.engine for b in forward])
        except Exception as exc:
            for b in forward:
                b.engine.truncate(b.start)
            return [_Outcome(error=exc)] * len(blocks)
        by_block = {id(b): r for b, r in zip(forward, rows)}
        if forward:
            self.last_pass_s = time.perf_counter() - t0
        if self._on_batch is not None:
            self._on_batch(len(forward), sum(len(r) for r in rows), time.perf_counter() - t0)
        if len(forward) > 1:
            self.batches += 1
            self.batched_jobs += len(forward)
        outcomes = []
        for b in blocks:
            try:
                outcomes.append(_Outcome(value=b.finish(by_block.get(id(b)))))
            except Exception as exc:  # one session's failure is its own
                outcomes.append(_Outcome(error=exc))
        return outcomes


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


__all__ = ["Batcher", "BatchingConfig", "company_wait_s", "Block", "SessionEngine", "forward_packed", "install", "ragged_attention", "token_groups"]
