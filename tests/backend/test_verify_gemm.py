"""Verify-width dense matmul (engine/backend/verify_gemm.py): kernel sources, runtime choice, layer swap.

No GPU here, so the CUDA and Metal sources are compiled with g++ against the SIMT shim
(tests/simt_shim.py: one std::thread per GPU thread) and checked against NumPy in float64. The CUDA
kernel's tensor-core mma (inline PTX) is replaced by an emulation below that exchanges each warp's
fragments exactly as PTX lays them out for mma.m16n8k16 .row.col, so the kernel's fragment mapping,
K permutation, tiles, tails, unaligned fallback and reductions run for real; where nvcc is installed
the same source is also compiled for sm_80 and sm_90 (no errors, no register spills). The device
tests at the bottom run the real kernels against MLX on CUDA or Metal.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from simt_shim import C_TYPES, SHIM_CUDA, SHIM_METAL, round_to, stored_to_float

from engine.backend import verify_gemm as vg
from engine.backend import verify_kernels as vk
from engine.backend import verify_matmul as vm
from engine.backend.disk_cache import DiskCache

# ---------------------------------------------------------------- kernel source on a CPU SIMT shim

# The mma as PTX defines it: lane (g = lane / 4, t = lane % 4) holds a0 = A[g][2t..2t+1], a1 = A[g+8][2t..],
# a2 = A[g][2t+8..], a3 = A[g+8][2t+8..], b0 = B[2t..2t+1][g], b1 = B[2t+8..][g] (low half = lower
# index) and d[e] = D[g + 8 (e / 2)][2t + e % 2].
MMA_EMULATION = r"""
#define DFLASH_SIMT_SHIM 1
inline uint4 __ldcs(const uint4* p) { return *p; }
static unsigned g_frag[1024][6];
template <typename T> float vgemm_half(unsigned word, int hi);
template <> float vgemm_half<__nv_bfloat16>(unsigned word, int hi) { return bits_float((hi ? word >> 16 : word & 0xffffu) << 16); }
template <> float vgemm_half<__half>(unsigned word, int hi) {
  __half h; h.b = (uint16_t)(hi ? word >> 16 : word & 0xffffu); return __half2float(h);
}
template <typename T> struct VgemmMma {
  static void run(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    unsigned* f = g_frag[g_tid];
    f[0] = a0; f[1] = a1; f[2] = a2; f[3] = a3; f[4] = b0; f[5] = b1;
    warp_sync();
    const unsigned base = g_tid & ~31u, g = (g_tid & 31u) >> 2, t = g_tid & 3u;
    auto A = [&](int r, int k) { return vgemm_half<T>(g_frag[base + (r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k & 1); };
    auto B = [&](int k, int n) { return vgemm_half<T>(g_frag[base + n * 4 + (k % 8) / 2][4 + (k >= 8)], k & 1); };
    for (int e = 0; e < 4; ++e) {
      const int r = g + 8 * (e >> 1), c = 2 * t + (e & 1);
      float s = d[e];
      for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, c);
      d[e] = s;
    }
    warp_sync();
  }
};
"""

MAIN = r"""
template <typename V> std::vector<V> read_all(const char* path, size_t n, size_t pad) {
  std::vector<V> v(n + pad); std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data() + pad), n * sizeof(V)); return v;
}
int main(int argc, char** argv) {
  const int M = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]), pad = atoi(argv[7]);
  const int x_shape[2] = {M, K}, w_shape[2] = {N, K};
  // pad > 0 shifts x and w by `pad` elements: an unaligned view, the kernels' scalar-load path
  auto x = read_all<XT>(argv[4], (size_t)M * K, pad);
  auto w = read_all<XT>(argv[5], (size_t)N * K, pad);
  std::vector<XT> y((size_t)M * N);
  const int threads = THREADS_, blocks = (N + COLUMNS_ - 1) / COLUMNS_;
  setup_barriers(threads);
  BLOCKDIM_;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] {
    g_tid = t;
    for (int blk = 0; blk < blocks; ++blk) {
      SET_THREAD(t, blk);
      verify_gemm(x.data() + pad, x_shape, w.data() + pad, w_shape, y.data());
      block_sync();
    }
  });
  for (auto& p : pool) p.join();
  std::ofstream(argv[6], std::ios::binary).write(reinterpret_cast<char*>(y.data()), y.size() * sizeof(XT));
}
"""


def kernel_source(backend: str, dtype: str, bucket: int, tiling: vg.GemmTiling,
                  mutate: tuple[str, str] | None = None) -> str:
    """The kernel file wrapped as a C++ function for the shim, as MLX wraps it for the GPU."""
    header, body = vm.read_kernel_source("verify_gemm.cu" if backend == "cuda" else "verify_gemm.metal")
    if mutate is not None:
        assert mutate[0] in body, mutate
        body = body.replace(mutate[0], mutate[1])
    ctype = C_TYPES[dtype][0 if backend == "cuda" else 1]
    dev = "" if backend == "cuda" else "device "
    constants = [("MB", bucket), ("NC", tiling.nc), ("WN", tiling.wn), ("WK", tiling.wk)]
    if backend == "cuda":
        constants.append(("KU", tiling.ku))
    prelude = SHIM_CUDA + MMA_EMULATION if backend == "cuda" else SHIM_METAL
    defines = {"XT": ctype, "THREADS_": tiling.threads, "COLUMNS_": tiling.columns,
               "BLOCKDIM_": f"blockDim.x = {tiling.threads}" if backend == "cuda" else "(void)0"}
    return (prelude + header.replace("#include <metal_stdlib>", "")
            + f"void verify_gemm(const {dev}{ctype}* x, const int* x_shape, const {dev}{ctype}* w,"
            f" const int* w_shape, {dev}{ctype}* y) {{\n  using T = {ctype};\n"
            + "".join(f"  constexpr int {name} = {value};\n" for name, value in constants) + body + "\n}\n"
            + "".join(f"#define {key} {value}\n" for key, value in defines.items()) + MAIN)


@functools.lru_cache(maxsize=None)
def shim_binary(backend: str, dtype: str, bucket: int, tiling: vg.GemmTiling,
                mutate: tuple[str, str] | None = None) -> Path:
    """The compiled shim program (cached per process: g++ takes a few seconds)."""
    folder = Path(tempfile.mkdtemp(prefix="verify_gemm_shim_"))
    (folder / "k.cpp").write_text(kernel_source(backend, dtype, bucket, tiling, mutate))
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-w", "-o", str(folder / "k"), str(folder / "k.cpp")],
                   check=True, capture_output=True, text=True)
    return folder / "k"


def run_shim(backend: str, x_raw: np.ndarray, w_raw: np.ndarray, dtype: str, bucket: int, tiling: vg.GemmTiling,
             pad: int = 0, mutate: tuple[str, str] | None = None) -> np.ndarray:
    """y = x @ w.T by the kernel source on the shim, as float64 of the stored output dtype."""
    binary = shim_binary(backend, dtype, bucket, tiling, mutate)
    (m, k), n = x_raw.shape, w_raw.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        np.ascontiguousarray(x_raw).tofile(f"{tmp}/x")
        np.ascontiguousarray(w_raw).tofile(f"{tmp}/w")
        subprocess.run([str(binary), str(m), str(k), str(n), f"{tmp}/x", f"{tmp}/w", f"{tmp}/y", str(pad)],
                       check=True, timeout=120)
        y = np.fromfile(f"{tmp}/y", dtype=C_TYPES[dtype][2]).reshape(m, n)
    return stored_to_float(y, dtype)


def random_problem(m: int, k: int, n: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw x and w of `dtype` and the float64 product of their rounded values."""
    rng = np.random.default_rng(m * 1000 + k * 7 + n)
    x_raw, x = round_to(rng.normal(size=(m, k)), dtype)
    w_raw, w = round_to(rng.normal(size=(n, k)) * k**-0.5, dtype)
    return x_raw, w_raw, x @ w.T


