"""The quantized CPU kernels (kernels/cpu_quant): built at the first start, checked, chosen by measurement.

MLX 0.32.4's CPU backend has no fast path for quantized weights (its 4-bit matmul took 16 ms at one row
and 259 ms at 16 for the 135M model's products on a 2-core Xeon, against float32's 36 and 65), so without
these kernels the server dequantizes small models to float32 there, and a decode step is mostly the
float32 weights' stream. The extension reads 4- or 8-bit weights with int8 dot products (AVX-512 VNNI)
and runs float32 block attention in one pass per query row. It is an MLX C++ extension: compiled once
per machine, MLX version and source with the system's C++ compiler, against the mlx wheel's headers and
nanobind (the version MLX's own bindings use, so mx.array crosses unchanged), into
~/.cache/dflash-server/cpu_quant/. Where it cannot be built or loaded, fails its numerics check, or is
not faster than float32 on this machine (timed once, cached per machine like the BLAS), the server keeps
float32 and says why in one line.

DFLASH_CPU_QUANT=auto|on|off: auto builds, checks and times it; on skips the timing; off never builds it.
Activations are held as two int8 codes per block of 32 (~15 bits), close enough to float32 that the
embedded model's greedy answers are the float32 path's; each row is computed alone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import numpy as np

from engine.backend.disk_cache import DiskCache, cache_home
from engine.backend.verify_matmul import KERNELS_DIR

log = logging.getLogger("dflash.kernels")

ENV = "DFLASH_CPU_QUANT"
CHOICES = ("auto", "on", "off")
SOURCE = KERNELS_DIR / "cpu_quant" / "quant_matmul.cpp"
NANOBIND_VERSION = "3.1.0"  # MLX 0.32.4's bindings: another version's types do not accept mx.array
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
COMPILE_FLAGS = ["-O3", "-DNDEBUG", "-fPIC", "-fvisibility=hidden", "-std=gnu++20", "-fno-strict-aliasing"]
KERNEL_FLAGS = ["-fopenmp", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni"]
BUILD_TIMEOUT_S = 600
MAX_REL_ERROR = 1e-4  # float32 rounding (and the attention's exp); a wrong layout or scale is off by ~100%
CACHE_ENV = "DFLASH_CPU_QUANT_CACHE"
# (N, K) of one SmolLM2-135M layer's products (packed q/k/v, o, packed gate/up, down): what is timed
TIMED_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
TIMED_LAYERS = 8


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why in words a user can act on."""


@dataclass(frozen=True)
class CpuQuant:
    """What the server uses for 4- and 8-bit layers on the CPU: `ext` is the built extension, or None for float32."""

    ext: ModuleType | None
    reason: str

    def matmul(self, x: mx.array, w: mx.array, scales: mx.array, mins: mx.array, n_out: int, group: int) -> mx.array:
        assert self.ext is not None
        return self.ext.quant_matmul(x, w, scales, mins, n_out, group)

    def top_probability(self, logits: mx.array) -> mx.array:
        """(..., V) float32 -> (...,) softmax probability of each row's largest entry."""
        assert self.ext is not None
        return self.ext.top_probability(logits)


def choice(environ: Mapping[str, str] = os.environ) -> str:
    value = environ.get(ENV, "auto").strip().lower() or "auto"
    if value in ("0", "no", "false"):
        return "off"
    if value in ("1", "yes", "true"):
        return "on"
    if value not in CHOICES:
        raise KernelUnavailable(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


@functools.cache
def default_cpu_quant() -> CpuQuant:
    """Build (once per machine), check and time the kernel; float32 (ext None) with the reason otherwise."""
    try:
        how = choice()
        if how == "off":
            return CpuQuant(None, f"off ({ENV}=off)")
        unsupported_here()
        ext = load_extension()
        error = max_rel_error(ext)
        if not error <= MAX_REL_ERROR:  # also NaN
            return CpuQuant(None, f"failed its numerics check (relative error {error:.3g})")
        if how == "on":
            return CpuQuant(ext, f"on ({ENV}=on)")
        return timed_choice(ext)
    except KernelUnavailable as e:
        return CpuQuant(None, str(e))


def unsupported_here(cpuinfo: str | None = None) -> None:
    """Raise KernelUnavailable where this machine cannot build or run the kernel."""
    if mx.default_device() != mx.cpu:
        raise KernelUnavailable("MLX runs on a GPU")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"no kernel for {sys.platform} {platform.machine()} (x86-64 Linux only)")
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError as e:
            raise KernelUnavailable(f"cannot read /proc/cpuinfo ({e})") from e
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        raise KernelUnavailable(f"this CPU lacks {', '.join(missing)} (AVX-512 VNNI)")


