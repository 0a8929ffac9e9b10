"""Rotary position embeddings from a cached cos/sin table, for MLX's CPU backend.

MLX's CPU `mx.fast.rope` rebuilds its angles with scalar transcendental calls on every call: the 60
calls of a SmolLM2-135M forward (context 300, 2 cores, MLX 0.32.4) took 6.9 ms of a 40 ms decode
step and 9.7 ms at 16 rows. Slicing a table computed once (in float64, so at least as exact) and
rotating with one compiled kernel took 2.3 and 3.4 ms. Like engine/model/transposed.py it is a swap of an
exact type (nn.RoPE) at load time. A batch's per-row offsets (an array) read the same table inside
positions_below(); any other call (other widths, dtypes) goes to mx.fast.rope.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.model.tree_attention import rotate_rows

_MIN_POSITIONS = 4096


def _rotate_pairs(x0: mx.array, x1: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # (..., L, D/2, 2)


def _rotate_halves(x0: mx.array, x1: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return mx.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)  # (..., L, D)


# shapeless: one kernel whatever the rows and heads (a new shape would mean a new JIT compile)
_pairs = mx.compile(_rotate_pairs, shapeless=True)
_halves = mx.compile(_rotate_halves, shapeless=True)


class _Table:
    """cos and sin of every (position, frequency), grown by doubling; shared by every layer."""

    def __init__(self, dims: int, base: float, scale: float) -> None:
        self.inv_freq = base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)  # (D/2,)
        self.scale = scale
        self.cos = self.sin = mx.zeros((0, dims // 2), dtype=mx.float32)

    def rows(self, start: int, count: int) -> tuple[mx.array, mx.array]:
        end = start + count
        if end > self.cos.shape[0]:
            size = max(_MIN_POSITIONS, 1 << math.ceil(math.log2(end)))
            angles = (np.arange(size, dtype=np.float64) * self.scale)[:, None] * self.inv_freq[None]  # (P, D/2)
            self.cos = mx.array(np.cos(angles), dtype=mx.float32)
            self.sin = mx.array(np.sin(angles), dtype=mx.float32)
            mx.eval(self.cos, self.sin)
        return self.cos[start:end], self.sin[start:end]  # (L, D/2) each


_tables: dict[tuple[int, float, float], _Table] = {}
_bound: int | None = None  # set by positions_below(): array offsets read the table only inside it


@contextmanager
def positions_below(bound: int) -> Iterator[None]:
    """While open, array offsets (a batch's per-row positions) read the table, which covers [0, bound).

    The caller vouches for the bound (a BatchKVCache's write index): checking the offsets would sync.
    """
    global _bound
    previous, _bound = _bound, bound
    try:
        yield
    finally:
        _bound = previous


class TableRoPE(nn.Module):
    """nn.RoPE's rotation for float32 inputs at an integer offset, read from a shared table."""

    def __init__(self, rope: nn.RoPE) -> None:
        super().__init__()
        self.dims, self.traditional, self.base, self.scale = rope.dims, rope.traditional, rope.base, rope.scale
        key = (self.dims, float(self.base), float(self.scale))
        # a plain object, not an mx.array attribute: the table must not become a parameter
        self._table = _tables.setdefault(key, _Table(self.dims, float(self.base), float(self.scale)))

    def _extra_repr(self) -> str:
        return f"{self.dims}, traditional={self.traditional}, base={self.base}, scale={self.scale}, table"

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if x.shape[-1] != self.dims or x.dtype != mx.float32:
            return self._fast(x, offset)
        if type(offset) is int:
            return self._rotate(x, *self._table.rows(offset, x.shape[-2]))  # (L, D/2) each
        if _bound is not None and x.ndim == 4 and offset.shape == (x.shape[0],):
            # a batch's per-row offsets (mlx-lm's BatchKVCache): the same table rows a lone row reads
            self._table.rows(0, _bound)  # grows the table to cover every position of the batch
            positions = offset[:, None] + mx.arange(x.shape[-2])  # (B, L)
            return self._rotate(x, self._table.cos[positions][:, None], self._table.sin[positions][:, None])
        return self._fast(x, offset)

    def rotate_at(self, x: mx.array, positions: mx.array, end: int) -> mx.array:
        """Each row of x (..., T, D) at its own position, positions (T,) < end: a tree verify's rows."""
        if x.shape[-1] != self.dims or x.dtype != mx.float32:
            return rotate_rows(self._fast, x, positions)
        self._table.rows(0, end)  # grows the table to cover every position
        return self._rotate(x, self._table.cos[positions], self._table.sin[positions])

    def _fast(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset)

    def _rotate(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        half = self.dims // 2
        if self.traditional:  # rotated pairs are adjacent: (x0, x1), (x2, x3), ...
            pairs = x.reshape(*x.shape[:-1], half, 2)
            return _pairs(pairs[..., 0], pairs[..., 1], cos, sin).reshape(x.shape)
        return _halves(x[..., :half], x[..., half:], cos, sin)


def use_table_rope(model: nn.Module) -> int:
    """Swap every exact nn.RoPE of `model` for a TableRoPE; returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        for key, child in list(module.items()):
            if type(child) is nn.RoPE:
                module[key], swapped = TableRoPE(child), swapped + 1
    return swapped