def rel_error(y: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(y - expected)) / np.max(np.abs(expected)))


# output rounding dominates: half an ulp of the largest |y| at most, a float32 sum below that
SHIM_TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
NEEDS_GXX = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
T = vg.GemmTiling

CUDA_CASES = [  # m, k, n, dtype, bucket, tiling, pad: K and N tails, partial buckets, x tiles 1..4
    (2, 200, 40, "bfloat16", 8, T(16, 1, 8, 2), 0),       # K % 32 = 8, N % 16 = 8, 8 warps share K
    (5, 136, 24, "float16", 8, T(16, 1, 4, 4), 0),        # spans beyond K on most warps
    (16, 264, 70, "bfloat16", 16, T(32, 2, 4, 1), 0),     # 2 weight tiles a warp, a partial block
    (9, 96, 33, "bfloat16", 16, T(16, 1, 8, 2), 0),       # one x row in the second x tile
    (32, 520, 18, "float16", 32, T(16, 1, 4, 4), 0),      # all four x tiles full
    (23, 72, 50, "bfloat16", 32, T(32, 2, 4, 1), 1),      # unaligned x and w: 2-byte loads
    (3, 64, 17, "float16", 8, T(16, 1, 8, 2), 3),
]


@NEEDS_GXX
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}{c[3]}b{c[4]}nc{c[5].nc}wk{c[5].wk}p{c[6]}")
def test_cuda_kernel_source_on_the_shim(case: tuple) -> None:
    m, k, n, dtype, bucket, tiling, pad = case
    x_raw, w_raw, expected = random_problem(m, k, n, dtype)
    y = run_shim("cuda", x_raw, w_raw, dtype, bucket, tiling, pad)
    assert rel_error(y, expected) < SHIM_TOL[dtype]


