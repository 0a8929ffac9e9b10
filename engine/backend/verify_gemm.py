"""Verify-width dense matmul: a CUDA/Metal kernel for 2..32-row products with float weights, chosen at runtime.

On an H200 (MLX-CUDA 0.32.4) a Qwen3-8B-shaped bf16 forward costs 7.9-9.3 ms at 1 row but 12-15 ms at
2-16: MLX's bf16 GEMM for a few rows runs well below the 1-row GEMV's bandwidth. The kernels in
kernels/verify_gemm.{cu,metal} read each weight once and multiply it against every row (tensor-core
mma on CUDA, float32 FMAs on Metal). Whether they run is decided per (device, dtype, N, K, row bucket)
at first use, as engine/backend/verify_matmul.py decides for quantized layers: numerics against a
float32 matmul, then speed against MLX's `x @ w.T`, with kernel_choice's margin. The CPU backend keeps
MLX's matmul (engine/model/transposed.py stores its float32 matrices transposed); so does any device
where a kernel is wrong or slower, 1-row decode and prefill chunks over 32 rows. DFLASH_VERIFY_KERNEL=0
turns these kernels off too.

Layers are swapped by engine/backend/verify_matmul.apply (plain nn.Linear, and nn.Embedding for its
tied `as_linear` LM-head product), only where a GPU kernel exists.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from engine.backend.disk_cache import DiskCache
from engine.backend.kernel_choice import SPEEDUP_MARGIN, exact_float32, pick_fastest
from engine.backend.verify_matmul import (
    CACHE_ENTRIES,
    CACHE_ENV,
    ENABLE_ENV,
    MAX_ROWS,
    MIN_HEADROOM_MS,
    MIN_ROWS,
    TOLERANCE,
    Decision,
    decision_entry,
    detect_backend,
    kernel_file_id,
    kernels_enabled_by_env,
    read_kernel_source,
    retyped,
    stored_decision,
    time_ms,
)

__all__ = ["ENABLE_ENV", "VerifyGemm", "GemmSpec", "GemmTiling", "apply_dense", "default_verify_gemm"]

log = logging.getLogger("dflash.verify_gemm")

BUCKETS = (8, 16, 32)  # x rows per kernel (the CUDA mma takes x in tiles of 8 rows)
# CUDA's tensor-core mma takes bf16/fp16; float32 stays with MLX there (its float32 GEMM is TF32).
DTYPES = {"cuda": (mx.bfloat16, mx.float16), "metal": (mx.bfloat16, mx.float16, mx.float32)}
K_MULTIPLE = 8  # 16-byte rows of 2-byte values: the kernels' vector loads
# The check times each product over weights that together outgrow the GPU's L2 (H100/H200: 50 MB), as a
# forward reads them: a 4096 x 4096 bf16 weight (33 MB) timed over and over stays in L2, where the kernel
# won alone and lost inside a forward. Smaller weights are rotated with random copies of their shape.
COLD_BYTES = 256 * 2**20
MAX_COPIES = 64
CHECK_VERSION = 1  # how a decision is checked; stored decisions of another version are made again


@dataclass(frozen=True)
class GemmTiling:
    """WN x WK warps (simdgroups) per block, NC output columns per warp; KU (CUDA): 32-value K chunks
    per warp step, the weight loads in flight per lane."""

    nc: int
    wn: int
    wk: int
    ku: int = 1

    @property
    def threads(self) -> int:
        return 32 * self.wn * self.wk

    @property
    def columns(self) -> int:
        return self.nc * self.wn


# Candidates per backend and row bucket, tried in order; the fastest correct one is kept.
# CUDA: NC a multiple of 16 (tensor-core tiles). Few columns per block and 8 warps splitting K keep
# 256+ blocks even at N = 4096 (132 SMs); 62-168 registers a thread, no spills (ptxas, sm_90),
# shared memory (WK x bucket x WN x NC floats) <= 32 KiB.
# Metal: accumulators (bucket x NC floats a thread) stay <= 64 registers, as verify_matmul's.
_CUDA = (GemmTiling(16, 1, 8, 2), GemmTiling(16, 1, 4, 4), GemmTiling(32, 2, 4, 1))
TILINGS: dict[str, dict[int, tuple[GemmTiling, ...]]] = {
    "cuda": {8: _CUDA, 16: _CUDA, 32: _CUDA},
    "metal": {8: (GemmTiling(4, 2, 2), GemmTiling(4, 4, 1)),
              16: (GemmTiling(4, 2, 2), GemmTiling(2, 4, 2)),
              32: (GemmTiling(2, 4, 1), GemmTiling(2, 2, 2))},
}


@dataclass(frozen=True)
class GemmSpec:
    """What a kernel decision depends on besides the device and the row bucket."""

    n: int
    k: int
    dtype: mx.Dtype


Kernel = Callable[[mx.array, mx.array, GemmSpec, int, GemmTiling], mx.array]


def row_bucket(rows: int) -> int | None:
    """The x rows a kernel is compiled for, or None when `rows` is not verify-width."""
    if not MIN_ROWS <= rows <= MAX_ROWS:
        return None
    return next(b for b in BUCKETS if rows <= b)


def reference_gemm(x: mx.array, w: mx.array) -> mx.array:
    """MLX's own product, what nn.Linear computes: y = x @ w.T."""
    return x @ w.T


