"""Verify-width quantized matmul: a CUDA/Metal kernel for 2..32 rows, chosen at runtime per layer shape.

Speculative verification multiplies 2..32 rows by every weight; MLX 0.32's quantized matmul costs
about 3x one row at 16 rows. The kernels in kernels/verify_qmm.{cu,metal} read each weight once and
reuse it across all rows. Whether they run is decided per (device, shape, dtypes, row bucket):
numerics against a float32 dequantize+matmul, then speed against mx.quantized_matmul. `apply` decides
at load, for the dtype one probe forward feeds each layer, every row bucket at once; a spec first seen
later (another dtype) has all its buckets decided at that first use.
The CPU backend always takes the reference path; so does any device where a kernel is wrong or
slower. DFLASH_VERIFY_KERNEL=0 turns the kernels off entirely.

Usage, once the target is loaded (on the MLX thread):

    from engine.backend import verify_matmul
    verify_matmul.apply(model)      # swaps QuantizedLinear/QuantizedEmbedding; returns the count

engine/backend/verify_kernels.apply does this and swaps float layers for engine/backend/verify_gemm.py's
dense twin too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.models.cache import make_prompt_cache

from engine.backend.disk_cache import DiskCache
from engine.backend.kernel_choice import SPEEDUP_MARGIN, exact_float32, pick_fastest

log = logging.getLogger("dflash.verify_matmul")

# kernels/ in a checkout, else the copy a wheel install puts under share/ (never an importable package)
KERNELS_DIR = next(
    (d for d in (Path(__file__).resolve().parents[2] / "kernels", Path(sys.prefix) / "share" / "dflash-server" / "kernels")
     if (d / "verify_qmm.cu").is_file()),
    Path(__file__).resolve().parents[2] / "kernels",
)
ENABLE_ENV = "DFLASH_VERIFY_KERNEL"  # "0", "off", "false" or "no" turns the kernels off
MIN_ROWS, MAX_ROWS = 2, 32
BUCKETS = (4, 8, 16, 32)  # accumulator rows compiled per kernel; M=1 decode never uses a kernel
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
# Tolerance on max|y - ref| / max|ref| against a float32 reference: the kernels accumulate in
# float32 and round once, so the error is about half an ulp of the output dtype.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1.2e-2}
# A kernel reads each weight once, as the 1-row product does, so it can win at most the reference's
# cost of the extra rows. Below this many ms (or the margin above) nothing is compiled: NVRTC takes
# seconds per variant, and on the H200 SmolLM2's layers cost 7-12 us at 1 to 32 rows alike.
MIN_HEADROOM_MS = 0.005
# Decisions kept across restarts: a fresh CUDA process spent ~2 minutes compiling and timing tilings
# for the 135M model's layers. DFLASH_KERNEL_CACHE=<file> moves ~/.cache/dflash-server/kernels.json; =off.
CACHE_ENV = "DFLASH_KERNEL_CACHE"
CACHE_ENTRIES = 512  # (layer shape x dtype x row bucket) per device, MLX and kernel source
CHECK_VERSION = 2  # how a decision is checked; stored decisions of another version are made again


@dataclass(frozen=True)
class Tiling:
    """A kernel tile: WN x WK warps per block, NC output columns per warp."""

    nc: int
    wn: int
    wk: int

    @property
    def threads(self) -> int:
        return 32 * self.wn * self.wk

    @property
    def columns(self) -> int:
        return self.nc * self.wn


# Candidates per row bucket, tried in order; the fastest correct one is kept. Accumulators
# (bucket x nc floats per thread) stay <= 64 registers; CUDA's shared x span (bucket x wk x 256
# values) stays <= 32 KiB in float32.
TILINGS: dict[int, tuple[Tiling, ...]] = {
    4: (Tiling(4, 2, 4), Tiling(4, 4, 2)),
    8: (Tiling(4, 2, 4), Tiling(4, 4, 2)),
    16: (Tiling(4, 4, 2), Tiling(2, 4, 2)),
    32: (Tiling(2, 8, 1), Tiling(2, 4, 1)),
}


@dataclass(frozen=True)
class QuantSpec:
    """What a kernel decision depends on besides the device and the row bucket."""

    n: int
    k: int
    group_size: int
    bits: int
    x_dtype: mx.Dtype
    scales_dtype: mx.Dtype


Kernel = Callable[[mx.array, mx.array, mx.array, mx.array, QuantSpec, int, Tiling], mx.array]


def read_kernel_source(filename: str) -> tuple[str, str]:
    """(header, body) of a kernel file in kernels/, split at its //@header and //@source markers."""
    text = (KERNELS_DIR / filename).read_text()
    _, _, rest = text.partition("//@header\n")
    header, sep, body = rest.partition("//@source\n")
    if not sep:
        raise ValueError(f"{filename}: missing //@header or //@source marker")
    return header, body