METAL_CASES = [
    (2, 200, 40, "bfloat16", 8, T(4, 2, 2)),
    (7, 264, 13, "float16", 8, T(4, 4, 1)),
    (16, 520, 30, "float32", 16, T(2, 4, 2)),
    (11, 72, 9, "bfloat16", 16, T(4, 2, 2)),
    (32, 136, 21, "float32", 32, T(2, 2, 2)),
    (17, 64, 5, "bfloat16", 32, T(2, 4, 1)),
]


@NEEDS_GXX
@pytest.mark.parametrize("case", METAL_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}{c[3]}b{c[4]}nc{c[5].nc}wk{c[5].wk}")
def test_metal_kernel_source_on_the_shim(case: tuple) -> None:
    m, k, n, dtype, bucket, tiling = case
    x_raw, w_raw, expected = random_problem(m, k, n, dtype)
    y = run_shim("metal", x_raw, w_raw, dtype, bucket, tiling)
    assert rel_error(y, expected) < SHIM_TOL[dtype]


def test_bf16_output_rounds_to_nearest_even() -> None:
    """Exact products: the kernel's float32 sum is exact, so y must be that sum rounded to nearest even."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    m, k, n = 4, 64, 16
    rng = np.random.default_rng(1)
    # small integers times powers of two: every product and partial sum is exact in float32
    x_raw, x = round_to(rng.integers(-8, 9, size=(m, k)) * 2.0 ** rng.integers(-3, 4, size=(m, k)), "bfloat16")
    w_raw, w = round_to(rng.integers(-8, 9, size=(n, k)) * 2.0 ** rng.integers(-3, 4, size=(n, k)), "bfloat16")
    exact = x @ w.T
    _, rounded = round_to(exact, "bfloat16")
    assert not np.array_equal(rounded, exact)  # rounding happens, and ties are possible
    for backend, tiling in (("cuda", T(16, 1, 4, 4)), ("metal", T(4, 2, 2))):
        assert np.array_equal(run_shim(backend, x_raw, w_raw, "bfloat16", 8, tiling), rounded), backend


# Each mutation is a bug the shim tests must catch: an off-by-one in the K loop's range check drops
# the last 8 values of K; x tile rows shifted by one; the WK partial sums not all added.
MUTATIONS = [
    ("cuda", "xb[j] = (m < M && k < K)", "xb[j] = (m < M && k + 8 < K)"),
    ("cuda", "const int m = j * 8 + g;", "const int m = j * 8 + g + 1;"),
    ("cuda", "for (int v = 0; v < WK; ++v)", "for (int v = 1; v < WK; ++v)"),
    ("metal", "k0 < K; k0 += WK * STEP", "k0 + LV < K; k0 += WK * STEP"),
]


@NEEDS_GXX
@pytest.mark.parametrize("backend,before,after", MUTATIONS, ids=lambda v: str(v)[:24])
def test_the_shim_catches_a_mutated_kernel(backend: str, before: str, after: str) -> None:
    m, k, n, dtype = 9, 200, 40, "bfloat16"
    x_raw, w_raw, expected = random_problem(m, k, n, dtype)
    tiling = T(16, 1, 4, 4) if backend == "cuda" else T(4, 2, 2)
    assert rel_error(run_shim(backend, x_raw, w_raw, dtype, 16, tiling), expected) < SHIM_TOL[dtype]
    assert rel_error(run_shim(backend, x_raw, w_raw, dtype, 16, tiling, mutate=(before, after)), expected) > 0.02


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA toolkit) for the compile check")
def test_cuda_source_compiles_without_spills(tmp_path: Path) -> None:
    """Every shipped (dtype, bucket, tiling) as MLX wraps it, compiled for sm_80 and sm_90 by nvcc."""
    header, body = vm.read_kernel_source("verify_gemm.cu")
    parts = ["#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"
             "struct Shape { int v[8]; __device__ int operator[](int i) const { return v[i]; } };\n",
             header, "namespace mlx::core::cu {\n"]
    variants = {(dtype, bucket, tiling) for dtype in ("__nv_bfloat16", "__half")
                for bucket, tilings in vg.TILINGS["cuda"].items() for tiling in tilings}
    for i, (dtype, bucket, tiling) in enumerate(sorted(variants, key=str)):
        parts.append(
            f"__global__ void k{i}(const {dtype}* x, const __grid_constant__ Shape x_shape, const {dtype}* w,"
            f" const __grid_constant__ Shape w_shape, {dtype}* y) {{\n  using T = {dtype};\n"
            f"  constexpr int MB = {bucket}; constexpr int NC = {tiling.nc}; constexpr int WN = {tiling.wn};"
            f" constexpr int WK = {tiling.wk}; constexpr int KU = {tiling.ku};\n{body}\n}}\n")
    (tmp_path / "k.cu").write_text("".join(parts) + "}\n")
    for arch in ("sm_80", "sm_90"):
        result = subprocess.run([NVCC, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
                                 str(tmp_path / "k.cu")], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
        assert len(spills) == len(variants) and all(s == "0" for s in spills), result.stderr[-3000:]
        registers = [int(r) for r in re.findall(r"Used (\d+) registers", result.stderr)]
        assert registers and max(registers) <= 255


# ---------------------------------------------------------------- runtime choice with fake kernels


class FakeKernel:
    """A stand-in for the GPU launcher: exact, wrong, slow or the real source on the shim."""

    def __init__(self, mode: str = "exact") -> None:
        self.mode = mode
        self.calls = 0
        self.weights: list[mx.array] = []

    def __call__(self, x: mx.array, w: mx.array, spec: vg.GemmSpec, bucket: int, tiling: vg.GemmTiling) -> mx.array:
        self.calls += 1
        self.weights.append(w)
        rows = x.size // x.shape[-1]
        assert rows <= bucket and x.dtype == w.dtype == spec.dtype and w.shape == (spec.n, spec.k)
        if self.mode == "shim":
            dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}[spec.dtype]
            x_raw = np.array(x.reshape(rows, spec.k).view(mx.uint16) if dtype == "bfloat16" else x.reshape(rows, spec.k))
            w_raw = np.array(w.view(mx.uint16) if dtype == "bfloat16" else w)
            y = mx.array(run_shim("cuda", x_raw, w_raw, dtype, bucket, tiling).astype(np.float32))
            return y.astype(spec.dtype).reshape(*x.shape[:-1], spec.n)
        y = vg.float32_reference(x, w).astype(x.dtype)
        if self.mode == "wrong":
            return y + 0.05 * mx.max(mx.abs(y))
        if self.mode == "slow":
            time.sleep(0.02)
        return y


def fake_timer(fn: object) -> float:
    # Injected timings: MLX takes 1 ms at the bucket's rows and 0.3 ms at one row, any kernel 0.5 ms.
    return {"bucket_reference": 1.0, "one_row_reference": 0.3}.get(fn.__name__, 0.5)


SPEC = vg.GemmSpec(n=48, k=64, dtype=mx.bfloat16)


def fake_gemm(mode: str = "exact", timer: object = fake_timer, backend: str = "cuda") -> tuple[vg.VerifyGemm, FakeKernel]:
    kernel = FakeKernel(mode)
    return vg.VerifyGemm(backend=backend, kernel=kernel, enabled=True, timer=timer), kernel


def rel_close(a: mx.array, b: mx.array, rtol: float) -> bool:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.max(mx.abs(a - b)) / mx.maximum(mx.max(mx.abs(b)), 1e-6)).item() < rtol


def test_row_buckets() -> None:
    assert [vg.row_bucket(r) for r in (1, 2, 8, 9, 16, 17, 32, 33, 64)] == [None, 8, 8, 16, 16, 32, 32, None, None]


def test_a_correct_faster_kernel_is_used_and_the_choice_cached() -> None:
    gemm, kernel = fake_gemm()
    w = vg.random_weight(SPEC)
    decision = gemm.decide(SPEC, 16, w)
    assert decision.tiling == vg.TILINGS["cuda"][16][0] and decision.max_rel_error < 1e-2
    assert all(seen is w for seen in kernel.weights)  # checked on the layer's own weight, no random copy
    calls = kernel.calls
    assert gemm.decide(SPEC, 16) is decision and kernel.calls == calls  # cached, not re-checked
    x = mx.random.normal((16, SPEC.k)).astype(mx.bfloat16)
    assert rel_close(gemm(x, w), x @ w.T, 1e-2) and kernel.calls == calls + 1
    gemm(x[:1], w)  # one row: decode takes MLX's matmul
    gemm(mx.concatenate([x, x, x]), w)  # 48 rows: a prefill chunk takes MLX's matmul
    assert kernel.calls == calls + 1


def test_timed_calls_take_turns_over_weights_past_the_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check's timed products read their weights from memory, as a forward does: the layer's own and
    random copies of its shape, together past COLD_BYTES, in turn (numerics on the layer's own)."""
    monkeypatch.setattr(vg, "COLD_BYTES", 4 * vg.random_weight(SPEC).nbytes)

    def timer(fn: object) -> float:  # calls what is timed, as time_ms does; MLX's timings as the fake's
        for _ in range(8):
            fn()
        return fake_timer(fn)

    gemm, kernel = fake_gemm(timer=timer)
    w = vg.random_weight(SPEC)
    assert gemm.decide(SPEC, 16, w).tiling is not None
    timed = [seen for seen in kernel.weights if seen is not w]
    assert len({id(seen) for seen in timed}) == 3 and all(seen.shape == w.shape for seen in timed)
    assert sum(seen is w for seen in kernel.weights) > 3  # numerics (3 row counts per tiling) and its turns
    rotation = vg.cold_rotation(SPEC, w)
    assert [next(rotation) is w for _ in range(8)] == [True, False, False, False] * 2
    big = vg.GemmSpec(n=64, k=64, dtype=mx.float32)
    monkeypatch.setattr(vg, "COLD_BYTES", 16)  # a weight past the L2 alone is timed alone, no copy made
    lone = vg.cold_rotation(big, vg.random_weight(big))
    assert next(lone) is next(lone)


