"""llama.cpp's per-sequence KV state (`llama_state_seq_get_data` / `_set_data`), read and written.

The bytes are those of the pinned llama.cpp's KV cache (`llama_kv_cache::state_write`):

    u64 tag      (constant in this build, over models and contexts; kept as read)
    u32 n_stream
    per stream:  u32 cell_count, and when it is not 0:
        cell_count x (i32 pos, u32 n_seq_id, n_seq_id x i32 seq_id)
        u32 v_trans, u32 n_layer
        n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows)
        v_trans 0: n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
        v_trans 1: n_layer x (i32 v_type, u32 v_elem_bytes, u32 n_embd_v, n_embd_v x cell_count elems)

A key row is one cell: the heads one after another, each `head_dim` values after RoPE. Reading is
strict (every byte accounted for, one sequence per cell, f16 or f32 only), so a state written by
another llama.cpp build fails here with a message rather than being misread. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...protocols.errors import BackendUnavailable

# ggml_type ids of the KV types this reads and writes
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}


@dataclass
class KVState:
    """One sequence's cells: positions, and per layer its keys and values as (cells, width)."""

    tag: int  # the leading u64, written back as llama.cpp wrote it
    n_stream: int
    stream: int  # the stream that holds the cells
    v_trans: bool
    k_type: int
    v_type: int
    positions: np.ndarray  # int32 (cells,)
    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def like(self, positions: np.ndarray, keys: list[np.ndarray], values: list[np.ndarray]) -> "KVState":
        """Other cells in this state's layout (stream, types, V transposition)."""
        kd, vd = _DTYPES[self.k_type], _DTYPES[self.v_type]
        return KVState(self.tag, self.n_stream, self.stream, self.v_trans, self.k_type, self.v_type,
                       np.asarray(positions, dtype="<i4"), [np.ascontiguousarray(k, dtype=kd) for k in keys],
                       [np.ascontiguousarray(v, dtype=vd) for v in values])


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.at = memoryview(buf), 0

    def take(self, dtype: str, count: int = 1) -> np.ndarray:
        dt = np.dtype(dtype)
        end = self.at + dt.itemsize * count
        if end > len(self.buf):
            raise BackendUnavailable(f"llama.cpp sequence state ends at byte {len(self.buf)}, expected more at {self.at}")
        out = np.frombuffer(self.buf[self.at : end], dtype=dt, count=count)
        self.at = end
        return out

    def one(self, dtype: str) -> int:
        return int(self.take(dtype)[0])


def _dtype(type_id: int, what: str) -> np.dtype:
    if type_id not in _DTYPES:
        raise BackendUnavailable(f"llama.cpp keeps its {what} cache as ggml type {type_id}; only f16 and f32 are supported")
    return _DTYPES[type_id]


