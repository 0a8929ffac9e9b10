"""Prefill attention on the CPU with NumPy's softmax.

MLX's CPU `exp` is one scalar call per element (~13 ns, Linux, MLX 0.32.4); NumPy's is vectorized (~0.7 ns).
In a prefill chunk the softmax over rows x keys scores is nearly all of attention: 330 query rows over 2,514
keys, 9 heads, take 91 ms a layer in mx.softmax. Here MLX computes the scores, NumPy the causal mask, max
and exp (two threads, into a reused buffer: a fresh 30 MB array costs more in page faults than the exp), and
MLX multiplies by V and divides by the sums. A prefill is not pipelined, so the sync per layer costs nothing
that matters; decode, verify and draft blocks keep the asynchronous path (engine/model/attention.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from engine.backend.unfused_attention import masked_scores

MIN_ROWS = 128  # query rows from which a forward is a prefill chunk (verify blocks and trees stay below)
THREADS = 2

_pool: ThreadPoolExecutor | None = None
_buffer = np.empty(0, np.float32)


def host_softmax_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
) -> mx.array:
    """softmax(scale · q kᵀ + mask) v, the softmax in NumPy; float32 throughout, as the CPU target runs."""
    rows = queries.shape[2]
    causal = isinstance(mask, str) and mask == "causal"
    scores = masked_scores(queries, keys, scale, None if causal else mask).astype(mx.float32)  # (B, Hkv, G*L, S)
    mx.eval(scores)
    s = np.asarray(scores)  # a view of MLX's buffer: read, never written
    weights = _take_buffer(s.shape)
    sums = np.empty((*s.shape[:-1], 1), np.float32)
    step = max(1, -(-s.shape[-2] // THREADS))  # stacked rows per thread
    parts = [(lo, min(lo + step, s.shape[-2])) for lo in range(0, s.shape[-2], step)]
    list(_threads().map(lambda part: _exp_rows(s, weights, sums, part, rows, causal), parts))
    # dividing the (G*L, D) product instead of the (G*L, S) weights saves a pass over the scores
    out = (mx.array(weights) @ values.astype(mx.float32)) / mx.array(sums)
    return out.astype(queries.dtype).reshape(queries.shape)  # (B, H, L, D)


def _exp_rows(s: np.ndarray, weights: np.ndarray, sums: np.ndarray, part: tuple[int, int], rows: int,
              causal: bool) -> None:
    """exp(s - rowmax) and the row sums for stacked rows [lo, hi) of every (batch, KV head)."""
    lo, hi = part
    src, dst = s[..., lo:hi, :], weights[..., lo:hi, :]
    if causal:  # the block's query i (stacked row g·L + i) sees keys up to S - L + i: only the last L columns hide
        tail = src.shape[-1] - rows
        hidden = (np.arange(rows)[None, :] > (np.arange(lo, hi) % rows)[:, None])  # (hi-lo, L)
        top = np.where(hidden, -np.inf, src[..., tail:]).max(axis=-1, keepdims=True)
        if tail:
            top = np.maximum(top, src[..., :tail].max(axis=-1, keepdims=True))
        np.subtract(src, top, out=dst)
        dst[..., tail:][..., hidden] = -np.inf
    else:
        np.subtract(src, src.max(axis=-1, keepdims=True), out=dst)
    np.exp(dst, out=dst)
    dst.sum(axis=-1, keepdims=True, out=sums[..., lo:hi, :])


def _take_buffer(shape: tuple[int, ...]) -> np.ndarray:
    global _buffer
    size = int(np.prod(shape))
    if _buffer.size < size:
        _buffer = np.empty(size, np.float32)
    return _buffer[:size].reshape(shape)


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="dflash-softmax")
    return _pool
