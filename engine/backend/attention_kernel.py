"""Block attention as one CUDA kernel per layer (kernels/block_attention.cu), chosen at runtime.

On MLX's CUDA backend a 2..64-row query block otherwise takes the explicit composition
(engine/backend/unfused_attention.py): on an H200 (MLX 0.32.4) a 16-row SmolLM2-135M forward costs
5.7 ms with it and 4.9 ms with this kernel (bench/attention_shapes.py); mx.fast's fused attention
takes 5.3 ms at a key length seen before and 47 ms at a new one, which every speculative cycle meets. The kernel takes any key length and strided K/V (a cache's prefix)
without a per-shape plan. Whether it runs is decided per (device, dtype, head dim, heads, KV heads,
causal) at first use: numerics against the float32 explicit composition, then speed against the
explicit composition at a 16-row block over 512 keys; a kernel that is wrong or slower is never used.
Only "causal" and no mask are covered; array masks (training, sliding windows) stay explicit.
A draft tree's verify (engine/decode/tree.py) is a spec of its own, `tree`: block rows see the keys
before the block and, within it, the rows their bit sets name (ancestors and self); the kernel must beat
the explicit composition with the equivalent bool mask at TREE_TIMING_SHAPE.
A one-token decode step over a left-padded batch (mlx-lm's BatchKVCache) is a separate spec, `padded`:
row b sees keys from start[b] on, and the kernel must beat mx.fast's attention with the equivalent
(B, 1, 1, S) bool mask at DECODE_TIMING_SHAPE (engine/train/generator.py uses it).
DFLASH_ATTENTION=unfused or fused turns the kernel off (engine/model/attention.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.backend.kernel_choice import pick_fastest
from engine.backend.unfused_attention import unfused_attention
from engine.backend.verify_matmul import detect_backend, read_kernel_source, time_ms

log = logging.getLogger("dflash.attention_kernel")

HEAD_DIMS = (64, 128)
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
# Warps per block tried, fastest correct kept; each lane holds a query row of D floats, so D=128
# stays at <= 256 threads (255 registers a thread). GROUPED (0) is the kernel's other work split: a block
# per KV head and query row, a warp per query head of its group (up to MAX_GROUP), K/V tiles shared.
GROUPED = 0
MAX_GROUP = 8
WARPS: dict[int, tuple[int, ...]] = {64: (GROUPED, 4, 8), 128: (GROUPED, 4, 8)}
# max|kernel - float32 reference| / max|reference|: float32 accumulation, one rounding at the end
TOLERANCE = {mx.float32: 2e-3, mx.float16: 2e-3, mx.bfloat16: 1.2e-2}  # float32: the reference is TF32 on CUDA
CHECK_SHAPES = ((16, 300), (3, 37), (64, 64), (2, 1000))  # (query rows, keys): tails, L = S, long rows
TIMING_SHAPE = (16, 512)
# padded decode, (batch rows, keys): each batch's starts include 0 and S - 1 (one key seen)
DECODE_CHECK_SHAPES = ((5, 37), (3, 300), (2, 1000))
DECODE_TIMING_SHAPE = (256, 384)  # starts in [0, 64), as a sorted wave of prompts pads
DECODE_WARPS: dict[int, tuple[int, ...]] = {64: (GROUPED, 2, 4, 8), 128: (GROUPED, 4, 8)}  # few keys a row: fewer warps may win
MAX_TREE_ROWS = 128  # a tree's rows: root + nodes, 4 words of ancestor bits
TREE_CHECK_SHAPES = ((9, 40), (33, 300), (65, 1000), (128, 200))  # (tree rows, keys): the last has 72 before it
TREE_TIMING_SHAPE = (33, 512)


@dataclass(frozen=True)
class AttentionSpec:
    """What a kernel decision depends on besides the device."""

    dtype: mx.Dtype
    head_dim: int
    heads: int
    kv_heads: int
    causal: bool
    padded: bool = False  # one query row per batch row, keys from a per-row start (left padding)
    tree: bool = False  # a draft tree's rows: block keys by each row's ancestor bits


@dataclass(frozen=True)
class Decision:
    warps: int | None  # None: use the explicit composition
    kernel_ms: float
    reference_ms: float
    max_rel_error: float
    reason: str
    correct_warps: int | None = None  # the fastest warp count that passed numerics, chosen or not


Kernel = Callable[..., mx.array]  # (q, k, v, scale, causal, warps, start=None, bits=None) -> (B, H, L, D)
Reference = Callable[..., mx.array]  # (q, k, v, scale, causal, start=None, mask=None) -> (B, H, L, D)


def make_cuda_kernel() -> Kernel:
    """The launcher for kernels/block_attention.cu: (q, k, v, scale, causal, warps, start=None, bits=None) ->
    (B, H, L, D); with `start` (B,) row b attends to keys start[b] .. S-1 only (the PADDED variant); with `bits`
    (L, 4) uint32 the block's keys are seen by their bits (the TREE variant)."""
    header, body = read_kernel_source("block_attention.cu")
    kernel = mx.fast.cuda_kernel(name="dflash_block_attention",
                                 input_names=["q", "k", "v", "scale", "start", "bits"],
                                 output_names=["out"], source=body, header=header,
                                 ensure_row_contiguous=False)  # strides are read; a cache prefix is not copied
    no_start = mx.zeros((1,), dtype=mx.int32)  # never read by the unpadded variant
    no_bits = mx.zeros((1, 4), dtype=mx.uint32)  # never read but by the tree variant

    def launch(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool,
               warps: int, start: mx.array | None = None, bits: mx.array | None = None) -> mx.array:
        b, heads, rows, dim = queries.shape
        grouped = warps == GROUPED
        if grouped:  # a block per KV head: a warp per query head of its group
            warps = heads // keys.shape[1]
            if warps > MAX_GROUP:
                raise ValueError(f"GROUPED covers up to {MAX_GROUP} query heads a KV head, not {warps}")
        # Every template value is in the kernel's name, which is what MLX caches compiled code by.
        template = [("T", queries.dtype), ("D", dim), ("CAUSAL", causal), ("PADDED", start is not None),
                    ("TREE", bits is not None), ("GROUPED", grouped), ("WARPS", warps)]
        starts = no_start if start is None else start.astype(mx.int32)
        (out,) = kernel(inputs=[queries, keys, values, mx.array([scale], dtype=mx.float32), starts,
                                no_bits if bits is None else bits],
                        template=template,
                        grid=((keys.shape[1] if grouped else heads) * warps * 32, rows, b),
                        threadgroup=(warps * 32, 1, 1),
                        output_shapes=[(b, rows, heads, dim)], output_dtypes=[queries.dtype])
        return out.transpose(0, 2, 1, 3)  # (B, H, L, D), a view: the caller's transpose back is free

    return launch


