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


def _rotate(x: mx.array, swapped: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    # swapped is x with each feature's rotation partner in its place and sin carries the sign, so
    # x0*cos + x1*(-sin) is bitwise x0*cos - x1*sin: one elementwise kernel, no halves to split and join
    return x * cos + swapped * sin


# shapeless: one kernel whatever the rows and heads (a new shape would mean a new JIT compile)
_rotated = mx.compile(_rotate, shapeless=True)


class _Table:
    """Per (position, feature) cos and signed sin, grown by doubling; shared by every layer.

    Laid out at full width, in the feature order of the rotation (halves, or adjacent pairs for
    `traditional`), with `partner` the index of each feature's partner.
    """

    def __init__(self, dims: int, base: float, scale: float, traditional: bool) -> None:
        self.inv_freq = base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)  # (D/2,)
        self.scale, self.traditional = scale, traditional
        half = np.arange(dims // 2)
        if traditional:  # (x0, x1), (x2, x3), ...
            partner = np.stack([2 * half + 1, 2 * half], axis=-1).reshape(-1)
        else:  # the other half
            partner = np.roll(np.arange(dims), dims // 2)
        self.partner = mx.array(partner.astype(np.int32))
        self.cos = self.sin = mx.zeros((0, dims), dtype=mx.float32)
        self._last: tuple[int, int, mx.array, mx.array] | None = None
        self._at: tuple[mx.array, mx.array, mx.array] | None = None  # (positions, cos, sin) of the last gather

    def rows(self, start: int, count: int) -> tuple[mx.array, mx.array]:
        end = start + count
        if end > self.cos.shape[0]:
            size = max(_MIN_POSITIONS, 1 << math.ceil(math.log2(end)))
            angles = (np.arange(size, dtype=np.float64) * self.scale)[:, None] * self.inv_freq[None]  # (P, D/2)
            cos, sin = np.cos(angles), np.sin(angles)
            if self.traditional:  # (x0, x1) pairs: cos, cos and -sin, sin interleaved
                cos, sin = np.repeat(cos, 2, axis=-1), np.stack([-sin, sin], axis=-1).reshape(size, -1)
            else:
                cos, sin = np.concatenate([cos, cos], axis=-1), np.concatenate([-sin, sin], axis=-1)
            self.cos, self.sin = mx.array(cos, dtype=mx.float32), mx.array(sin, dtype=mx.float32)
            mx.eval(self.cos, self.sin)
            self._last = self._at = None
        if self._last is None or self._last[:2] != (start, count):
            # every layer of a forward reads the same rows: one pair of slices in the graph, not one per layer
            self._last = (start, count, self.cos[start:end], self.sin[start:end])
        return self._last[2], self._last[3]  # (L, D) each

    def at(self, positions: mx.array, end: int) -> tuple[mx.array, mx.array]:
        """cos and sin at each of `positions` (T,) < end, gathered once for all the layers of a forward."""
        self.rows(0, end)  # grows the table to cover every position
        if self._at is None or self._at[0] is not positions:
            self._at = (positions, self.cos[positions], self.sin[positions])
        return self._at[1], self._at[2]

    def rotate(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        return _rotated(x, mx.take(x, self.partner, axis=-1), cos, sin)


_tables: dict[tuple[int, float, float, bool], _Table] = {}
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
        key = (self.dims, float(self.base), float(self.scale), bool(self.traditional))
        # a plain object, not an mx.array attribute: the table must not become a parameter
        if key not in _tables:
            _tables[key] = _Table(*key)
        self._table = _tables[key]

    def _extra_repr(self) -> str:
        return f"{self.dims}, traditional={self.traditional}, base={self.base}, scale={self.scale}, table"

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if x.shape[-1] != self.dims or x.dtype != mx.float32:
            return self._fast(x, offset)
        if type(offset) is int:
            return self._table.rotate(x, *self._table.rows(offset, x.shape[-2]))  # (L, D) each
        if _bound is not None and x.ndim == 4 and offset.shape == (x.shape[0],):
            # a batch's per-row offsets (mlx-lm's BatchKVCache): the same table rows a lone row reads
            self._table.rows(0, _bound)  # grows the table to cover every position of the batch
            positions = offset[:, None] + mx.arange(x.shape[-2])  # (B, L)
            return self._table.rotate(x, self._table.cos[positions][:, None], self._table.sin[positions][:, None])
        return self._fast(x, offset)

    def rows(self, offset: int, count: int) -> tuple[mx.array, mx.array]:
        """The table's cos and sin (count, D) from position `offset` on, for rotate_with."""
        return self._table.rows(offset, count)

    def rotate_with(self, x: mx.array, offset: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """This call at an offset whose rows() the caller read: no int offset, so an `mx.compile` trace holds
        (engine/model/compiled_layer.py); `offset` serves inputs the table does not cover."""
        if x.shape[-1] != self.dims or x.dtype != mx.float32:
            return self._fast(x, offset)
        return self._table.rotate(x, cos, sin)

    def rotate_at(self, x: mx.array, positions: mx.array, end: int) -> mx.array:
        """Each row of x (..., T, D) at its own position, positions (T,) < end: a tree verify's rows."""
        if x.shape[-1] != self.dims or x.dtype != mx.float32:
            return rotate_rows(self._fast, x, positions)
        return self._table.rotate(x, *self._table.at(positions, end))

    def _fast(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset)


def use_table_rope(model: nn.Module) -> int:
    """Swap every exact nn.RoPE of `model` for a TableRoPE; returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        for key, child in list(module.items()):
            if type(child) is nn.RoPE:
                module[key], swapped = TableRoPE(child), swapped + 1
    return swapped
