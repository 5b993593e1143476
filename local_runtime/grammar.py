"""Structured output: a grammar (JSON Schema, any JSON object, a regex, or the model's tool-call
envelope) compiled by llguidance into a mask over the vocabulary at each step.

Both sides compile the same `Constraint` with their own tokenizer: the device drafts under the
mask, the gateway masks the target's logits before the accept rule. A `GrammarState` is one
generation's place in its grammar, kept in line with the tokens generated so far by `sync`, which
rolls back to the common prefix and consumes the rest, so a rejected draft costs nothing more than
a rollback. Where the grammar admits exactly one token (`Mask.only`), the drafter appends it
without running its model: a forced draft, which the target, under the same mask, always accepts.

    allowed(x) = 1 if the grammar admits token x next, else 0
    greedy:    argmax_x  logits[x]            over allowed x
    sampling:  p'(x) = p(x) allowed(x) / sum_y p(y) allowed(y)   (then temperature and top-p)

Compiled grammars are cached by (tokenizer, grammar hash), bounded in count and in source bytes;
a session's state is a copy of the cached matcher. Bad grammars raise `GrammarError`, which names
the request parameter and, for a schema, the keyword and its path (constraints.py checks it).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cachetools import LRUCache

from ..protocols.errors import GrammarError, GrammarViolation
from ..protocols.messages import Constraint
from .constraints import JSON_OPTIONS, MAX_SOURCE_BYTES, check_schema, check_tools, tool_call_lark

MAX_COMPILE_S = 2.0  # a grammar that takes longer to compile is refused (and not cached)


def _llg():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - the models and gateway extras install it
        raise GrammarError("structured output needs llguidance: pip install 'tandem[models]'") from exc
    return llguidance


# -- compiling -----------------------------------------------------------------------------------------


def grammar_source(c: Constraint) -> str:
    """The llguidance grammar for a constraint (after the checks that name what is wrong)."""
    llg = _llg()
    if c.kind == "json_schema":
        check_schema(c.source)
        return llg.LLMatcher.grammar_from_json_schema(c.source, defaults=JSON_OPTIONS)
    if c.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if c.kind == "regex":
        if not isinstance(c.source, str) or not c.source:
            raise GrammarError("regex: give the pattern as a non-empty string", param="regex")
        if len(c.source) > MAX_SOURCE_BYTES:
            raise GrammarError(f"regex: the pattern is over {MAX_SOURCE_BYTES} bytes", param="regex", too_large=True)
        return llg.LLMatcher.grammar_from_regex(c.source)
    if c.kind == "tool_call":
        src = c.source if isinstance(c.source, dict) else {}
        tools = src.get("tools") or []
        check_tools(tools)
        if src.get("name") is not None:
            tools = [t for t in tools if t["name"] == src["name"]]
            if not tools:
                raise GrammarError(f"tool_choice: no tool named '{src['name']}' among the tools", param="tool_choice")
        return llg.LLMatcher.grammar_from_lark(tool_call_lark(tools, bool(src.get("parallel", True))))
    raise GrammarError(f"unknown constraint kind '{c.kind}'")


def token_bytes(tok: Any, n_vocab: int) -> list[bytes]:
    """Each id's bytes as llguidance wants them: byte-level BPE pieces decoded from GPT-2's
    byte alphabet, SentencePiece pieces with their space marker, `<0xNN>` byte tokens as the
    byte, and control tokens (and ids that decode to nothing) as 0xFF + their name, which no
    grammar admits unless it names them. Ids past the tokenizer's (padding rows) are empty."""
    out = [b""] * n_vocab
    byte_level = any("\u0120" in s or "\u010a" in s for s in list(tok.vocab)[:5000])
    alphabet = _bytes_of_unicode() if byte_level else {}
    for piece, i in tok.vocab.items():
        if i >= n_vocab:
            continue
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            out[i] = bytes([int(m[1], 16)])
        elif i in tok.special_ids:
            out[i] = b"\xff" + piece.encode()
        elif byte_level:  # added tokens (e.g. "<tool_call>") are written as their text
            out[i] = bytes(alphabet[ch] for ch in piece) if all(ch in alphabet for ch in piece) else piece.encode()
        elif tok.decode([i]):
            out[i] = piece.replace("\u2581", " ").encode()
        else:  # an id that decodes to no text (a placeholder): never generated under a grammar
            out[i] = b"\xff" + piece.encode()
    return out