def float32_reference(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool,
                      start: mx.array | None = None, mask: mx.array | None = None) -> mx.array:
    """softmax(scale q kᵀ) v in float32, causal over the context's last L positions, batch row b over
    keys start[b] .. S-1 when `start` is given, where the bool `mask` (L, S) holds when given: the oracle."""
    q, k, v = (x.astype(mx.float32) for x in (queries, keys, values))
    group = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, group, axis=1), mx.repeat(v, group, axis=1)  # (B, H, S, D)
    scores = (q * scale) @ k.swapaxes(-1, -2)  # (B, H, L, S)
    if causal:
        rows, length = q.shape[2], k.shape[2]
        keep = mx.arange(length)[None] <= mx.arange(length - rows, length)[:, None]  # (L, S)
        scores = mx.where(keep, scores, -mx.inf)
    if start is not None:
        scores = mx.where(padding_mask(start, k.shape[2]), scores, -mx.inf)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


def padding_mask(start: mx.array, length: int) -> mx.array:
    """(B, 1, 1, S) bool: key j is seen by batch row b iff j >= start[b] (BatchKVCache.make_mask at N = 1)."""
    return mx.arange(length)[None, None, None, :] >= start[:, None, None, None]


def tree_bits(ancestors: np.ndarray) -> np.ndarray:
    """(T, T) bool -> (T, 4) uint32, the TREE variant's mask: bit j % 32 of word j // 32 of row i is
    ancestors[i, j] (row j is row i or one of its ancestors)."""
    rows = ancestors.shape[0]
    assert rows <= MAX_TREE_ROWS and ancestors.shape[1] == rows, ancestors.shape
    padded = np.zeros((rows, MAX_TREE_ROWS), dtype=np.uint64)
    padded[:, :rows] = ancestors
    weights = np.uint64(1) << (np.arange(MAX_TREE_ROWS, dtype=np.uint64) % np.uint64(32))
    return (padded * weights).reshape(rows, 4, 32).sum(axis=-1).astype(np.uint32)