def decision_entry(decision: Decision) -> dict[str, Any]:
    """A decision as a JSON-able DiskCache entry."""
    return {**asdict(decision), "tiling": None if decision.tiling is None else asdict(decision.tiling)}


def stored_decision(entry: dict[str, Any], tiling_class: type, candidates: Sequence[object]) -> Decision | None:
    """The decision an entry of decision_entry() holds; None where a later version would decide again (its
    tiling no longer a candidate, or fields it does not have)."""
    try:
        tiling = None if entry["tiling"] is None else tiling_class(**entry["tiling"])
        if tiling is not None and tiling not in candidates:
            return None  # a candidate no longer tried
        return Decision(tiling, float(entry["kernel_ms"]), float(entry["reference_ms"]),
                        float(entry["max_rel_error"]), str(entry["reason"]))
    except (TypeError, KeyError, ValueError):  # written by another version: decide again
        return None


def kernel_source_id(backend: str) -> str:
    """A digest of the kernel file a backend compiles: an edited kernel is decided again."""
    return kernel_file_id({"cuda": "verify_qmm.cu", "metal": "verify_qmm.metal"}[backend])


def kernel_file_id(filename: str) -> str:
    """A digest of a kernel file in kernels/."""
    return hashlib.sha256((KERNELS_DIR / filename).read_bytes()).hexdigest()[:12]


def detect_backend() -> str:
    """'cuda', 'metal' or 'cpu': the backend MLX runs the default device on."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


def kernels_enabled_by_env() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def reference_qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
                  group_size: int, bits: int) -> mx.array:
    """MLX's own quantized matmul: y = x @ dequant(w).T (the path the kernels replace)."""
    return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True,
                               group_size=group_size, bits=bits)


def dequant_reference(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
                      group_size: int, bits: int) -> mx.array:
    """The same product in float32 through mx.dequantize + matmul: the numerics oracle."""
    dense = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                          group_size=group_size, bits=bits)  # (N, K)
    return x.astype(mx.float32) @ dense.T


def row_bucket(rows: int) -> int | None:
    """The accumulator rows a kernel is compiled for, or None when `rows` is not verify-width."""
    if not MIN_ROWS <= rows <= MAX_ROWS:
        return None
    return next(b for b in BUCKETS if rows <= b)


_RESULT_DTYPES: dict[tuple[mx.Dtype, mx.Dtype], mx.Dtype] = {}