def _bytes_of_unicode() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted (character -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _Wrapped:
    """Our tokenizer in the shape llguidance's TokenizerWrapper reads. A tokenizer without an
    end-of-sequence token gets a virtual one past its vocabulary (never in a logits row)."""

    def __init__(self, tok: Any, n_vocab: int) -> None:
        self.tokens = token_bytes(tok, n_vocab)
        if not tok.eos_token_ids:
            self.tokens.append(b"\xff<eos>")
        self.eos_token_id = tok.eot_token_id if tok.eos_token_ids else n_vocab
        self.bos_token_id = tok.bos_token_id
        self.special_token_ids = sorted(i for i in tok.special_ids if i < n_vocab)
        self._encode = tok.encode

    def __call__(self, s: bytes | str) -> list[int]:
        return self._encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)


_lock = threading.Lock()
_compiling = threading.Lock()
_tokenizers: LRUCache = LRUCache(maxsize=8)
# compiled matchers by (tokenizer, grammar hash); weighed by their grammar's size
_compiled: LRUCache = LRUCache(maxsize=16 * 2**20, getsizeof=lambda entry: entry[1])
MAX_COMPILED = 64


def ll_tokenizer(tok: Any, n_vocab: int):
    """The llguidance tokenizer for ours (built once per tokenizer and vocabulary width: ~1 s
    for a 150k vocabulary)."""
    key = (tok.fingerprint, n_vocab)
    with _lock:
        hit = _tokenizers.get(key)
    if hit is not None:
        return hit
    llg = _llg()
    wrapped = _Wrapped(tok, n_vocab)
    built = llg.LLTokenizer(llg.TokenizerWrapper(wrapped), n_vocab=len(wrapped.tokens),
                            eos_token=sorted(set(tok.eos_token_ids)) or wrapped.eos_token_id)
    with _lock:
        _tokenizers[key] = built
    return built


def compile_constraint(c: Constraint, tok: Any, n_vocab: int) -> "GrammarState":
    """A fresh state at the start of `c`'s grammar, over `tok` and logits rows of width n_vocab."""
    source = grammar_source(c)
    key = (tok.fingerprint, n_vocab, hashlib.sha256(source.encode()).hexdigest())
    with _lock:
        entry = _compiled.get(key)
    if entry is None:
        llg = _llg()
        with _compiling:  # one compile at a time: a flood of new grammars takes one core, not all
            t0 = time.perf_counter()
            matcher = llg.LLMatcher(ll_tokenizer(tok, n_vocab), source, log_level=0,
                                    limits=llg.LLParserLimits(verbose_errors=False))
            took = time.perf_counter() - t0
        if matcher.is_error():
            raise _compile_error(c, matcher.get_error())
        if took > MAX_COMPILE_S:
            raise GrammarError(f"{_param(c)}: the grammar took {took:.1f} s to compile (limit {MAX_COMPILE_S} s)",
                               param=_param(c), too_large=True)
        entry = (matcher, len(source))
        with _lock:
            while len(_compiled) >= MAX_COMPILED:
                _compiled.popitem()
            _compiled[key] = entry
    with _lock:  # sessions open on several threads; the cached matcher is only ever copied
        matcher = entry[0].deep_copy()
    return GrammarState(matcher, n_vocab, tok.eos_token_ids)


def _param(c: Constraint) -> str:
    return {"json_schema": "response_format", "json_object": "response_format", "regex": "regex", "tool_call": "tools"}[c.kind]


def _compile_error(c: Constraint, message: str) -> GrammarError:
    too_large = any(w in message.lower() for w in ("limit", "fuel", "too many", "too large", "exceed"))
    return GrammarError(f"{_param(c)}: {message}", param=_param(c), too_large=too_large)