def tree_mask_of(ancestors: np.ndarray | mx.array, length: int) -> mx.array:
    """(T, S) bool: the keys before the block, then the block's rows by `ancestors` (what TREE computes)."""
    rows = ancestors.shape[0]
    return mx.concatenate([mx.ones((rows, length - rows), dtype=mx.bool_), mx.array(ancestors)], axis=1)


def random_ancestors(rows: int, seed: int) -> np.ndarray:
    """A random tree's (rows, rows) ancestor-or-self matrix; row 0 the root, parents before children."""
    rng = np.random.default_rng(seed)
    out = np.eye(rows, dtype=bool)
    for row in range(1, rows):
        out[row] |= out[int(rng.integers(0, row))]
    return out


class BlockAttentionKernel:
    """Attention of a 2..64-row block, or of a padded decode step, through the CUDA kernel where the
    runtime checks allow it."""

    def __init__(self, kernel: Kernel | None = None, reference: Reference | None = None,
                 backend: str | None = None, timer: Callable[[Callable[[], mx.array]], float] = time_ms) -> None:
        self.backend = backend or detect_backend()
        if kernel is None and self.backend == "cuda":
            kernel = make_cuda_kernel()
        self.kernel = kernel if self.backend == "cuda" else None
        self.reference = reference
        self.timer = timer
        self.device_name = str(mx.device_info().get("device_name", self.backend))
        self.decisions: dict[AttentionSpec, Decision] = {}
        # True: block specs whose kernel lost when timed alone run it anyway. A forward bound by launching
        # kernels (MLX-CUDA's, ~10-15 us of host time each) pays ~6 launches for the explicit composition
        # and one for the kernel; engine/backend/verify_kernels.py sets this where a whole forward is faster.
        self.in_forward = False

    def spec_for(self, queries: mx.array, keys: mx.array, mask: mx.array | str | None) -> AttentionSpec | None:
        """The kernel's view of a call, or None where the kernel does not cover it."""
        if self.kernel is None or not (mask is None or isinstance(mask, str) and mask == "causal"):
            return None
        b, heads, rows, dim = queries.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        if dim not in HEAD_DIMS or queries.dtype not in FLOATS or keys.dtype != queries.dtype:
            return None
        if heads % kv_heads or (mask == "causal" and length < rows):
            return None
        return AttentionSpec(queries.dtype, dim, heads, kv_heads, mask == "causal")

    def warps_for(self, queries: mx.array, keys: mx.array, mask: mx.array | str | None) -> int | None:
        """Warps per block for this call, or None for the explicit composition."""
        spec = self.spec_for(queries, keys, mask)
        if spec is None:
            return None
        decision = self.decide(spec)
        return decision.correct_warps if decision.warps is None and self.in_forward else decision.warps

    def lost_alone(self) -> list[AttentionSpec]:
        """Block specs whose kernel passed numerics but lost when timed alone: what `in_forward` would run."""
        return [spec for spec, d in self.decisions.items()
                if d.warps is None and d.correct_warps is not None and not (spec.padded or spec.tree)]

    def padded_spec_for(self, queries: mx.array, keys: mx.array) -> AttentionSpec | None:
        """The kernel's view of a one-row decode step with per-row key starts, or None if not covered."""
        b, heads, rows, dim = queries.shape
        if self.kernel is None or rows != 1 or dim not in HEAD_DIMS or queries.dtype not in FLOATS:
            return None
        if keys.dtype != queries.dtype or heads % keys.shape[1]:
            return None
        return AttentionSpec(queries.dtype, dim, heads, keys.shape[1], False, padded=True)

    def padded_warps_for(self, queries: mx.array, keys: mx.array) -> int | None:
        """Warps per block for a padded decode step, or None for mx.fast's masked attention."""
        spec = self.padded_spec_for(queries, keys)
        return None if spec is None else self.decide(spec).warps

    def tree_warps_for(self, queries: mx.array, keys: mx.array) -> int | None:
        """Warps per block for a tree verify's attention (TREE variant), or None for the explicit composition."""
        b, heads, rows, dim = queries.shape
        if self.kernel is None or b != 1 or rows > MAX_TREE_ROWS or keys.shape[2] < rows:
            return None
        if dim not in HEAD_DIMS or queries.dtype not in FLOATS or keys.dtype != queries.dtype or heads % keys.shape[1]:
            return None
        return self.decide(AttentionSpec(queries.dtype, dim, heads, keys.shape[1], False, tree=True)).warps

    def __call__(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool,
                 warps: int, start: mx.array | None = None, bits: mx.array | None = None) -> mx.array:
        assert self.kernel is not None
        if start is None and bits is None:
            return self.kernel(queries, keys, values, scale, causal, warps)
        if bits is None:
            return self.kernel(queries, keys, values, scale, causal, warps, start=start)
        return self.kernel(queries, keys, values, scale, causal, warps, bits=bits)

    def decide(self, spec: AttentionSpec) -> Decision:
        """The cached choice for `spec` on this device; checked and logged on first use."""
        if spec not in self.decisions:
            decision = self._check(spec)
            self.decisions[spec] = decision
            log.info("block attention on %s, %s: %s (%s; kernel %.3f ms, reference %.3f ms, max rel err %.2g)",
                     self.device_name, spec_name(spec), "reference" if decision.warps is None else "kernel " + describe_warps(decision.warps),
                     decision.reason, decision.kernel_ms, decision.reference_ms, decision.max_rel_error)
        return self.decisions[spec]

    def summary(self) -> dict[str, dict[str, object]]:
        """The decisions made so far, by a readable name (for benchmark reports)."""
        return {spec_name(spec): {"warps": d.warps, "kernel_ms": d.kernel_ms, "explicit_ms": d.reference_ms,
                 "max_rel_error": d.max_rel_error, "reason": d.reason} for spec, d in self.decisions.items()}

    def _check(self, spec: AttentionSpec) -> Decision:
        assert self.kernel is not None
        if spec.padded:
            return self._check_padded(spec)
        if spec.tree:
            return self._check_tree(spec)
        reference = self.reference or _explicit
        q, k, v = random_block(spec, *TIMING_SHAPE)
        scale = spec.head_dim**-0.5
        ref_ms = self.timer(lambda: reference(q, k, v, scale, spec.causal))
        return self._pick(spec, WARPS[spec.head_dim], ref_ms, "block attention",
                          lambda w: self.kernel(q, k, v, scale, spec.causal, w))

    def _check_padded(self, spec: AttentionSpec) -> Decision:
        """Numerics over DECODE_CHECK_SHAPES, then speed against the masked reference (mx.fast by default)."""
        assert self.kernel is not None
        batch, length = DECODE_TIMING_SHAPE
        q, k, v = random_block(spec, 1, length, batch=batch)
        start = mx.random.randint(0, 64, (batch,), key=mx.random.key(batch)).astype(mx.int32)
        mask = padding_mask(start, length)
        scale = spec.head_dim**-0.5
        mx.eval(start, mask)
        if self.reference is None:
            ref_ms = self.timer(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))
        else:
            ref_ms = self.timer(lambda: self.reference(q, k, v, scale, False, start=start))
        return self._pick(spec, DECODE_WARPS[spec.head_dim], ref_ms, "padded decode attention",
                          lambda w: self.kernel(q, k, v, scale, False, w, start=start))

    def _check_tree(self, spec: AttentionSpec) -> Decision:
        """Numerics over TREE_CHECK_SHAPES, then speed against the explicit composition with the bool mask."""
        assert self.kernel is not None
        rows, length = TREE_TIMING_SHAPE
        q, k, v = random_block(spec, rows, length)
        ancestors = random_ancestors(rows, rows)
        bits, mask = mx.array(tree_bits(ancestors)), tree_mask_of(ancestors, length)
        scale = spec.head_dim**-0.5
        mx.eval(bits, mask)
        if self.reference is None:
            ref_ms = self.timer(lambda: unfused_attention(q, k, v, scale=scale, mask=mask[None, None]))
        else:
            ref_ms = self.timer(lambda: self.reference(q, k, v, scale, False, mask=mask))
        return self._pick(spec, WARPS[spec.head_dim], ref_ms, "tree attention",
                          lambda w: self.kernel(q, k, v, scale, False, w, bits=bits))

    def _pick(self, spec: AttentionSpec, warps: tuple[int, ...], ref_ms: float, what: str,
              run: Callable[[int], mx.array]) -> Decision:
        """The fastest warp count whose numerics pass, if it beats the reference's `ref_ms`."""
        pick = pick_fastest(
            warps, tolerance=TOLERANCE[spec.dtype], reference_ms=ref_ms, noun="warp count",
            describe=describe_warps, what=f"{what} {spec}",
            max_rel_error=lambda w: self.max_rel_error(spec, w), time_ms=lambda w: self.timer(lambda: run(w)))
        return Decision(pick.variant, pick.kernel_ms, ref_ms, pick.max_rel_error, pick.reason, pick.correct)

    def max_rel_error(self, spec: AttentionSpec, warps: int) -> float:
        """Worst max|kernel - float32 reference| / max|reference| over CHECK_SHAPES (DECODE_CHECK_SHAPES when
        padded), strided keys included."""
        assert self.kernel is not None
        errors = []
        scale = spec.head_dim**-0.5
        shapes = DECODE_CHECK_SHAPES if spec.padded else TREE_CHECK_SHAPES if spec.tree else CHECK_SHAPES
        for rows, length in shapes:
            if spec.tree:
                q, k, v = random_block(spec, rows, length, spare=7)
                ancestors = random_ancestors(rows, length)
                got = self.kernel(q, k, v, scale, False, warps, bits=mx.array(tree_bits(ancestors)))
                ref = float32_reference(q, k, v, scale, False, mask=tree_mask_of(ancestors, length))
            elif spec.padded:  # `rows` batch rows of one query each
                q, k, v = random_block(spec, 1, length, spare=7, batch=rows)
                start = check_starts(rows, length)
                got = self.kernel(q, k, v, scale, False, warps, start=start)
                ref = float32_reference(q, k, v, scale, False, start=start)
            else:
                q, k, v = random_block(spec, rows, length, spare=7)
                got = self.kernel(q, k, v, scale, spec.causal, warps)
                ref = float32_reference(q, k, v, scale, spec.causal)
            got = got.astype(mx.float32)
            errors.append(mx.max(mx.abs(got - ref)) / mx.maximum(mx.max(mx.abs(ref)), 1e-6))
        values = [e.item() for e in errors]
        return float("nan") if any(x != x for x in values) else max(values)