def test_decisions_are_stored_and_a_later_start_reads_them_without_checking(tmp_path: Path) -> None:
    store = DiskCache(tmp_path / "kernels.json", 64)
    first = vg.VerifyGemm(backend="cuda", kernel=FakeKernel(), enabled=True, timer=fake_timer, store=store,
                          source_id="abc")
    decision = first.decide(SPEC, 16)
    assert decision.tiling is not None
    later_kernel = FakeKernel()
    later = vg.VerifyGemm(backend="cuda", kernel=later_kernel, enabled=True, timer=fake_timer, store=store,
                          source_id="abc")
    assert later.decide(SPEC, 16) == decision and later_kernel.calls == 0  # read, not checked again
    edited = FakeKernel()
    vg.VerifyGemm(backend="cuda", kernel=edited, enabled=True, timer=fake_timer, store=store,
                  source_id="edited kernel").decide(SPEC, 16)
    assert edited.calls > 0  # another kernel source is decided again


def test_no_kernel_is_compiled_where_rows_cost_what_one_row_costs() -> None:
    flat = lambda fn: {"bucket_reference": 0.0100, "one_row_reference": 0.0080}.get(fn.__name__, 0.001)  # noqa: E731
    gemm, kernel = fake_gemm(timer=flat)
    decision = gemm.decide(SPEC, 16)
    assert decision.tiling is None and decision.reason.startswith("nothing to win") and kernel.calls == 0