# -- one generation's place in its grammar ---------------------------------------------------------------


@dataclass(frozen=True)
class Mask:
    """What the grammar admits next: `allowed` over the vocabulary, and `only`, the single
    admitted token when there is exactly one (a forced token), else None."""

    allowed: np.ndarray
    only: int | None


class GrammarState:
    def __init__(self, matcher: Any, n_vocab: int, eos: Sequence[int] = ()) -> None:
        self._m = matcher
        self.n_vocab = n_vocab
        self.eos = frozenset(eos)
        self.ended = False  # an end-of-sequence token was taken
        self.tokens: list[int] = []
        self._mask: Mask | None = None

    def sync(self, tokens: Sequence[int]) -> None:
        """Line the state up with `tokens` (everything generated so far): roll back to the
        longest common prefix, consume the rest. Raises GrammarViolation at the first token the
        grammar does not admit (the state then holds the tokens before it). An end-of-sequence
        token is taken where the output is complete, and ends it; the matcher itself never sees
        it, so rolling back over it is only bookkeeping."""
        mine = self.tokens
        if len(tokens) >= len(mine) and list(tokens[: len(mine)]) == mine:
            n = len(mine)  # the usual case, going forward: one comparison in C, not a loop per token
        else:
            n, limit = 0, min(len(mine), len(tokens))
            while n < limit and mine[n] == tokens[n]:
                n += 1
        if n < len(mine):
            undo = len(mine) - n - (1 if self.ended else 0)
            if undo and not self._m.rollback(undo):
                raise RuntimeError(f"the grammar could not roll back {undo} tokens")
            del mine[n:]
            self.ended = False
            self._mask = None
        rest = [int(t) for t in tokens[n:]]
        if rest:
            self._mask = None
        for i, t in enumerate(rest):
            if self.ended:
                raise GrammarViolation(f"token {t} at output position {n + i} follows the end of the output")
            if t in self.eos:
                if not self._m.is_accepting():
                    raise GrammarViolation(f"the output ends at position {n + i} before the grammar is complete")
                self.ended = True
            elif not self._m.try_consume_tokens([t]):
                raise GrammarViolation(f"token {t} at output position {n + i} does not follow the grammar")
            mine.append(t)

    def mask(self) -> Mask:
        if self._mask is None:
            if self.ended:
                allowed = np.zeros(self.n_vocab, dtype=bool)
            else:
                bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
                allowed = np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)
            ids = np.flatnonzero(allowed[: self.n_vocab])
            self._mask = Mask(allowed, int(ids[0]) if len(ids) == 1 else None)
        return self._mask

    def fast_forward(self) -> int | None:
        """The first token of what the grammar forces next as bytes (llguidance's fast-forward:
        say `", "key": ` after a value), tokenised canonically; None when nothing is forced.
        Unlike `Mask.only` other tokenisations of those bytes stay admitted, so a draft of it
        is a good guess, not a certainty."""
        if self.ended:
            return None
        ff = self._m.compute_ff_tokens()
        return int(ff[0]) if ff and self.mask().allowed[ff[0]] else None

    @property
    def accepting(self) -> bool:
        """The output so far is complete under the grammar."""
        return bool(self._m.is_accepting())

    @property
    def stopped(self) -> bool:
        """Nothing more can follow (end-of-sequence taken, or the grammar is exhausted)."""
        return self.ended or bool(self._m.is_stopped())


def apply_mask(row: Any, allowed: np.ndarray) -> Any:
    """A logits row (tensor or array) with every token the grammar does not admit at -inf, as a
    float tensor."""
    import torch

    t = row.float() if isinstance(row, torch.Tensor) else torch.from_numpy(np.asarray(row, dtype=np.float32))
    keep = torch.from_numpy(allowed[: t.shape[-1]])
    return torch.where(keep, t, torch.tensor(float("-inf")))


__all__ = [
    "Constraint", "GrammarError", "GrammarViolation", "GrammarState", "Mask", "compile_constraint", "grammar_source",
    "apply_mask", "token_bytes", "ll_tokenizer",
]
