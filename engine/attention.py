"""Attention of a query block (a verify block or a draft block) over a growing context.

Speculative decoding attends with 2..64 query rows over a key length that changes every cycle.
mx.fast.scaled_dot_product_attention is the right call on Metal. On MLX's CUDA
backend a multi-row query goes to a kernel planned per exact (query, key) shape: on an H200 (MLX
0.32.4) a 16-row SmolLM2-135M forward took 47 ms at a key length never seen before and 5.3 ms at a
repeated one, and the draft's forward 42 ms (bench/attention_shapes.py). The explicit composition
below (two matmuls and a float32 softmax) has no per-shape setup: 10.6 ms and 1.8 ms in that run (5.7 ms
and 1.4 ms in session 6's); engine/attention_kernel.py does the same in one CUDA kernel launch per layer
where its runtime check passes (4.9 ms and 1.5 ms there).
On the CPU the explicit composition's softmax uses engine/fast_exp.py (MLX's CPU exp is scalar): a
16-row verify 172 -> 155 ms, decode rows unchanged (68 ms), so the CPU takes it for 1..64 rows.
`DFLASH_ATTENTION` picks: auto (the kernel, else explicit, on CUDA for query blocks; explicit on the
CPU for up to 64 rows; fused elsewhere), fused, or unfused (explicit, never the kernel).
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import mlx.core as mx

from engine import attention_kernel, fast_exp

Mode = Literal["auto", "fused", "unfused"]
MODES: tuple[str, ...] = ("auto", "fused", "unfused")
ENV = "DFLASH_ATTENTION"
MAX_BLOCK_ROWS = 64  # query rows that count as a verify/draft block; prefill chunks stay fused

_mode: Mode | None = None
_cuda: bool | None = None  # MLX's default device is a CUDA GPU (read once)


def set_mode(mode: str | None) -> None:
    """Choose the attention path for this process (None: read DFLASH_ATTENTION again)."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    _mode = mode  # type: ignore[assignment]


def mode() -> Mode:
    if _mode is None:
        set_mode(os.environ.get(ENV, "auto").strip().lower() or "auto")
    assert _mode is not None
    return _mode


def _on_cuda() -> bool:
    global _cuda
    if _cuda is None:
        _cuda = mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()
    return _cuda


def use_unfused(query_rows: int) -> bool:
    chosen = mode()
    if chosen == "auto":
        if fast_exp.enabled():  # the CPU: decode and verify rows alike get the polynomial exp
            return query_rows <= MAX_BLOCK_ROWS
        return 1 < query_rows <= MAX_BLOCK_ROWS and _on_cuda()
    return chosen == "unfused" and query_rows > 1


def block_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
) -> mx.array:
    """softmax(scale · q kᵀ + mask) v with mx.fast's conventions (GQA, "causal", bool or additive masks)."""
    if use_unfused(queries.shape[2]):
        if mode() == "auto" and _on_cuda():
            kernel = attention_kernel.default_kernel()
            if (warps := kernel.warps_for(queries, keys, mask)) is not None:
                return kernel(queries, keys, values, scale, mask == "causal", warps)
        return unfused_attention(queries, keys, values, scale=scale, mask=mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def unfused_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
) -> mx.array:
    """The same product as mx.fast.scaled_dot_product_attention, as plain ops (no per-shape plans)."""
    b, heads, rows, dim = queries.shape  # (B, H, L, D)
    kv_heads, length = keys.shape[1], keys.shape[2]  # keys, values: (B, Hkv, S, D)
    group = heads // kv_heads
    # the G query heads of a KV head stack into one (G*L)-row product: K and V are never broadcast
    q = (queries * scale).reshape(b, kv_heads, group * rows, dim)  # (B, Hkv, G*L, D)
    scores = q @ keys.swapaxes(-1, -2)  # (B, Hkv, G*L, S)
    if mask is not None:
        mask = _stacked_mask(mask, rows, length, heads, kv_heads)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
        else:
            scores = scores + mask
    weights = fast_exp.softmax(scores, axis=-1)  # float32 softmax (mx.softmax(precise=True) off the CPU)
    return (weights @ values).reshape(b, heads, rows, dim)  # (B, H, L, D)


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
