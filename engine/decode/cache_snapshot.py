"""Private copies of a prompt cache: attention K/V rows, and recurrent states at exact lengths.

mlx-lm's KVCache writes new rows by slice assignment into a preallocated buffer and trims by moving
its offset back, so an array a snapshot keeps is never one a live cache holds: taking copies, and
restoring copies into fresh buffers. A recurrent layer (Gated DeltaNet, Mamba: mlx-lm's ArraysCache)
has no rows to cut; its state is valid only at the length it was taken at, so it is kept per length
(a checkpoint), and only those lengths can be restored.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache

LayerRows = tuple[mx.array, mx.array]  # keys, values: (1, n_kv_heads, n, head_dim) each
LayerStates = list[mx.array | None]  # an ArraysCache's contents (GDN: conv window, recurrent state)


def supports(cache: list[Any]) -> bool:
    """Plain KV caches and recurrent states only: rotating (sliding-window) and quantized caches keep
    rows in layouts a prefix cannot be cut from."""
    return all(type(c) is KVCache or isinstance(c, ArraysCache) for c in cache)


def has_recurrent_layers(cache: list[Any]) -> bool:
    return any(isinstance(c, ArraysCache) for c in cache)


def _private(x: mx.array) -> mx.array:
    return mx.array(x)  # a new buffer even when x is a slice of a live cache's buffer


def recurrent_states(cache: list[Any]) -> list[LayerStates | None]:
    """Copies of every recurrent layer's state (None for attention layers)."""
    states = [
        [None if a is None else _private(a) for a in c.cache] if isinstance(c, ArraysCache) else None
        for c in cache
    ]
    mx.eval([a for s in states if s for a in s if a is not None])
    return states


class CacheSnapshot:
    """K/V rows 0..length-1 of every attention layer, and recurrent states by checkpoint length."""

    def __init__(self, rows: list[LayerRows | None], checkpoints: dict[int, list[LayerStates | None]]) -> None:
        self.rows = rows  # per layer; None for a recurrent layer
        self.checkpoints = checkpoints  # length -> per layer states (None for attention layers)

    @classmethod
    def take(cls, cache: list[Any], length: int) -> CacheSnapshot:
        """Copy `cache`, which holds exactly `length` rows (its recurrent state is at that length)."""
        offsets = {c.offset for c in cache if type(c) is KVCache}
        assert offsets <= {length}, f"the cache holds {offsets} rows, the snapshot wants {length}"
        rows = [
            (_private(c.keys[..., :length, :]), _private(c.values[..., :length, :])) if type(c) is KVCache else None
            for c in cache
        ]
        mx.eval([a for r in rows if r for a in r])
        checkpoints = {length: recurrent_states(cache)} if has_recurrent_layers(cache) else {}
        return cls(rows, checkpoints)

    @staticmethod
    def estimate_nbytes(cache: list[Any], length: int) -> int:
        """What take(cache, length) would hold, without copying anything."""
        total = 0
        for c in cache:
            if type(c) is KVCache:
                total += (c.keys.nbytes + c.values.nbytes) * length // c.keys.shape[2]
            elif isinstance(c, ArraysCache):
                total += c.nbytes
        return total

    @property
    def is_recurrent(self) -> bool:
        return any(r is None for r in self.rows)

    @property
    def length(self) -> int:
        return next(r[0].shape[2] for r in self.rows if r is not None)

    @property
    def nbytes(self) -> int:
        rows = sum(a.nbytes for r in self.rows if r for a in r)
        states = sum(a.nbytes for layers in self.checkpoints.values() for s in layers if s for a in s if a is not None)
        return rows + states

    def can_restore(self, length: int) -> bool:
        return length <= self.length and (not self.is_recurrent or length in self.checkpoints)

    def restore(self, cache: list[Any], length: int, *, capacity: int) -> None:
        """Fill a fresh cache (the model's make_prompt_cache) with copies of the first `length` rows.

        K/V go into buffers of `capacity` rows (rounded up to KVCache.step, as a cold prefill of
        `capacity` tokens allocates), so the rest of the prompt is written without reallocating.
        """
        assert self.can_restore(length), f"no state at length {length}"
        states = self.checkpoints.get(length) or [None] * len(cache)
        capacity = -(-max(capacity, length) // KVCache.step) * KVCache.step
        fresh: list[mx.array] = []
        for c, rows, layer_states in zip(cache, self.rows, states):
            if rows is not None:
                c.keys, c.values = (_into_buffer(a, length, capacity) for a in rows)
                c.offset = length
                fresh += [c.keys, c.values]
            else:
                assert layer_states is not None
                for i, a in enumerate(layer_states):
                    c[i] = None if a is None else _private(a)
                if hasattr(c, "offset"):  # engine/model/recurrent_rollback.RecurrentCache counts rows
                    c.offset = length
                fresh += [a for a in c.cache if a is not None]
        mx.eval(fresh)  # a bad restore fails here, before the first token

    def absorb_checkpoints(self, other: CacheSnapshot, keep: int) -> None:
        """Take `other`'s recurrent checkpoints (a snapshot of a prefix of this one's rows), keeping
        the `keep` longest."""
        merged = {**other.checkpoints, **self.checkpoints}
        self.checkpoints = {n: merged[n] for n in sorted(merged)[-keep:]}


def _into_buffer(rows: mx.array, length: int, capacity: int) -> mx.array:
    buffer = mx.zeros((*rows.shape[:2], capacity, rows.shape[3]), dtype=rows.dtype)  # (1, n_kv_heads, capacity, d)
    buffer[..., :length, :] = rows[..., :length, :]
    return buffer