def describe_warps(warps: int) -> str:
    return "grouped (a warp per query head of a KV group)" if warps == GROUPED else f"{warps} warps"


def spec_name(spec: AttentionSpec) -> str:
    kind = ("causal" if spec.causal else "tree" if spec.tree else "full") + (" padded" if spec.padded else "")
    return f"{spec.dtype} D={spec.head_dim} heads {spec.heads}/{spec.kv_heads} {kind}"


def check_starts(batch: int, length: int) -> mx.array:
    """Key starts for a numerics check: 0, S - 1 (a single key), then spread over the row."""
    return mx.array([[0, length - 1][i] if i < 2 else (i * 7919) % length for i in range(batch)], dtype=mx.int32)


def _explicit(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool) -> mx.array:
    return unfused_attention(queries, keys, values, scale=scale, mask="causal" if causal else None)


def random_block(spec: AttentionSpec, rows: int, length: int, spare: int = 0,
                 seed: int = 0, batch: int = 1) -> tuple[mx.array, mx.array, mx.array]:
    """Random q (B, H, L, D) and k, v (B, Hkv, S, D); with `spare`, k and v are prefixes of longer
    buffers (strided views, as a KV cache hands them out)."""
    kq, kk, kv = mx.random.split(mx.random.key(seed + rows * 7919 + length + (batch - 1) * 104729), 3)
    q = mx.random.normal((batch, spec.heads, rows, spec.head_dim), key=kq).astype(spec.dtype)
    k = mx.random.normal((batch, spec.kv_heads, length + spare, spec.head_dim), key=kk).astype(spec.dtype)
    v = mx.random.normal((batch, spec.kv_heads, length + spare, spec.head_dim), key=kv).astype(spec.dtype)
    mx.eval(q, k, v)
    return q, k[:, :, :length], v[:, :, :length]


_DEFAULT: BlockAttentionKernel | None = None


def default_kernel() -> BlockAttentionKernel:
    """The process-wide instance (built at first use, for the default device; MLX thread only)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = BlockAttentionKernel()
    return _DEFAULT