def test_a_kernel_that_fails_numerics_is_rejected() -> None:
    gemm, kernel = fake_gemm("wrong")
    decision = gemm.decide(SPEC, 8)
    assert decision.tiling is None and "numerics" in decision.reason
    w = vg.random_weight(SPEC)
    x = mx.random.normal((8, SPEC.k)).astype(mx.bfloat16)
    calls = kernel.calls
    assert mx.array_equal(gemm(x, w), x @ w.T) and kernel.calls == calls


def test_a_slower_kernel_is_rejected() -> None:
    def timer(fn: object) -> float:  # the kernel is timed for real, MLX's timings injected
        return {"bucket_reference": 1.0, "one_row_reference": 0.3}.get(fn.__name__) or vm.time_ms(fn)

    gemm, _ = fake_gemm("slow", timer=timer)
    decision = gemm.decide(SPEC, 32)
    assert decision.tiling is None and decision.reason == "kernel not faster"


def test_a_kernel_that_raises_is_rejected() -> None:
    def broken(*_: object) -> mx.array:
        raise RuntimeError("nvrtc: error")

    gemm = vg.VerifyGemm(backend="cuda", kernel=broken, enabled=True, timer=fake_timer)
    assert gemm.decide(SPEC, 8).tiling is None


def test_what_a_kernel_covers() -> None:
    gemm, _ = fake_gemm()
    bf16 = mx.zeros((48, 64), dtype=mx.bfloat16)
    assert gemm.covers(mx.bfloat16, bf16) and gemm.covers(mx.float16, bf16.astype(mx.float16))
    assert not gemm.covers(mx.float32, bf16)  # x and w of different dtypes: MLX promotes
    assert not gemm.covers(mx.float32, bf16.astype(mx.float32))  # CUDA float32 stays with MLX (TF32)
    assert fake_gemm(backend="metal")[0].covers(mx.float32, bf16.astype(mx.float32))
    assert not gemm.covers(mx.bfloat16, mx.zeros((48, 60), dtype=mx.bfloat16))  # K % 8 != 0
    assert gemm.plan(mx.bfloat16, 1, bf16) is None and gemm.plan(mx.bfloat16, 33, bf16) is None


