"""Attention of a query block (a verify block or a draft block) over a growing context.

Speculative decoding attends with 2..64 query rows over a key length that changes every cycle.
mx.fast.scaled_dot_product_attention is the right call on Metal. On MLX's CUDA
backend a multi-row query goes to a kernel planned per exact (query, key) shape: on an H200 (MLX
0.32.4) a 16-row SmolLM2-135M forward took 47 ms at a key length never seen before and 5.3 ms at a
repeated one, and the draft's forward 42 ms (bench/attention_shapes.py). The explicit composition
(engine/backend/unfused_attention.py: two matmuls and a float32 softmax) has no per-shape setup: 5.7 ms
and 1.4 ms; engine/backend/attention_kernel.py does the same in one CUDA kernel launch per layer
where its runtime check passes (4.9 ms and 1.5 ms).
On the CPU the explicit composition's softmax uses engine/backend/fast_exp.py (MLX's CPU exp is scalar): a
16-row verify 172 -> 155 ms, decode rows unchanged (68 ms), so the CPU takes it for 1..64 rows; a target's
prefill chunk of 128 rows or more takes NumPy's softmax there (engine/backend/host_softmax.py).
`DFLASH_ATTENTION` picks: auto (the kernel, else explicit, on CUDA for query blocks; explicit on the
CPU for up to 64 rows; fused elsewhere), fused, or unfused (explicit, never the kernel).
Prefill chunks (more than 64 rows) meet the same per-shape plan on CUDA: a request's last chunk has a
(rows, keys) shape of its own, and a prefix-cache hit's remainder always does. A layer that has not met a
chunk's shape before takes the explicit path; from its second sighting on, fused attention's plan pays
for itself (PrefillPlans). `DFLASH_PREFILL_ATTENTION=fused` turns that off.
A batched decode step (engine/decode/batch.py: one query row per request, rows left-padded to a shared
key length) passes its rows' first keys (`key_start`); on CUDA it takes the kernel's padded variant,
where the mask's array would send mx.fast to its unfused fallback: six kernels a layer, one of them a
cuBLAS call, instead of one (a CUPTI trace on an H200: 763 kernels for a 2-row step of the 135M model
against 640 for a 1-row one; bench/kernel_profile.py --batch 2 profiles such steps).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import mlx.core as mx

from engine.backend import attention_kernel, fast_exp
from engine.backend.host_softmax import MIN_ROWS as HOST_SOFTMAX_MIN_ROWS
from engine.backend.host_softmax import host_softmax_attention
from engine.backend.unfused_attention import unfused_attention

Mode = Literal["auto", "fused", "unfused"]
MODES: tuple[str, ...] = ("auto", "fused", "unfused")
ENV = "DFLASH_ATTENTION"
MAX_BLOCK_ROWS = 64  # query rows that count as a verify/draft block
PREFILL_ENV = "DFLASH_PREFILL_ATTENTION"  # auto (explicit at a layer's new chunk shape on CUDA) or fused
# The explicit path holds (B, H, L, S) float32 scores; past this the plan costs less than the memory traffic.
PREFILL_SCORES_BYTES = 256 << 20

_mode: Mode | None = None
_cuda: bool | None = None  # MLX's default device is a CUDA GPU (read once)
_cpu_kernel: object | None = None  # the quantized CPU kernel's extension, once a model runs on it


def use_cpu_kernel(ext: object | None) -> None:
    """Route float32 query blocks with no mask or a causal one through the CPU kernel's attention
    (kernels/cpu_quant): one pass per query row, the same for a row of a verify block as for a decode
    step (None: MLX's composition again)."""
    global _cpu_kernel
    _cpu_kernel = ext


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


class PrefillPlans:
    """The prefill-chunk shapes each target layer has met, so that fused attention runs only at shapes it
    has planned (or will plan once and reuse). Sightings are kept per layer because all of a forward's
    layers meet its shape at once: a layer's second sighting is a later forward."""

    MAX_SIGHTINGS = 1 << 16  # (layer, shape) pairs kept; a long-running server forgets them all past this

    def __init__(self) -> None:
        self._seen: set[tuple[object, ...]] = set()

    def explicit(self, site: object, queries: mx.array, keys: mx.array, mask: mx.array | str | None) -> bool:
        """Whether this chunk takes the explicit path: its shape is new at this layer and its scores fit."""
        b, heads, rows, _ = queries.shape
        if 4 * b * heads * rows * keys.shape[2] > PREFILL_SCORES_BYTES:
            return False
        shape = mask if isinstance(mask, str) or mask is None else (mask.dtype, tuple(mask.shape))
        key = (id(site), tuple(queries.shape), tuple(keys.shape), queries.dtype, shape)
        if key in self._seen:
            return False
        if len(self._seen) >= self.MAX_SIGHTINGS:
            self._seen.clear()
        self._seen.add(key)
        return True


_prefill_plans = PrefillPlans()
_tree: tuple[mx.array, mx.array] | None = None  # (mask, bit sets) of the tree forward under way


@contextmanager
def tree_bits(mask: mx.array, bits: mx.array) -> Iterator[None]:
    """While open, attention whose mask is this very `mask` (a draft tree's, engine/model/tree_attention.py)
    may read the rows' ancestor bit sets `bits` (T, 4) instead: the CUDA kernel's tree variant, one launch a
    layer where the explicit composition takes several. mlx-lm's own attention modules pass the mask on."""
    global _tree
    previous, _tree = _tree, (mask, bits)
    try:
        yield
    finally:
        _tree = previous


def _prefill_explicit(site: object | None, queries: mx.array, keys: mx.array, mask: mx.array | str | None) -> bool:
    if site is None or queries.shape[2] <= MAX_BLOCK_ROWS or mode() != "auto" or not _on_cuda():
        return False
    if os.environ.get(PREFILL_ENV, "auto").strip().lower() == "fused":
        return False
    return _prefill_plans.explicit(site, queries, keys, mask)


def block_attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None,
    prefill_on_host: bool = False, site: object | None = None, key_start: mx.array | None = None,
) -> mx.array:
    """softmax(scale · q kᵀ + mask) v with mx.fast's conventions (GQA, "causal", bool or additive masks).

    `prefill_on_host`: the caller is a target layer outside any gradient or compile trace, so a prefill chunk on
    the CPU may take NumPy's softmax (engine/backend/host_softmax.py).
    `site`: the calling layer (any object that lives as long as it), which lets a CUDA prefill chunk at a
    shape new to that layer skip fused attention's per-shape plan (PrefillPlans).
    `key_start`: (B,) a batched one-row step's first key per row (BatchKVCache.left_padding), for which
    `mask` is exactly key >= key_start."""
    if (_cpu_kernel is not None and (mask is None or isinstance(mask, str)) and key_start is None
            and queries.shape[2] <= MAX_BLOCK_ROWS and queries.dtype == keys.dtype == values.dtype == mx.float32
            and queries.shape[-1] % 16 == 0 and mode() == "auto" and not _on_cuda()):
        return _cpu_kernel.block_attention(queries, keys, values, scale, mask == "causal")
    if _tree is not None and mask is _tree[0] and mode() == "auto" and _on_cuda():
        kernel = attention_kernel.default_kernel()
        if (warps := kernel.tree_warps_for(queries, keys)) is not None:
            return kernel(queries, keys, values, scale, False, warps, bits=_tree[1])
    if key_start is not None and queries.shape[2] == 1 and mode() == "auto" and _on_cuda():
        kernel = attention_kernel.default_kernel()
        if (warps := kernel.padded_warps_for(queries, keys)) is not None:
            return kernel(queries, keys, values, scale, False, warps, start=key_start)
    if prefill_on_host and queries.shape[2] >= HOST_SOFTMAX_MIN_ROWS and mode() == "auto" and fast_exp.enabled():
        return host_softmax_attention(queries, keys, values, scale=scale, mask=mask)
    if _prefill_explicit(site, queries, keys, mask):
        return unfused_attention(queries, keys, values, scale=scale, mask=mask)
    if use_unfused(queries.shape[2]):
        if mode() == "auto" and _on_cuda():
            kernel = attention_kernel.default_kernel()
            if (warps := kernel.warps_for(queries, keys, mask)) is not None:
                return kernel(queries, keys, values, scale, mask == "causal", warps)
        return unfused_attention(queries, keys, values, scale=scale, mask=mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