def build_key() -> str:
    """What a built extension is valid for: this source, MLX, nanobind, Python and compiler."""
    parts = [SOURCE.read_bytes(), mx.__version__.encode(), _nanobind_version().encode(),
             sysconfig.get_config_var("EXT_SUFFIX").encode(), (shutil.which("c++") or "").encode(),
             " ".join(COMPILE_FLAGS + KERNEL_FLAGS).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def load_extension(directory: Path | None = None) -> ModuleType:
    """The built extension, compiling it first where this key has none yet (~1 minute on 2 cores)."""
    target = (directory or cache_home() / "cpu_quant") / build_key()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    library = target / f"_cpu_quant{suffix}"
    if not library.is_file():
        compile_extension(library)
    spec = importlib.util.spec_from_file_location("_cpu_quant", library,
                                                  loader=importlib.machinery.ExtensionFileLoader("_cpu_quant", str(library)))
    if spec is None or spec.loader is None:
        raise KernelUnavailable(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise KernelUnavailable(f"{library} does not load ({e}); delete it to rebuild") from e
    return module


def compile_extension(library: Path) -> None:
    """Compile nanobind and the kernel into `library`, atomically (a concurrent start builds its own copy)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (install g++)")
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").is_file():
        raise KernelUnavailable(f"no Python headers in {python_include} (install python3-dev)")
    if _nanobind_version() != NANOBIND_VERSION:
        raise KernelUnavailable(f"needs nanobind=={NANOBIND_VERSION} (pip install nanobind=={NANOBIND_VERSION})")
    import nanobind

    nb_root = Path(nanobind.__file__).parent
    mlx_root = Path(mx.__file__).resolve().parent
    if not (mlx_root / "include" / "mlx" / "mlx.h").is_file():
        raise KernelUnavailable(f"the mlx wheel at {mlx_root} has no C++ headers")
    includes = ["-I", str(python_include), "-I", str(nb_root / "include"), "-I",
                str(nb_root / "ext" / "robin_map" / "include"), "-isystem", str(mlx_root / "include")]
    defines = ["-DNB_DOMAIN=mlx", "-DNB_COMPACT_ASSERTIONS"]  # MLX's domain: its array type is found
    library.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the quantized CPU kernel (once for this machine and MLX version, about a minute) into %s",
             library.parent)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        objects = [Path(tmp) / "nanobind.o", Path(tmp) / "quant_matmul.o"]
        jobs = [
            [compiler, *COMPILE_FLAGS, *defines, "-DNB_BUILD", *includes, "-c", str(nb_root / "src" / "nb_combined.cpp"),
             "-o", str(objects[0])],
            [compiler, *COMPILE_FLAGS, *KERNEL_FLAGS, *defines, *includes, "-c", str(SOURCE), "-o", str(objects[1])],
        ]
        _run_all(jobs)
        built = Path(tmp) / library.name
        _run_all([[compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(built), "-L", str(mlx_root / "lib"),
                   "-lmlx", f"-Wl,-rpath,{mlx_root / 'lib'}"]])
        built.replace(library)
    log.info("quantized CPU kernel built in %.0f s", time.perf_counter() - start)


def _run_all(commands: list[list[str]]) -> None:
    """Run the commands side by side; KernelUnavailable with the first failure's output."""
    running = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    failures = []
    for command, process in zip(commands, running):
        try:
            output, _ = process.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output = f"timed out after {BUILD_TIMEOUT_S} s"
        if process.returncode:
            failures.append(f"{Path(command[-3]).name if '-c' in command else 'link'}: {output.strip()[-600:]}")
    if failures:
        raise KernelUnavailable("the quantized CPU kernel did not build: " + " | ".join(failures))


def _nanobind_version() -> str:
    try:
        return importlib.metadata.version("nanobind")
    except importlib.metadata.PackageNotFoundError:
        return ""


def max_rel_error(ext: ModuleType) -> float:
    """Worst error of the kernel against float64 on random 4- and 8-bit layers, relative to the largest output, with
    activations the int8 rounding keeps exactly (a wrong layout is off by ~100%); and batch invariance:
    every row of a 7-row product must equal the same row alone, bit for bit (or the error is inf)."""
    from engine.model.quant_linear import pack

    rng = np.random.default_rng(0)
    worst = 0.0
    for n, k, group, bits, dtype in ((40, 96, 32, 4, mx.float16), (33, 256, 64, 4, mx.float32),
                                     (16, 128, 128, 4, mx.float16), (21, 96, 32, 8, mx.float16), (17, 128, 64, 8, mx.float32)):
        w, scales, biases = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32)), group_size=group, bits=bits)
        scales, biases = scales.astype(dtype), biases.astype(dtype)
        packed = pack(w, scales, biases, group, bits)
        ints = rng.integers(-127, 128, (7, k))
        ints[:, ::32] = 127  # each block's largest magnitude: its int8 step is exactly 1 / 64
        x = mx.array((ints / 64).astype(np.float32))
        y = np.asarray(ext.quant_matmul(x, *packed, n, group))
        alone = np.concatenate([np.asarray(ext.quant_matmul(x[i : i + 1], *packed, n, group)) for i in range(7)])
        if not np.array_equal(y, alone):
            return float("inf")
        dense = np.asarray(mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group, bits), np.float64)
        reference = np.asarray(x, np.float64) @ dense.T
        worst = max(worst, float(np.abs(y - reference).max() / np.abs(reference).max()))
    return max(worst, attention_error(ext, rng), top_probability_error(ext, rng), swiglu_error(ext, rng),
               rms_norm_error(ext, rng))


