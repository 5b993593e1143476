"""A small on-disk cache of per-prompt feature vectors (sentence embeddings, prefill signals).

Computing features is the slow part of evaluating a router on thousands of prompts, and the
features of a prompt never change for a given model, so they are kept by (namespace, prompt
hash) in one `.npz` file per namespace under $TANDEM_CACHE_DIR (default ~/.cache/tandem/routing).
A cache is only used where a caller asks for one (the CLI does; the library does not by default).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .data import prompt_hash


def default_cache_dir() -> Path:
    env = os.environ.get("TANDEM_CACHE_DIR")
    return Path(env) / "routing" if env else Path.home() / ".cache" / "tandem" / "routing"


class FeatureCache:
    """hash(prompt) -> float32 vector, for one namespace (e.g. 'minilm-l6-v2')."""

    def __init__(self, namespace: str, directory: str | Path | None = None) -> None:
        self.path = Path(directory or default_cache_dir()) / f"{namespace}.npz"
        self._data: dict[int, np.ndarray] = {}
        self._dirty = False
        if self.path.exists():
            try:
                with np.load(self.path) as z:
                    keys, values = z["keys"], z["values"]
                self._data = {int(k): v for k, v in zip(keys, values)}
            except (OSError, ValueError, KeyError):
                self._data = {}  # a damaged cache is rebuilt, never trusted

    def __len__(self) -> int:
        return len(self._data)

    def get_many(
        self, prompts: Sequence[str], compute: Callable[[list[str]], np.ndarray], *, save_every: int = 0
    ) -> np.ndarray:
        """Features for every prompt; `compute` is called once on the missing ones (in chunks of
        `save_every` with a save after each, when given, so a long run keeps its progress)."""
        hashes = [prompt_hash(p) for p in prompts]
        missing = list(dict.fromkeys(i for i, h in enumerate(hashes) if h not in self._data))
        chunk = save_every or max(1, len(missing))
        for start in range(0, len(missing), chunk):
            idx = missing[start : start + chunk]
            values = np.asarray(compute([prompts[i] for i in idx]), dtype=np.float32)
            for i, v in zip(idx, values):
                self._data[hashes[i]] = v
            self._dirty = True
            if save_every:
                self.save()
        self.save()
        return np.stack([self._data[h] for h in hashes]) if hashes else np.zeros((0, 0), np.float32)

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._data), dtype=np.uint64)
        values = np.stack(list(self._data.values())).astype(np.float32)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, keys=keys, values=values)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._dirty = False


__all__ = ["FeatureCache", "default_cache_dir"]
