"""Block attention as plain ops: two matmuls and a float32 softmax, with no per-shape setup.

The explicit composition that engine/model/attention.py takes for query blocks on CUDA and the CPU,
and the reference that the CUDA kernel (engine/backend/attention_kernel.py) must beat to be chosen.
"""

from __future__ import annotations

import threading

import mlx.core as mx

from engine.backend import fast_exp


def unfused_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
) -> mx.array:
    """The same product as mx.fast.scaled_dot_product_attention, as plain ops (no per-shape plans)."""
    weights = fast_exp.softmax(masked_scores(queries, keys, scale, mask), axis=-1)  # float32 (precise off the CPU)
    return (weights @ values).reshape(queries.shape)  # (B, H, L, D)


def masked_scores(queries: mx.array, keys: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """scale · q kᵀ + mask as (B, Hkv, G*L, S): the G query heads of a KV head stack into one (G*L)-row
    product, so K and V are never broadcast (multiply the weights by V as (B, Hkv, S, D), reshape to (B, H, L, D))."""
    b, heads, rows, dim = queries.shape  # (B, H, L, D)
    kv_heads, length = keys.shape[1], keys.shape[2]  # keys, values: (B, Hkv, S, D)
    group = heads // kv_heads
    q = (queries * scale).reshape(b, kv_heads, group * rows, dim)  # (B, Hkv, G*L, D)
    scores = q @ keys.swapaxes(-1, -2)  # (B, Hkv, G*L, S)
    if mask is not None:
        mask = _stacked_mask(mask, rows, length, heads, kv_heads)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
        else:
            scores = scores + mask
    return scores


_causal: dict[tuple[int, int, int, int], mx.array] = {}


def _stacked_mask(mask: mx.array | str, rows: int, length: int, heads: int, kv_heads: int) -> mx.array:
    """A mask broadcastable to (B, H, L, S) as one broadcastable to (B, Hkv, G*L, S), G-major rows."""
    group = heads // kv_heads
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        # built once per forward (every layer asks for the same one), per thread: arrays are lazy
        key = (rows, length, group, threading.get_ident())
        if key not in _causal:
            _causal.clear()
            # the block's rows are the last `rows` positions of the key sequence
            causal = mx.arange(length)[None] <= mx.arange(length - rows, length)[:, None]  # (L, S)
            _causal[key] = mx.tile(causal, (group, 1))  # (G*L, S)
        return _causal[key]
    if mask.ndim < 3 or mask.shape[-3] == 1:  # the same for every head
        lead = mask.shape[:-3] if mask.ndim >= 3 else ()
        flat = mx.broadcast_to(mask, (*lead, *([1] if mask.ndim >= 3 else []), rows, length))
        return mx.tile(flat, (group, 1))  # (..., G*L, S)
    lead = mask.shape[:-3]
    per_head = mask.reshape(*lead, kv_heads, group, *mask.shape[-2:])  # (..., Hkv, G, L|1, S)
    per_head = mx.broadcast_to(per_head, (*lead, kv_heads, group, rows, length))
    return per_head.reshape(*lead, kv_heads, group * rows, length)