def attention_error(ext: ModuleType, rng: np.random.Generator) -> float:
    """The block attention's worst error against float64, relative to the largest output (a causal and an
    unmasked block over a strided cache view, grouped heads), or inf where a row of the block differs
    from the same row computed alone."""
    worst = 0.0
    for rows, length, causal in ((5, 37, True), (3, 20, False)):
        q = rng.standard_normal((1, 4, rows, 32)).astype(np.float32)
        cache = rng.standard_normal((2, 1, 2, length + 8, 32)).astype(np.float32)
        keys, values = (mx.array(c)[:, :, :length] for c in cache)  # a KV cache's view: rows strided
        got = np.asarray(ext.block_attention(mx.array(q), keys, values, 0.25, causal))
        for row in range(rows):
            visible = length - rows + row + 1 if causal else length
            k, v = np.asarray(keys, np.float64)[0, :, :visible], np.asarray(values, np.float64)[0, :, :visible]
            scores = np.einsum("hgd,hsd->hgs", q[0, :, row].reshape(2, 2, 32).astype(np.float64), k) * 0.25
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            want = np.einsum("hgs,hsd->hgd", weights / weights.sum(-1, keepdims=True), v).reshape(4, 32)
            alone = np.asarray(ext.block_attention(mx.array(q[:, :, row : row + 1]), keys[:, :, :visible],
                                                   values[:, :, :visible], 0.25, False))[0, :, 0]
            if not np.array_equal(alone, got[0, :, row]):
                return float("inf")
            worst = max(worst, float(np.abs(got[0, :, row] - want).max() / np.abs(want).max()))
    return worst


def top_probability_error(ext: ModuleType, rng: np.random.Generator) -> float:
    """top_probability's worst relative error against float64 softmax (rows of a length not a multiple of 16)."""
    logits = (rng.standard_normal((3, 1000)) * 4).astype(np.float32)
    logits[1, 7] = 30.0  # one sure row
    got = np.asarray(ext.top_probability(mx.array(logits)))
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    want = 1.0 / np.exp(shifted).sum(-1)
    return float(np.abs(got - want).max() / want.max())


def swiglu_error(ext: ModuleType, rng: np.random.Generator) -> float:
    """swiglu's worst error against float64, relative to the largest output (a width not a multiple of 16,
    gates out to where e^-gate saturates), or inf where a row differs from the same row alone."""
    gate_up = (rng.standard_normal((5, 2 * 50)) * 6).astype(np.float32)
    gate_up[0, :4] = [-120.0, -90.0, 90.0, 0.0]
    got = np.asarray(ext.swiglu(mx.array(gate_up), 50))
    if not np.array_equal(got[2], np.asarray(ext.swiglu(mx.array(gate_up[2:3]), 50))[0]):
        return float("inf")
    gate, up = gate_up[:, :50].astype(np.float64), gate_up[:, 50:].astype(np.float64)
    want = gate * up / (1.0 + np.exp(-gate))
    return float(np.abs(got - want).max() / np.abs(want).max())