def test_gpu_kernels_are_off_on_the_cpu_and_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    if mx.default_device() == mx.cpu:
        assert vg.VerifyGemm().kernel is None
        model = tiny_llama(mx.bfloat16)
        assert vg.apply_dense(model, vg.VerifyGemm()) == 0  # the CPU keeps nn.Linear (transposed.py's)
        assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    monkeypatch.setenv(vg.ENABLE_ENV, "0")
    assert vg.VerifyGemm(backend="cuda", kernel=FakeKernel()).kernel is None
    monkeypatch.setenv(vg.ENABLE_ENV, "1")
    assert vg.VerifyGemm(backend="cuda", kernel=FakeKernel()).kernel is not None
    assert vg.VerifyGemm(backend="cpu", kernel=FakeKernel()).kernel is None


def test_pausing_routes_every_product_to_mlx() -> None:
    gemm, kernel = fake_gemm()
    w = vg.random_weight(SPEC)
    x = mx.random.normal((8, SPEC.k)).astype(mx.bfloat16)
    plan = gemm.plan(mx.bfloat16, 8, w)
    assert plan is not None
    calls = kernel.calls
    gemm.active = False
    assert mx.array_equal(gemm.run(plan, x, w), x @ w.T) and kernel.calls == calls
    gemm.active = True
    gemm.run(plan, x, w)
    assert kernel.calls == calls + 1


# ---------------------------------------------------------------- layer swap on the CPU reference path


def tiny_llama(dtype: mx.Dtype, tie: bool = True) -> nn.Module:
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    model = Model(ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96,
                            tie_word_embeddings=tie))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fuse", [False, True])