def result_dtype(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    """MLX's type promotion (mx.quantized_matmul's output dtype for x and scales dtypes)."""
    if a == b:
        return a
    if (a, b) not in _RESULT_DTYPES:
        _RESULT_DTYPES[(a, b)] = (mx.zeros((1,), a) + mx.zeros((1,), b)).dtype
    return _RESULT_DTYPES[(a, b)]


def make_gpu_kernel(backend: str) -> Kernel:
    """The launcher for kernels/verify_qmm.cu (backend 'cuda') or .metal ('metal')."""
    filename = {"cuda": "verify_qmm.cu", "metal": "verify_qmm.metal"}[backend]
    header, body = read_kernel_source(filename)
    factory = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    kernel = factory(name="dflash_verify_qmm", input_names=["x", "w", "scales", "biases"],
                     output_names=["y"], source=body, header=header)

    def launch(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, spec: QuantSpec,
               bucket: int, tiling: Tiling) -> mx.array:
        rows = x.size // spec.k
        out_dtype = result_dtype(spec.x_dtype, spec.scales_dtype)
        blocks = -(-spec.n // tiling.columns)
        # Every template value is in the kernel's name, which is what MLX caches compiled code by.
        template = [("T", spec.x_dtype), ("S", spec.scales_dtype), ("O", out_dtype),
                    ("MB", bucket), ("BITS", spec.bits), ("GS", spec.group_size),
                    ("NC", tiling.nc), ("WN", tiling.wn), ("WK", tiling.wk)]
        (y,) = kernel(inputs=[x.reshape(rows, spec.k), w, scales, biases], template=template,
                      grid=(blocks * tiling.threads, 1, 1), threadgroup=(tiling.threads, 1, 1),
                      output_shapes=[(rows, spec.n)], output_dtypes=[out_dtype])
        return y.reshape(*x.shape[:-1], spec.n)

    return launch


def time_ms(fn: Callable[[], mx.array], calls: int = 10, rounds: int = 5) -> float:
    """Best-of-`rounds` milliseconds per call, `calls` calls evaluated together per round."""
    mx.eval(fn())  # compile / warm up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(calls)])
        best = min(best, (time.perf_counter() - start) * 1e3 / calls)
    return best


@dataclass(frozen=True)
class Plan:
    spec: QuantSpec
    bucket: int
    tiling: Tiling


@dataclass(frozen=True)
class Decision:
    tiling: Tiling | None  # None: use the reference
    kernel_ms: float
    reference_ms: float
    max_rel_error: float
    reason: str


class VerifyMatmul:
    """y = x @ dequant(w).T through a verify-width kernel where the runtime checks allow it."""

    def __init__(self, backend: str | None = None, kernel: Kernel | None = None,
                 enabled: bool | None = None, device_name: str | None = None,
                 timer: Callable[[Callable[[], mx.array]], float] = time_ms, store: DiskCache | None = None,
                 source_id: str = "") -> None:
        self.backend = backend or detect_backend()
        self.enabled = kernels_enabled_by_env() if enabled is None else enabled
        if kernel is None and self.enabled and self.backend != "cpu":
            kernel = make_gpu_kernel(self.backend)
            source_id = source_id or kernel_source_id(self.backend)
        self.kernel = kernel if self.enabled and self.backend != "cpu" else None
        self.device_name = device_name or str(mx.device_info().get("device_name", self.backend))
        self.timer = timer
        self.decisions: dict[tuple[QuantSpec, int], Decision] = {}
        self.store = store  # decisions of earlier starts, by device, MLX, kernel source, spec and bucket
        self.source_id = source_id

    def __call__(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None,
                 group_size: int, bits: int) -> mx.array:
        plan = self.plan(x.dtype, x.size // x.shape[-1], w, scales, biases, group_size, bits)
        return self.run(plan, x, w, scales, biases, group_size, bits)

    def plan(self, x_dtype: mx.Dtype, rows: int, w: mx.array, scales: mx.array,
             biases: mx.array | None, group_size: int, bits: int) -> Plan | None:
        """How a (rows, K) x will be multiplied: a kernel plan, or None for mx.quantized_matmul."""
        if self.kernel is None or biases is None:
            return None
        bucket = row_bucket(rows)
        spec = self.spec_for(x_dtype, w, scales, group_size, bits)
        if bucket is None or spec is None:
            return None
        if (spec, bucket) not in self.decisions:
            self.decide_all(spec)
        tiling = self.decisions[(spec, bucket)].tiling
        return None if tiling is None else Plan(spec, bucket, tiling)

    def run(self, plan: Plan | None, x: mx.array, w: mx.array, scales: mx.array,
            biases: mx.array | None, group_size: int, bits: int) -> mx.array:
        if plan is not None:
            assert self.kernel is not None and biases is not None
            return self.kernel(x, w, scales, biases, plan.spec, plan.bucket, plan.tiling)
        return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True,
                                   group_size=group_size, bits=bits)

    @staticmethod
    def spec_for(x_dtype: mx.Dtype, w: mx.array, scales: mx.array, group_size: int,
                 bits: int) -> QuantSpec | None:
        """The kernel's view of a layer, or None where the kernel does not cover it."""
        if bits not in BITS or group_size not in GROUP_SIZES or w.ndim != 2 or w.dtype != mx.uint32:
            return None
        if x_dtype not in FLOATS or scales.dtype not in FLOATS:
            return None
        k = w.shape[1] * 32 // bits
        return QuantSpec(w.shape[0], k, group_size, bits, x_dtype, scales.dtype)

    def decide_all(self, spec: QuantSpec) -> None:
        """Every row bucket's choice for `spec`: a new batch size or verify width later finds its
        decision made, rather than timing tilings inside a request."""
        for bucket in BUCKETS:
            self.decide(spec, bucket)

    def decide(self, spec: QuantSpec, bucket: int) -> Decision:
        """The cached choice for (spec, bucket) on this device; checked and logged on first use."""
        key = (spec, bucket)
        if key not in self.decisions:
            stored = self._stored(spec, bucket)
            decision = stored or self._check(spec, bucket)
            self.decisions[key] = decision
            if stored is None and self.store is not None:
                self.store.put(self._store_key(spec, bucket), decision_entry(decision), "verify matmul decision")
            log.info("verify matmul on %s (%s), N=%d K=%d %d-bit g%d %s rows<=%d: %s (%s; kernel %.3f ms, "
                     "mx.quantized_matmul %.3f ms, max rel err %.2g)%s", self.device_name, self.backend,
                     spec.n, spec.k, spec.bits, spec.group_size, spec.x_dtype, bucket,
                     "kernel" if decision.tiling else "reference", decision.reason,
                     decision.kernel_ms, decision.reference_ms, decision.max_rel_error,
                     f", as decided at an earlier start ({self.store.path})" if stored and self.store else "")
        return self.decisions[key]

    def _store_key(self, spec: QuantSpec, bucket: int) -> str:
        return (f"verify_qmm {self.source_id} check {CHECK_VERSION} | {self.device_name} ({self.backend}) | "
                f"MLX {mx.__version__} | N={spec.n} K={spec.k} {spec.bits}-bit g{spec.group_size} {spec.x_dtype} scales "
                f"{spec.scales_dtype} | rows<={bucket}")

    def _stored(self, spec: QuantSpec, bucket: int) -> Decision | None:
        entry = None if self.store is None else self.store.get(self._store_key(spec, bucket))
        return None if entry is None else stored_decision(entry, Tiling, TILINGS[bucket])

    def _check(self, spec: QuantSpec, bucket: int) -> Decision:
        assert self.kernel is not None
        w, scales, biases = random_quantized(spec)
        ref_x = mx.random.normal((bucket, spec.k)).astype(spec.x_dtype)

        def bucket_reference() -> mx.array:
            return reference_qmm(ref_x, w, scales, biases, spec.group_size, spec.bits)

        def one_row_reference() -> mx.array:
            return reference_qmm(ref_x[:1], w, scales, biases, spec.group_size, spec.bits)

        ref_ms = self.timer(bucket_reference)
        one_ms = self.timer(one_row_reference)
        if ref_ms - one_ms < max(MIN_HEADROOM_MS, (1 - SPEEDUP_MARGIN) * ref_ms):
            return Decision(None, float("nan"), ref_ms, float("nan"),
                            f"nothing to win: {bucket} rows cost {ref_ms:.4f} ms, 1 row {one_ms:.4f} ms")
        pick = pick_fastest(
            TILINGS[bucket], tolerance=TOLERANCE[spec.x_dtype], reference_ms=ref_ms, noun="tiling",
            what=f"{spec} rows<={bucket}",
            max_rel_error=lambda t: self.max_rel_error(spec, bucket, t, w, scales, biases),
            time_ms=lambda t: self.timer(lambda: self.kernel(ref_x, w, scales, biases, spec, bucket, t)))
        return Decision(pick.variant, pick.kernel_ms, ref_ms, pick.max_rel_error, pick.reason)

    def max_rel_error(self, spec: QuantSpec, bucket: int, tiling: Tiling, w: mx.array,
                      scales: mx.array, biases: mx.array) -> float:
        """Worst max|kernel - float32 reference| / max|reference| over a full and a 1-over bucket."""
        errors = []
        for rows in sorted({bucket, max(MIN_ROWS, bucket // 2 + 1)}):
            x = mx.random.normal((rows, spec.k)).astype(spec.x_dtype)
            y = self.kernel(x, w, scales, biases, spec, bucket, tiling).astype(mx.float32)
            ref = exact_float32(lambda: dequant_reference(x, w, scales, biases, spec.group_size, spec.bits))
            errors.append(mx.max(mx.abs(y - ref)) / mx.maximum(mx.max(mx.abs(ref)), 1e-6))
        values = [e.item() for e in errors]
        return float("nan") if any(v != v for v in values) else max(values)


def random_quantized(spec: QuantSpec, seed: int = 0) -> tuple[mx.array, mx.array, mx.array]:
    """Random packed weights, scales and biases of `spec`'s shape (any bit pattern is valid)."""
    kw, ks, kb = mx.random.split(mx.random.key(seed), 3)
    shape = (spec.n, spec.k * spec.bits // 32)
    halves = mx.random.randint(0, 1 << 16, (2, *shape), key=kw).astype(mx.uint32)
    words = (halves[0] << 16) | halves[1]  # every 32-bit pattern is a valid packed word
    groups = (spec.n, spec.k // spec.group_size)
    levels = 2**spec.bits - 1
    scales = (mx.random.uniform(0.5, 1.5, groups, key=ks) * 0.02 / levels).astype(spec.scales_dtype)
    biases = (mx.random.normal(groups, key=kb) * 0.01).astype(spec.scales_dtype)
    mx.eval(words, scales, biases)
    return words, scales, biases


def retyped(layer: nn.Module, cls: type, **attributes: object) -> nn.Module:
    """`layer` as a `cls` (a subclass of its type): the same parameters and attributes, frozen state
    included, without re-running __init__ (which would quantize or initialise a fresh random weight);
    `attributes` that are not None are set beside them, outside the parameter tree."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    dict.update(new, layer)
    new.__dict__.update({name: value for name, value in attributes.items() if value is not None})
    return new


_DEFAULT: VerifyMatmul | None = None


def default_verify_matmul() -> VerifyMatmul:
    """The process-wide instance (built at first use, for the default device)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = VerifyMatmul(store=DiskCache.default("kernels.json", CACHE_ENV, CACHE_ENTRIES))
    return _DEFAULT


class VerifyLayer:
    """Mixin: a quantized layer's product through a VerifyMatmul, planned once per (dtype, rows)."""

    def verify_matmul(self, x: mx.array) -> mx.array:
        verify: VerifyMatmul = self.__dict__.get("verify") or default_verify_matmul()
        # Plans live in __dict__ (not the parameter tree): the hot path is one dict lookup.
        plans = self.__dict__.setdefault("_verify_plans", {})
        key = (x.dtype, x.size // x.shape[-1])
        if key not in plans:
            plans[key] = verify.plan(x.dtype, key[1], self["weight"], self["scales"],
                                     self.get("biases"), self.group_size, self.bits)
        return verify.run(plans[key], x, self["weight"], self["scales"], self.get("biases"),
                          self.group_size, self.bits)

    @classmethod
    def from_quantized(cls, layer: nn.Module, verify: VerifyMatmul | None = None) -> nn.Module:
        return retyped(layer, cls, verify=verify)


class VerifyQuantizedLinear(VerifyLayer, nn.QuantizedLinear):
    """nn.QuantizedLinear whose 2..32-row products may take the verify-width kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.verify_matmul(x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class VerifyQuantizedEmbedding(VerifyLayer, nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output projection (`as_linear`) may take the kernel."""

    def as_linear(self, x: mx.array) -> mx.array:
        return self.verify_matmul(x)


def swappable(module: object) -> bool:
    return (type(module) in (nn.QuantizedLinear, nn.QuantizedEmbedding)
            and getattr(module, "mode", "affine") == "affine" and module.get("biases") is not None
            and module.bits in BITS and module.group_size in GROUP_SIZES)


def apply(model: nn.Module, verify: VerifyMatmul | None = None, warm: bool = True) -> int:
    """Swap the model's affine quantized layers for the verify-width ones; returns how many.

    With `warm`, one MIN_ROWS-token forward of `model` (a causal LM taking token ids and a cache)
    makes the kernel decisions for every layer shape and row bucket now (at load time, outside any
    mx.compile trace). engine/backend/verify_kernels.apply adds the dense layers.
    """
    verify = verify or default_verify_matmul()
    swapped: list[nn.Module] = []

    def swap(_path: str, module: nn.Module) -> nn.Module:
        if not swappable(module):
            return module
        cls = VerifyQuantizedLinear if isinstance(module, nn.QuantizedLinear) else VerifyQuantizedEmbedding
        swapped.append(cls.from_quantized(module, verify))
        return swapped[-1]

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    if warm and verify.kernel is not None and swapped:
        # A forward, not the scales' dtype: the activations are what the embedding and norms make them
        # (a GGUF's float32 norms feed its float16-scaled layers float32); each layer's plan decides all buckets.
        try:
            mx.eval(model(mx.zeros((1, MIN_ROWS), dtype=mx.int32), cache=make_prompt_cache(model)))
        except (TypeError, ValueError, AttributeError) as e:  # not a causal LM (a draft): guess from the scales
            log.info("verify matmul: no probe forward (%s); deciding for the scales' dtype", e)
            for m in swapped:
                spec = verify.spec_for(m["scales"].dtype, m["weight"], m["scales"], m.group_size, m.bits)
                if spec is not None:
                    verify.decide_all(spec)
    log.info("verify matmul: %d quantized layers swapped (%s, kernels %s)", len(swapped),
             verify.backend, "on" if verify.kernel is not None else "off")
    return len(swapped)
