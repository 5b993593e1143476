"""What the device model's prefill says about a prompt, for free.

The device prefills the prompt anyway; the logits of that one forward pass give, per prompt
position j, the model's distribution over the token after j. From them (ids t_0..t_(n-1), rows
l_0..l_(n-1)):

    nll_j      = -log softmax(l_(j-1))[t_j]          j = 1..n-1 (how surprising the prompt is)
    entropy_j  = -sum_v p_j(v) log p_j(v)            p_j = softmax(l_j)  (how unsure the model is)

and the features (SIGNAL_NAMES) are: log(1 + n), mean and standard deviation and 90th
percentile of nll (log-perplexity and its spread), mean entropy, and the entropy and top
probability of the last row (how sure the model is about how to start its answer).

The prompt is what the device prefills: the user turn through the device model's chat template
(`Tokenizer.prompt_tokens`), cut to its first `max_tokens` tokens (n is the uncut length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..local_runtime.models import LoadedModel

SIGNAL_NAMES = ("log_len", "nll_mean", "nll_std", "nll_p90", "entropy_mean", "last_entropy", "last_top_prob")
DEFAULT_MAX_TOKENS = 256


def signals_from_logits(logits, token_ids: Sequence[int], n_tokens: int | None = None) -> np.ndarray:
    """The features above from a prefill's logits rows (n, vocab) and the n token ids they were
    computed over; n_tokens is the uncut prompt length when the ids were cut."""
    import torch

    rows = torch.as_tensor(logits).float()
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if rows.ndim != 2 or rows.shape[0] != len(ids) or len(ids) == 0:
        raise ValueError(f"need one logits row per token id, got {tuple(rows.shape)} rows for {len(ids)} ids")
    logp = torch.log_softmax(rows, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if len(ids) > 1:
        nll = -logp[:-1].gather(1, ids[1:, None])[:, 0]
    else:
        nll = torch.zeros(1)
    n = len(ids) if n_tokens is None else n_tokens
    return np.array(
        [
            np.log1p(n),
            float(nll.mean()),
            float(nll.std()) if len(nll) > 1 else 0.0,
            float(torch.quantile(nll, 0.9)),
            float(entropy.mean()),
            float(entropy[-1]),
            float(logp[-1].exp().max()),
        ],
        dtype=np.float32,
    )


def prompt_ids(lm: "LoadedModel", prompt: str) -> list[int]:
    return lm.tokenizer.prompt_tokens(prompt, chat=True)


def prefill_signals(
    lm: "LoadedModel", prompts: Sequence[str], *, max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = 8
) -> np.ndarray:
    """(len(prompts), len(SIGNAL_NAMES)) for a loaded device model, in padded batches."""
    import torch

    encoded = [prompt_ids(lm, p) for p in prompts]
    out = np.zeros((len(prompts), len(SIGNAL_NAMES)), dtype=np.float32)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = lm.tokenizer.eos_token_ids[0]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            cut = [encoded[i][:max_tokens] for i in idx]
            width = max(len(c) for c in cut)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, c in enumerate(cut):
                input_ids[r, : len(c)] = torch.tensor(c)
                mask[r, : len(c)] = 1
            # right padding: real positions see only real positions before them
            logits = lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            for r, i in enumerate(idx):
                out[i] = signals_from_logits(logits[r, : len(cut[r])], cut[r], len(encoded[i]))
    return out


__all__ = ["SIGNAL_NAMES", "signals_from_logits", "prefill_signals", "prompt_ids", "DEFAULT_MAX_TOKENS"]