def test_swap_keeps_logits(tie: bool, fuse: bool) -> None:
    from engine.model.fused import fuse_projections

    model = tiny_llama(mx.bfloat16, tie)
    if fuse:
        fuse_projections(model)
    gemm, kernel = fake_gemm()
    before = {rows: model(mx.arange(rows)[None] % 96) for rows in (1, 2, 9, 16, 32, 64)}
    names = [name for name, _ in nn.utils.tree_flatten(model.parameters())]
    count = vk.apply(model, confirm=False, gemm=gemm, verify=vm.VerifyMatmul(backend="cpu", enabled=True))
    assert [name for name, _ in nn.utils.tree_flatten(model.parameters())] == names  # same parameter tree
    linears = 2 * (4 if fuse else 7)
    assert count == linears + 1 + (0 if tie else 1)  # the layers' projections, the embedding, the head
    assert isinstance(model.model.embed_tokens, vg.VerifyEmbedding)
    assert isinstance(model.model.layers[1].mlp.down_proj, vg.VerifyLinear)
    assert tie or isinstance(model.lm_head, vg.VerifyLinear)
    # warm: every (shape, bucket) decided at apply
    shapes = {(m["weight"].shape[0], m["weight"].shape[1]) for _, m in model.named_modules()
              if isinstance(m, vg.VerifyDense)}
    assert {(s.n, s.k) for s, _ in gemm.decisions} == shapes and len(gemm.decisions) == 3 * len(shapes)
    for rows, logits in before.items():
        calls = kernel.calls
        after = model(mx.arange(rows)[None] % 96)
        if vg.row_bucket(rows) is None:
            assert mx.array_equal(after, logits) and kernel.calls == calls, rows  # MLX's matmul, unchanged
        else:
            assert kernel.calls > calls and rel_close(after, logits, 3e-2), rows
    assert len(gemm.decisions) == 3 * len(shapes)  # the forwards decided nothing more
    gemm.active = False  # paused: MLX's matmul everywhere, the decisions kept
    calls = kernel.calls
    assert mx.array_equal(model(mx.arange(16)[None] % 96), before[16]) and kernel.calls == calls


@NEEDS_GXX
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_a_linear_with_the_kernel_source_matches_mlx(dtype: mx.Dtype) -> None:
    """The swapped layer running the real CUDA source (on the shim) against nn.Linear, 1 to 64 rows."""
    mx.random.seed(3)
    linear = nn.Linear(72, 40, bias=True)
    linear.set_dtype(dtype)
    gemm, kernel = fake_gemm("shim")
    swapped = vg.VerifyLinear.from_layer(linear, gemm)
    for rows in (1, 2, 5, 8, 9, 16, 17, 32, 64):
        x = mx.random.normal((1, rows, 72)).astype(dtype)
        calls = kernel.calls
        y = swapped(x)
        assert y.shape == (1, rows, 40) and y.dtype == dtype
        assert rel_close(y, linear(x), vm.TOLERANCE[dtype]), rows
        assert (kernel.calls > calls) == (vg.row_bucket(rows) is not None), rows
        if vg.row_bucket(rows) is None:  # decode and prefill: nn.Linear's own addmm, bit for bit
            assert mx.array_equal(y, linear(x)), rows


# ---------------------------------------------------------------- the real kernels on a GPU

GPU = vm.detect_backend() != "cpu"
DEVICE_SHAPES = [(72, 40), (1000, 999), (4096, 6144), (12288, 4096), (4096, 24576), (4096, 151936)]  # (K, N)


@pytest.mark.skipif(not GPU, reason="needs MLX's CUDA or Metal backend")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("k,n", DEVICE_SHAPES)
def test_device_kernel_numerics(k: int, n: int, dtype: mx.Dtype) -> None:
    gemm = vg.VerifyGemm(enabled=True)
    assert gemm.kernel is not None
    if not gemm.covers(dtype, mx.zeros((1, k), dtype)):
        pytest.skip(f"{gemm.backend} leaves {dtype} to MLX")
    spec = vg.GemmSpec(n, k, dtype)
    w = vg.random_weight(spec)
    for rows in (2, 5, 8, 9, 16, 17, 32):
        bucket = vg.row_bucket(rows)
        x = mx.random.normal((rows, k)).astype(dtype)
        ref = vg.float32_reference(x, w)
        for tiling in vg.TILINGS[gemm.backend][bucket]:
            y = gemm.kernel(x, w, spec, bucket, tiling).astype(mx.float32)
            err = (mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))).item()
            assert err < vm.TOLERANCE[dtype], (rows, tiling, err)
            assert rel_close(y, (x @ w.T).astype(mx.float32), 2 * vm.TOLERANCE[dtype]), (rows, tiling)