def float32_reference(x: mx.array, w: mx.array) -> mx.array:
    """The same product in float32: the numerics oracle."""
    return x.astype(mx.float32) @ w.astype(mx.float32).T


KERNEL_FILES = {"cuda": "verify_gemm.cu", "metal": "verify_gemm.metal"}


def make_gpu_kernel(backend: str) -> Kernel:
    """The launcher for kernels/verify_gemm.cu (backend 'cuda') or .metal ('metal')."""
    filename = KERNEL_FILES[backend]
    header, body = read_kernel_source(filename)
    factory = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    # MLX-CUDA caches compiled code on disk by kernel name alone (MLX_PTX_CACHE_DIR, default under the
    # temp dir): the source's hash in the name keeps an edited kernel from meeting a stale binary.
    digest = hashlib.sha1((header + body).encode()).hexdigest()[:10]
    kernel = factory(name=f"dflash_verify_gemm_{digest}", input_names=["x", "w"], output_names=["y"],
                     source=body, header=header)

    def launch(x: mx.array, w: mx.array, spec: GemmSpec, bucket: int, tiling: GemmTiling) -> mx.array:
        rows = x.size // spec.k
        blocks = -(-spec.n // tiling.columns)
        # Every template value is in the kernel's name, which is what MLX caches compiled code by.
        template = [("T", spec.dtype), ("MB", bucket), ("NC", tiling.nc), ("WN", tiling.wn), ("WK", tiling.wk)]
        if backend == "cuda":
            template.append(("KU", tiling.ku))
        (y,) = kernel(inputs=[x.reshape(rows, spec.k), w], template=template,
                      grid=(blocks * tiling.threads, 1, 1), threadgroup=(tiling.threads, 1, 1),
                      output_shapes=[(rows, spec.n)], output_dtypes=[spec.dtype])
        return y.reshape(*x.shape[:-1], spec.n)

    return launch


@dataclass(frozen=True)
class Plan:
    spec: GemmSpec
    bucket: int
    tiling: GemmTiling


class VerifyGemm:
    """y = x @ w.T through a verify-width kernel where the runtime checks allow it."""

    def __init__(self, backend: str | None = None, kernel: Kernel | None = None,
                 enabled: bool | None = None, device_name: str | None = None,
                 timer: Callable[[Callable[[], mx.array]], float] = time_ms, store: DiskCache | None = None,
                 source_id: str = "") -> None:
        self.backend = backend or detect_backend()
        self.enabled = kernels_enabled_by_env() if enabled is None else enabled
        if kernel is None and self.enabled and self.backend in DTYPES:
            kernel = make_gpu_kernel(self.backend)
            source_id = source_id or kernel_file_id(KERNEL_FILES[self.backend])
        self.kernel = kernel if self.enabled and self.backend in DTYPES else None
        self.device_name = device_name or str(mx.device_info().get("device_name", self.backend))
        self.timer = timer
        # decisions of earlier starts, by kernel source, check, device, MLX, spec and bucket: a fresh CUDA
        # process spent minutes compiling and timing tilings for an 8B model's layer shapes
        self.store = store
        self.source_id = source_id
        self.decisions: dict[tuple[GemmSpec, int], Decision] = {}
        # False routes every product to MLX without forgetting the decisions (bench/regime.py's A/B)
        self.active = True

    def __call__(self, x: mx.array, w: mx.array) -> mx.array:
        return self.run(self.plan(x.dtype, x.size // x.shape[-1], w), x, w)

    def covers(self, dtype: mx.Dtype, w: mx.array) -> bool:
        """Whether a kernel exists for x of `dtype` times this weight (the rows aside)."""
        return (self.kernel is not None and w.ndim == 2 and w.dtype == dtype
                and dtype in DTYPES.get(self.backend, ()) and w.shape[1] % K_MULTIPLE == 0)

    def plan(self, x_dtype: mx.Dtype, rows: int, w: mx.array) -> Plan | None:
        """How a (rows, K) x will be multiplied: a kernel plan, or None for MLX's matmul."""
        bucket = row_bucket(rows)
        if bucket is None or not self.covers(x_dtype, w):
            return None
        spec = GemmSpec(int(w.shape[0]), int(w.shape[1]), x_dtype)
        tiling = self.decide(spec, bucket, w).tiling
        return None if tiling is None else Plan(spec, bucket, tiling)

    def run(self, plan: Plan | None, x: mx.array, w: mx.array) -> mx.array:
        if plan is not None and self.active:
            assert self.kernel is not None
            return self.kernel(x, w, plan.spec, plan.bucket, plan.tiling)
        return x @ w.T

    def decide(self, spec: GemmSpec, bucket: int, w: mx.array | None = None) -> Decision:
        """The cached choice for (spec, bucket) on this device; checked and logged on first use.

        `w`, a weight of the spec's shape (the layer's own), saves a random one: an LM head is 1.2 GB.
        """
        key = (spec, bucket)
        if key not in self.decisions:
            stored = self._stored(spec, bucket)
            decision = stored or self._check(spec, bucket, w)
            self.decisions[key] = decision
            if stored is None and self.store is not None:
                self.store.put(self._store_key(spec, bucket), decision_entry(decision), "verify gemm decision")
            log.info("verify gemm on %s (%s), N=%d K=%d %s rows<=%d: %s (%s; kernel %.4f ms, MLX %.4f ms, "
                     "max rel err %.2g)%s", self.device_name, self.backend, spec.n, spec.k, spec.dtype, bucket,
                     "kernel" if decision.tiling else "MLX", decision.reason, decision.kernel_ms,
                     decision.reference_ms, decision.max_rel_error,
                     f", as decided at an earlier start ({self.store.path})" if stored and self.store else "")
        return self.decisions[key]

    def _store_key(self, spec: GemmSpec, bucket: int) -> str:
        return (f"verify_gemm {self.source_id} check {CHECK_VERSION} | {self.device_name} ({self.backend}) | "
                f"MLX {mx.__version__} | N={spec.n} K={spec.k} {spec.dtype} | rows<={bucket}")

    def _stored(self, spec: GemmSpec, bucket: int) -> Decision | None:
        entry = None if self.store is None else self.store.get(self._store_key(spec, bucket))
        return None if entry is None else stored_decision(entry, GemmTiling, TILINGS[self.backend][bucket])

    def _check(self, spec: GemmSpec, bucket: int, w: mx.array | None) -> Decision:
        assert self.kernel is not None
        if w is None or w.shape != (spec.n, spec.k) or w.dtype != spec.dtype:
            w = random_weight(spec)
        ref_x = mx.random.normal((bucket, spec.k)).astype(spec.dtype)
        weights = cold_rotation(spec, w)  # timed calls take turns over these; numerics read `w`

        def bucket_reference() -> mx.array:
            return reference_gemm(ref_x, next(weights))

        def one_row_reference() -> mx.array:
            return reference_gemm(ref_x[:1], next(weights))

        ref_ms = self.timer(bucket_reference)
        one_ms = self.timer(one_row_reference)
        if ref_ms - one_ms < max(MIN_HEADROOM_MS, (1 - SPEEDUP_MARGIN) * ref_ms):
            return Decision(None, float("nan"), ref_ms, float("nan"),
                            f"nothing to win: {bucket} rows cost {ref_ms:.4f} ms, 1 row {one_ms:.4f} ms")
        pick = pick_fastest(
            TILINGS[self.backend][bucket], tolerance=TOLERANCE[spec.dtype], reference_ms=ref_ms, noun="tiling",
            what=f"{spec} rows<={bucket}",
            max_rel_error=lambda t: self.max_rel_error(spec, bucket, t, w),
            time_ms=lambda t: self.timer(lambda: self.kernel(ref_x, next(weights), spec, bucket, t)))
        return Decision(pick.variant, pick.kernel_ms, ref_ms, pick.max_rel_error, pick.reason)

    def max_rel_error(self, spec: GemmSpec, bucket: int, tiling: GemmTiling, w: mx.array) -> float:
        """Worst max|kernel - float32 reference| / max|reference| over the bucket's fewest, a middle and
        its most rows."""
        errors = []
        for rows in sorted({MIN_ROWS, bucket // 2 + 1, bucket}):
            x = mx.random.normal((rows, spec.k)).astype(spec.dtype)
            y = self.kernel(x, w, spec, bucket, tiling).astype(mx.float32)
            ref = exact_float32(lambda: float32_reference(x, w))
            errors.append(mx.max(mx.abs(y - ref)) / mx.maximum(mx.max(mx.abs(ref)), 1e-6))
        values = [e.item() for e in errors]
        return float("nan") if any(v != v for v in values) else max(values)


def cold_rotation(spec: GemmSpec, w: mx.array) -> itertools.cycle[mx.array]:
    """`w` and as many random weights of its shape as take the lot past COLD_BYTES (at most MAX_COPIES), in
    turn: a timed call then reads its weight from memory, not from L2, as inside a forward."""
    copies = min(MAX_COPIES, -(-COLD_BYTES // max(w.nbytes, 1))) - 1
    return itertools.cycle([w] + [random_weight(spec, seed=1 + i) for i in range(copies)])


def random_weight(spec: GemmSpec, seed: int = 0) -> mx.array:
    """A random (N, K) weight of nn.Linear's init scale in the spec's dtype."""
    w = (mx.random.normal((spec.n, spec.k), key=mx.random.key(seed)) * spec.k**-0.5).astype(spec.dtype)
    mx.eval(w)
    return w


_DEFAULT: VerifyGemm | None = None


def default_verify_gemm() -> VerifyGemm:
    """The process-wide instance (built at first use, for the default device)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = VerifyGemm(store=DiskCache.default("kernels.json", CACHE_ENV, CACHE_ENTRIES))
    return _DEFAULT


class VerifyDense:
    """Mixin: a float layer's x @ weight.T through a VerifyGemm, planned once per (dtype, rows)."""

    def gemm_plan(self, x: mx.array) -> tuple[VerifyGemm, Plan] | None:
        """The kernel for this x, or None for the layer's own MLX product (1 row, > 32 rows, no kernel)."""
        rows = x.size // x.shape[-1]
        if not MIN_ROWS <= rows <= MAX_ROWS:  # decode and prefill chunks: no lookup at all
            return None
        gemm: VerifyGemm = self.__dict__.get("gemm") or default_verify_gemm()
        if not gemm.active:
            return None
        # Plans live in __dict__ (not the parameter tree): the hot path is one dict lookup.
        plans = self.__dict__.setdefault("_gemm_plans", {})
        key = (x.dtype, rows)
        if key not in plans:
            plans[key] = gemm.plan(x.dtype, rows, self["weight"])
        plan = plans[key]
        return None if plan is None else (gemm, plan)

    def gemm_kernel(self, chosen: tuple[VerifyGemm, Plan], x: mx.array) -> mx.array:
        gemm, plan = chosen
        return gemm.kernel(x, self["weight"], plan.spec, plan.bucket, plan.tiling)

    @classmethod
    def from_layer(cls, layer: nn.Module, gemm: VerifyGemm | None = None) -> nn.Module:
        return retyped(layer, cls, gemm=gemm)


class VerifyLinear(VerifyDense, nn.Linear):
    """nn.Linear whose 2..32-row products may take the verify-width kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        chosen = self.gemm_plan(x)
        if chosen is None:
            return nn.Linear.__call__(self, x)
        y = self.gemm_kernel(chosen, x)
        return y + self["bias"] if "bias" in self else y


class VerifyEmbedding(VerifyDense, nn.Embedding):
    """nn.Embedding whose tied output projection (`as_linear`) may take the kernel; lookups unchanged."""

    def as_linear(self, x: mx.array) -> mx.array:
        chosen = self.gemm_plan(x)
        return nn.Embedding.as_linear(self, x) if chosen is None else self.gemm_kernel(chosen, x)


def swappable(module: object, gemm: VerifyGemm) -> bool:
    if type(module) not in (nn.Linear, nn.Embedding):
        return False
    w = module.get("weight")
    return isinstance(w, mx.array) and gemm.covers(w.dtype, w)


def apply_dense(model: nn.Module, gemm: VerifyGemm | None = None, warm: bool = True) -> int:
    """Swap the model's float nn.Linear / nn.Embedding layers for the verify-width ones; returns how many.

    Only where a kernel exists for the layer's dtype (never on the CPU backend, nor with
    DFLASH_VERIFY_KERNEL=0). With `warm`, every layer shape's decisions for each row bucket are made
    now (at load time, outside any mx.compile trace), on the layer's own weight.
    Call it after engine/model/fused.fuse_projections, and before anything binds a swapped module's
    method (Target binds `embed_tokens.as_linear`).
    """
    gemm = gemm or default_verify_gemm()
    if gemm.kernel is None:
        return 0
    swapped: list[nn.Module] = []

    def swap(_path: str, module: nn.Module) -> nn.Module:
        if not swappable(module, gemm):
            return module
        cls = VerifyLinear if isinstance(module, nn.Linear) else VerifyEmbedding
        swapped.append(cls.from_layer(module, gemm))
        return swapped[-1]

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    if warm:
        weights = {GemmSpec(int(m["weight"].shape[0]), int(m["weight"].shape[1]), m["weight"].dtype): m["weight"]
                   for m in swapped}
        for spec in sorted(weights, key=lambda s: (s.n, s.k)):
            for bucket in BUCKETS:
                gemm.decide(spec, bucket, weights[spec])
    log.info("verify gemm: %d float layers swapped (%s)", len(swapped), gemm.backend)
    return len(swapped)