def rms_norm_error(ext: ModuleType, rng: np.random.Generator) -> float:
    """rms_norm's worst error against float64, relative to the largest output (a width not a multiple of 16, a
    strided input), or inf where a row differs from the same row alone."""
    x = (rng.standard_normal((4, 2, 40)) * 3).astype(np.float32)
    weight = rng.standard_normal(40).astype(np.float32)
    view = mx.array(x).transpose(1, 0, 2)  # (2, 4, 40), rows strided
    got = np.asarray(ext.rms_norm(view, mx.array(weight), 1e-5))
    if not np.array_equal(got[1, 2], np.asarray(ext.rms_norm(mx.array(x[2:3, 1]), mx.array(weight), 1e-5))[0]):
        return float("inf")
    rows = x.transpose(1, 0, 2).astype(np.float64)
    want = weight * rows / np.sqrt((rows**2).mean(-1, keepdims=True) + 1e-5)
    return float(np.abs(got - want).max() / np.abs(want).max())


def timed_choice(ext: ModuleType, cache: DiskCache | None = None) -> CpuQuant:
    """The kernel if it beats float32 on a decode step's and a verify's products here (cached per machine)."""
    cache = cache if cache is not None else DiskCache.default("cpu_quant.json", CACHE_ENV, 16)
    key = machine_key()
    entry = None if cache is None else cache.get(key)
    if entry is None:
        entry = time_products(ext)
        if cache is not None:
            cache.put(key, entry, "the quantized CPU kernel's timing")
    kernel_ms, float32_ms = entry["kernel_ms"], entry["float32_ms"]
    ratio = f"{float32_ms / kernel_ms:.2f}x float32's speed on {TIMED_LAYERS} layers' products"
    if kernel_ms < float32_ms * 0.97:
        return CpuQuant(ext, ratio)
    return CpuQuant(None, f"not faster than float32 here ({ratio})")


def machine_key() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")), "?")
    return f"{cpu} / {os.cpu_count()} cores / mlx {mx.__version__} / {build_key()}"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def random_layers(shapes: list[tuple[int, int, int]], rng: np.random.Generator
                  ) -> list[tuple[tuple[mx.array, mx.array, mx.array], int, mx.array]]:
    """Random (N, K) layers quantized to `bits` with float16 scales in groups of 32, as (the kernel's arrays,
    N, the float32 weights transposed to (K, N) for MLX's product)."""
    from engine.model.quant_linear import pack

    layers = []
    for n, k, bits in shapes:
        dense = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
        w, scales, biases = mx.quantize(dense, group_size=32, bits=bits)
        layers.append((pack(w, scales.astype(mx.float16), biases.astype(mx.float16), 32, bits), n, mx.contiguous(dense.T)))
    mx.eval([layer[2] for layer in layers])
    return layers


def time_products(ext: ModuleType, rounds: int = 5) -> dict[str, float]:
    """Milliseconds of TIMED_LAYERS layers' products at 1 row plus a third of 16 rows (a token's share of a
    verify), the kernel against float32 through MLX (with the BLAS this process runs), interleaved."""
    rng = np.random.default_rng(1)
    layers = random_layers([(n, k, 4) for n, k in TIMED_SHAPES * TIMED_LAYERS], rng)

    def timed(product: Callable[[mx.array], mx.array], rows: int) -> float:
        xs = {k: mx.array(rng.standard_normal((rows, k)).astype(np.float32)) for _, k in TIMED_SHAPES}
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            mx.eval([product(xs[layer[2].shape[0]], layer) for layer in layers])
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    def kernel(x: mx.array, layer: tuple) -> mx.array:
        return ext.quant_matmul(x, *layer[0], layer[1], 32)

    def dense(x: mx.array, layer: tuple) -> mx.array:
        return x @ layer[2]

    kernel_ms = float32_ms = float("inf")
    for _ in range(2):  # interleaved: a slow moment of the machine hits both
        kernel_ms = min(kernel_ms, timed(kernel, 1) + timed(kernel, 16) / 3)
        float32_ms = min(float32_ms, timed(dense, 1) + timed(dense, 16) / 3)
    return {"kernel_ms": round(kernel_ms, 3), "float32_ms": round(float32_ms, 3)}