@pytest.mark.skipif(not GPU, reason="needs MLX's CUDA or Metal backend")
def test_device_kernel_reads_views() -> None:
    """Row slices (the drafter's hidden[0, 1:kept + 1] into the LM head) and an unaligned view."""
    gemm = vg.VerifyGemm(enabled=True)
    k, n, rows = 264, 70, 9
    flat = mx.random.normal((rows * k + 1,)).astype(mx.bfloat16)
    block = mx.random.normal((1, 16, k)).astype(mx.bfloat16)
    views = {"unaligned": flat[1:].reshape(rows, k),  # row contiguous, 2 bytes past a 16-byte boundary
             "row slice": block[0, 1:rows + 1]}
    w = vg.random_weight(vg.GemmSpec(n, k, mx.bfloat16))
    for name, x in views.items():
        for tiling in vg.TILINGS[gemm.backend][16]:
            y = gemm.kernel(x, w, vg.GemmSpec(n, k, mx.bfloat16), 16, tiling)
            assert rel_close(y, vg.float32_reference(x, w), vm.TOLERANCE[mx.bfloat16]), (name, tiling)


@pytest.mark.skipif(not GPU, reason="needs MLX's CUDA or Metal backend")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_device_swap_keeps_logits(dtype: mx.Dtype) -> None:
    """Whatever the runtime check decides on this device, a swapped model's logits stay MLX's."""
    model = tiny_llama(dtype, tie=False)
    before = {rows: model(mx.arange(rows)[None] % 96).astype(mx.float32) for rows in (1, 3, 16, 32, 64)}
    gemm = vg.VerifyGemm(enabled=True)
    # force the kernel wherever it passes numerics: tiny layers cost what one row costs on a GPU
    gemm.timer = lambda fn: {"bucket_reference": 1.0, "one_row_reference": 0.3}.get(fn.__name__, 0.5)
    assert vk.apply(model, confirm=False, gemm=gemm) == 2 * 7 + 2
    assert any(d.tiling is not None for d in gemm.decisions.values()), gemm.decisions
    for rows, logits in before.items():
        assert rel_close(model(mx.arange(rows)[None] % 96), logits, 5e-2), rows


@pytest.mark.skipif(not GPU or os.environ.get("DFLASH_VERIFY_KERNEL") == "0", reason="needs a GPU backend")
def test_device_decision_for_an_8b_layer_is_logged_with_its_timings() -> None:
    gemm = vg.VerifyGemm(enabled=True)
    spec = vg.GemmSpec(24576, 4096, mx.bfloat16)
    decision = gemm.decide(spec, 16)
    assert decision.reference_ms > 0 and decision.reason
    print(f"gate_up 24576x4096 bf16, rows<=16: {decision}")


class FakeClock:
    """A clock that a forward advances by its own cost, so confirm_end_to_end's choice is deterministic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("on_ms,off_ms,kept", [(9.0, 12.0, True), (12.8, 9.3, False), (9.2, 9.3, False)])
def test_dense_kernels_stay_only_if_a_whole_forward_is_faster(on_ms: float, off_ms: float, kept: bool) -> None:
    gemm = vg.VerifyGemm(backend="cpu", enabled=False)
    clock = FakeClock()
    seen: list[bool] = []

    def forward() -> None:
        seen.append(gemm.active)
        clock.now += (on_ms if gemm.active else off_ms) / 1e3

    report = vk.confirm_end_to_end(forward, gemm, reps=3, clock=clock)
    assert gemm.active is kept and seen == [True, False] * 4  # interleaved, one warm-up round each
    assert f"{on_ms:.2f} ms with them, {off_ms:.2f} ms without" in report


def test_confirm_restores_the_kernels_when_the_forward_raises() -> None:
    gemm = vg.VerifyGemm(backend="cpu", enabled=False)

    def forward() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        vk.confirm_end_to_end(forward, gemm)
    assert gemm.active
