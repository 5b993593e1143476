"""Prompt features for the learned query routers, as named blocks side by side.

    text     the domain-free surface features of routing/textfeatures.py (TEXT_FEATURES)
    minilm   the all-MiniLM-L6-v2 sentence embedding (routing/embed.py, 384 numbers)

A feature set names blocks joined by '+', always laid out in BLOCK_ORDER ("text+minilm": the
text features, then the embedding), so a scorer fitted on a set finds its columns at fixed
places; `take` cuts a set's columns out of a larger one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .textfeatures import TEXT_FEATURES, text_features_many

BLOCK_ORDER = ("text", "minilm")
BLOCK_WIDTH = {"text": len(TEXT_FEATURES), "minilm": 384}


def blocks(features: str) -> tuple[str, ...]:
    """The blocks of a feature set, in BLOCK_ORDER; an unknown block is a ValueError."""
    named = [b for b in features.split("+") if b]
    unknown = [b for b in named if b not in BLOCK_WIDTH]
    if unknown or not named:
        raise ValueError(f"unknown feature set '{features}' (blocks: {', '.join(BLOCK_ORDER)})")
    return tuple(b for b in BLOCK_ORDER if b in named)


def union(feature_sets: Sequence[str]) -> str:
    return "+".join(b for b in BLOCK_ORDER if any(b in blocks(f) for f in feature_sets))


def passthrough(features: str) -> int:
    """How many leading columns are hand-made features (kept as they are, never projected)."""
    return BLOCK_WIDTH["text"] if "text" in blocks(features) else 0


def take(X: np.ndarray, have: str, want: str) -> np.ndarray:
    """The columns of feature set `want` out of a matrix laid out as feature set `have`."""
    start, where = 0, {}
    for b in blocks(have):
        where[b] = slice(start, start + BLOCK_WIDTH[b])
        start += BLOCK_WIDTH[b]
    missing = [b for b in blocks(want) if b not in where]
    if missing:
        raise ValueError(f"feature set '{have}' has no block {', '.join(missing)}")
    return np.hstack([X[:, where[b]] for b in blocks(want)])


def prompt_features(
    prompts: Sequence[str], features: str, *, cache_dir: str | Path | None = None, use_cache: bool = False
) -> np.ndarray:
    """(len(prompts), width) float64 for a feature set; the embedding goes through the on-disk
    feature cache when asked (routing/cache.py)."""
    parts = []
    for b in blocks(features):
        if b == "text":
            parts.append(text_features_many(prompts))
        else:
            from .embed import embed, embed_cached

            cached = use_cache or cache_dir is not None
            parts.append(embed_cached(prompts, cache_dir=cache_dir) if cached else embed(prompts))
    return np.hstack(parts).astype(np.float64) if len(prompts) else np.zeros((0, sum(BLOCK_WIDTH[b] for b in blocks(features))))


__all__ = ["BLOCK_ORDER", "BLOCK_WIDTH", "blocks", "union", "passthrough", "take", "prompt_features"]