def read_state(buf: bytes) -> KVState:
    """Parse one sequence's state; raises `BackendUnavailable` when it is not in this layout."""
    r = _Reader(buf)
    tag, n_stream = r.one("<u8"), r.one("<u4")
    if not 1 <= n_stream <= 64:
        raise BackendUnavailable(f"llama.cpp sequence state: {n_stream} streams is not a plausible layout")
    found: KVState | None = None
    for s in range(n_stream):
        cells = r.one("<u4")
        if cells == 0:
            continue
        if found is not None:
            raise BackendUnavailable("llama.cpp sequence state holds cells in more than one stream")
        positions = np.empty(cells, dtype="<i4")
        for i in range(cells):
            positions[i] = r.one("<i4")
            n_seq = r.one("<u4")
            if n_seq != 1:
                raise BackendUnavailable(f"llama.cpp sequence state: cell {i} belongs to {n_seq} sequences, expected 1")
            r.one("<i4")
        v_trans, n_layer = r.one("<u4"), r.one("<u4")
        if v_trans not in (0, 1) or not 1 <= n_layer <= 1024:
            raise BackendUnavailable(f"llama.cpp sequence state: v_trans {v_trans}, {n_layer} layers is not this layout")
        keys, k_types = [], set()
        for _ in range(n_layer):
            k_type, row = r.one("<i4"), r.one("<u8")
            dt = _dtype(k_type, "key")
            if row % dt.itemsize:
                raise BackendUnavailable(f"llama.cpp sequence state: key rows of {row} bytes for ggml type {k_type}")
            keys.append(r.take(dt.str, cells * (row // dt.itemsize)).reshape(cells, -1))
            k_types.add(k_type)
        values, v_types = [], set()
        for _ in range(n_layer):
            v_type = r.one("<i4")
            dt = _dtype(v_type, "value")
            if v_trans:
                elem, width = r.one("<u4"), r.one("<u4")
                if elem != dt.itemsize:
                    raise BackendUnavailable(f"llama.cpp sequence state: {elem}-byte values for ggml type {v_type}")
                values.append(r.take(dt.str, width * cells).reshape(width, cells).T)
            else:
                row = r.one("<u8")
                values.append(r.take(dt.str, cells * (row // dt.itemsize)).reshape(cells, -1))
            v_types.add(v_type)
        if len(k_types) != 1 or len(v_types) != 1:
            raise BackendUnavailable("llama.cpp sequence state: layers with different cache types are not supported")
        found = KVState(tag, n_stream, s, bool(v_trans), k_types.pop(), v_types.pop(), positions, keys, values)
    if r.at != len(r.buf):
        raise BackendUnavailable(f"llama.cpp sequence state has {len(r.buf) - r.at} bytes after its last layer")
    if found is None:
        raise BackendUnavailable("llama.cpp sequence state holds no cells")
    return found


def write_state(state: KVState, seq_id: int = 0) -> bytes:
    """The bytes `llama_state_seq_set_data` reads back as `state`."""
    parts: list[bytes] = [np.uint64(state.tag).tobytes(), np.uint32(state.n_stream).tobytes()]
    cells = len(state.positions)
    for s in range(state.n_stream):
        parts.append(np.uint32(cells if s == state.stream else 0).tobytes())
        if s != state.stream:
            continue
        meta = np.zeros((cells, 3), dtype="<i4")
        meta[:, 0], meta[:, 1], meta[:, 2] = state.positions, 1, seq_id
        parts += [meta.tobytes(), np.array([int(state.v_trans), state.n_layers], dtype="<u4").tobytes()]
        kd, vd = _dtype(state.k_type, "key"), _dtype(state.v_type, "value")
        for k in state.keys:
            k = np.ascontiguousarray(k, dtype=kd)
            parts += [np.int32(state.k_type).tobytes(), np.uint64(k.shape[1] * kd.itemsize).tobytes(), k.tobytes()]
        for v in state.values:
            v = np.ascontiguousarray(v, dtype=vd)
            parts.append(np.int32(state.v_type).tobytes())
            if state.v_trans:
                parts += [np.array([vd.itemsize, v.shape[1]], dtype="<u4").tobytes(), np.ascontiguousarray(v.T).tobytes()]
            else:
                parts += [np.uint64(v.shape[1] * vd.itemsize).tobytes(), v.tobytes()]
    return b"".join(parts)


def rope_to_llama_cpp(rows: np.ndarray, head_dim: int, neox: bool) -> np.ndarray:
    """Key rows (cells, heads x head_dim) from transformers' rotate-half order to llama.cpp's: the
    same for NeoX-style graphs (Qwen2), adjacent pairs (2i, 2i + 1) for Llama's, whose converter
    permuted the projection rows the same way."""
    if neox:
        return rows
    cells = rows.shape[0]
    return rows.reshape(cells, -1, 2, head_dim // 2).swapaxes(2, 3).reshape(cells, -1)


__all__ = ["KVState", "read_state", "write_state", "rope_to_llama_cpp"]
