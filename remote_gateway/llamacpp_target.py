"""The target model in llama.cpp: every session a sequence of one shared context.

    LlamaCppTarget(name)            the GGUF loaded once; a context with `max_sessions` sequences
    new_engine()                    a session: a sequence id of that context (a `Sequence`)
    forward([sessions])             one `llama_decode` over every session's pending tokens, each
                                    with its own sequence id and positions, logits for every one
                                    of them (full rows: the lossless sampling rule needs them)
    truncate(pos)                   `llama_memory_seq_rm(seq, pos, -1)`: rollback by position

Exact by construction. llama.cpp computes a block of tokens with other kernels than a single
token (and a unified KV cache sums attention over other sequences' cells too), which moves
logits by ~0.3 on the bundled Q4_K_M models: enough to flip near-tied greedy choices. So every
session computes with one split, the model's `prompt_batched` rule (backends/llamacpp.py,
`split_points`): its prompt, all but the last token, batched in pieces of `n_batch` aligned at 0
(one `llama_decode` of that session alone: a batched prefill), and every later token alone, one
token a micro-batch, in decode calls shared with other sessions. Keys and values live in a
stream per sequence (`kv_unified` off). Every row then equals what the model decoding alone
under the same rule computes, whatever else shares the call (measured: bit-identical on the
bundled Qwen2.5 models, within 3e-4 on a tiny float32 one; tests/test_llamacpp_target.py). On a
CPU decoding one token a micro-batch costs little: a block of k tokens costs ~k steps there
anyway (compute-bound). The price is the KV pool: `ctx_per_session` cells for each of
`max_sessions`. A near tie is still recomputed canonically (the prefix alone, from an empty
cache, in the model's own context, with the session's prompt split), as on every other engine.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..local_runtime.backends.llamacpp import LlamaCppModel, default_threads, split_points
from ..local_runtime.sequence import Sequence
from ..protocols.errors import BackendUnavailable, gateway_error
from .target import TargetBackend


class LlamaCppSession(Sequence):
    """One session's tokens, cached as sequence `seq` of the target's shared context."""

    def __init__(self, target: "LlamaCppTarget", seq: int, *, tie_margin: float) -> None:
        super().__init__(target.lm, tie_margin=tie_margin)
        self.target = target
        self.seq = seq
        self.released = False
        self.batched_upto = 0  # the prompt filled in batched pieces (fill); from here one token a call

    def reset(self) -> None:
        super().reset()
        self.batched_upto = 0

    def pending(self) -> list[int]:
        return self.tokens[self.cached :]

    def _forward(self, start: int, upto: int) -> torch.Tensor:
        if upto != len(self.tokens):
            raise ValueError("a llama.cpp session computes all its pending tokens at once")
        return self.target.forward([self])[0][-1]

    def _crop(self, pos: int) -> bool:
        return self.target.crop(self.seq, pos)

    def fresh_logits(self, prefix_len: int) -> torch.Tensor:
        self.forward_passes += 1
        return self.target.canonical_logits(self.tokens[:prefix_len], self.batched_upto)

    def release(self) -> None:
        """Give the sequence id back (the session is over); idempotent."""
        if not self.released:
            self.reset()
            self.released = True
            self.target.release(self.seq)


class LlamaCppTarget(TargetBackend):
    batched = True
    supports_sampling = True

    def __init__(
        self,
        model: str | LlamaCppModel,
        *,
        max_sessions: int = 16,
        ctx_per_session: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
    ) -> None:
        """`model`: a registered name or .gguf path, or a loaded `LlamaCppModel`, whose own
        single-sequence context becomes the canonical one for near ties."""
        if isinstance(model, str):
            from ..local_runtime.backends import gguf_path
            from ..local_runtime.models import load_tokenizer

            model = LlamaCppModel(model, gguf_path(model), load_tokenizer(model), n_threads=n_threads, n_batch=n_batch,
                                  prompt_batched=True)
        if not model.prompt_batched:
            raise ValueError("the llama.cpp target needs a model loaded with prompt_batched=True (its exact split)")
        self.model = model
        self.lm = self.model  # .name, .tokenizer, .vocab_size
        self.n_batch = self.model.n_batch
        self.max_sessions = max_sessions
        import llama_cpp

        self._llama_cpp = llama_cpp
        # the model's own context's settings (attention kernel, rope scaling...), so that both
        # compute alike; then room for many sequences in one pool of cells
        params = llama_cpp.llama_context_params()
        for field, _ in params._fields_:
            setattr(params, field, getattr(self.model.llm.context_params, field))
        params.n_ctx = max_sessions * ctx_per_session
        params.n_batch = params.n_ubatch = self.n_batch  # a prompt piece is one micro-batch
        params.n_seq_max = max_sessions
        params.kv_unified = False  # a KV stream per sequence: attention sums over its own cells only
        params.n_threads = params.n_threads_batch = n_threads or default_threads()
        self.ctx = llama_cpp.llama_init_from_model(self.model.llm.model, params)
        if not self.ctx:
            raise BackendUnavailable(f"llama.cpp could not create {max_sessions} sequences of {ctx_per_session} cells")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.max_sequence_tokens = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._free = list(range(max_sessions - 1, -1, -1))
        self._lock = threading.Lock()
        self._canonical = self.model.new_engine()
        m = self.model.llm.model
        self._kv_bytes_per_token = 2 * 2 * llama_cpp.llama_model_n_layer(m) * llama_cpp.llama_model_n_embd(m) \
            * llama_cpp.llama_model_n_head_kv(m) // llama_cpp.llama_model_n_head(m)  # keys and values, f16

    @property
    def name(self) -> str:
        return self.model.name

    def kv_bytes_per_token(self) -> int:
        return self._kv_bytes_per_token

    # -- sessions --------------------------------------------------------------------------------

    def new_engine(self, tie_margin: float | None = None) -> LlamaCppSession:
        with self._lock:
            if not self._free:
                raise gateway_error("capacity", f"every one of the {self.max_sessions} llama.cpp sequences is in use",
                                    retry_after_s=1.0)
            seq = self._free.pop()
        return LlamaCppSession(self, seq, tie_margin=self.model.tie_margin if tie_margin is None else tie_margin)

    def release(self, seq: int) -> None:
        self._llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)
        with self._lock:
            self._free.append(seq)

    def crop(self, seq: int, pos: int) -> bool:
        return bool(self._llama_cpp.llama_memory_seq_rm(self.mem, seq, pos, -1))

    # -- forward passes ------------------------------------------------------------------------------

    @property
    def prefill_chunk(self) -> int:
        """The prompt pieces the gateway fills with: the rule's `n_batch`, aligned at 0."""
        return self.n_batch

    def forward(self, engines: list[LlamaCppSession]) -> list[torch.Tensor]:
        """Every engine's pending tokens, one token per `llama_decode` (a micro-batch of one: the
        rule's decode step); a logits row for each pending token."""
        rows: dict[int, list[np.ndarray]] = {id(e): [] for e in engines}
        for e in engines:
            for p, t in zip(range(e.cached, len(e.tokens)), e.pending()):
                rows[id(e)] += self._decode([(e.seq, p, t, True)])
        for e in engines:
            e.cached = len(e.tokens)
            e.forward_passes += 1
        return [torch.from_numpy(np.stack(rows[id(e)])) for e in engines]

    def forward_one(self, engine: LlamaCppSession, upto: int | None = None) -> torch.Tensor:
        return self.forward([engine])[0]

    def fill(self, engine: LlamaCppSession, upto: int) -> None:
        """A prompt into the cache, no logits wanted: batched pieces (the rule's prompt part)."""
        if engine.cached != engine.batched_upto:
            raise ValueError("a llama.cpp session's prompt is filled before anything is decoded")
        for lo, hi in split_points(engine.cached, upto, upto, self.n_batch):
            self._decode([(engine.seq, p, engine.tokens[p], False) for p in range(lo, hi)])
        engine.cached = engine.batched_upto = upto
        engine.forward_passes += 1

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """One llama_decode of (sequence, position, token, wants logits) items; the rows asked for."""
        llama_cpp, b = self._llama_cpp, self.batch
        for i, (seq, pos, tok, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(items)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            for seq, pos, _, _ in items:  # what this call appended must not stay half-written
                llama_cpp.llama_memory_seq_rm(self.mem, seq, pos, -1)
            if rc == 1:
                raise gateway_error("too_large", f"a session outgrew its {self.max_sequence_tokens} llama.cpp KV cells")
            raise RuntimeError(f"llama_decode failed with code {rc}")
        n_vocab = self.model.n_vocab
        out = []
        for i, (_, _, _, logits) in enumerate(items):
            if logits:
                ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                out.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy())
        return out

    def canonical_logits(self, prefix: list[int], batched_upto: int) -> torch.Tensor:
        """The logits after `prefix`, decoded alone from an empty cache in the model's own
        single-sequence context with the session's split (prompt batched up to `batched_upto`):
        exactly what `LlamaCppEngine.fresh_logits` computes."""
        engine = self._canonical
        engine.tokens = list(prefix)
        engine.batched_upto = batched_upto
        return engine.fresh_logits(len(prefix))

    def close(self) -> None:
        llama_cpp = self._llama_cpp
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        self.model.close()


__all__ = ["LlamaCppTarget", "LlamaCppSession"]
