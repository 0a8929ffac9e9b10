"""Verify-width quantized matmul: reference path, runtime selection, layer swap, kernel sources.

The CUDA and Metal kernels cannot run on the CI machine, so their exact source is compiled with
g++ against a small SIMT shim (one std::thread per GPU thread, a block barrier for
__syncthreads, shuffles and simd_sum through a shared array) and checked against NumPy. That
exercises the kernels' index math, packing, tiling, tails and reductions; only the real compilers
and memory model stay untested here (the device tests below cover them on a GPU).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from simt_shim import C_TYPES, SHIM_CUDA, SHIM_METAL, round_to, stored_to_float

from engine.backend import verify_matmul as vm
from engine.backend.disk_cache import DiskCache

# ---------------------------------------------------------------- reference path and selection


# MLX CUDA's float32 matmuls round like TF32: on the H200 dequantize+matmul and mx.quantized_matmul
# differed by ~5e-4 of the output's scale, where the CPU agrees to 1e-6.
FP32_RTOL = 1e-5 if mx.default_device() == mx.cpu else 2e-3


def rel_close(a: mx.array, b: mx.array, rtol: float = FP32_RTOL) -> bool:
    return (mx.max(mx.abs(a - b)) / mx.maximum(mx.max(mx.abs(b)), 1e-6)).item() < rtol


def quantized(n: int, k: int, group_size: int = 64, bits: int = 4, dtype: mx.Dtype = mx.float32,
              seed: int = 0) -> tuple[mx.array, mx.array, mx.array]:
    mx.random.seed(seed)
    return mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 128)])
def test_reference_paths_match_quantized_matmul(bits: int, group_size: int) -> None:
    w, s, b = quantized(96, 256, group_size, bits)
    x = mx.random.normal((2, 7, 256))
    expected = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=bits)
    assert mx.array_equal(vm.reference_qmm(x, w, s, b, group_size, bits), expected)
    assert rel_close(vm.dequant_reference(x, w, s, b, group_size, bits), expected)
    cpu = vm.VerifyMatmul(backend="cpu", enabled=True)
    assert cpu.kernel is None
    assert mx.array_equal(cpu(x, w, s, b, group_size, bits), expected)


def test_row_buckets() -> None:
    assert [vm.row_bucket(r) for r in (1, 2, 4, 5, 8, 9, 16, 17, 32, 33)] == \
        [None, 4, 4, 8, 8, 16, 16, 32, 32, None]


class FakeKernel:
    """A stand-in for the GPU launcher: exact, wrong, or slow, counting its launches."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0

    def __call__(self, x: mx.array, w: mx.array, s: mx.array, b: mx.array, spec: vm.QuantSpec,
                 bucket: int, tiling: vm.Tiling) -> mx.array:
        self.calls += 1
        assert x.size // x.shape[-1] <= bucket
        y = vm.dequant_reference(x, w, s, b, spec.group_size, spec.bits).astype(x.dtype)
        if self.mode == "wrong":
            return y + 0.05 * mx.max(mx.abs(y))
        if self.mode == "slow":
            time.sleep(0.02)
        return y


def fake_timer(fn: object) -> float:
    # Injected timings: the reference takes 1 ms at the bucket's rows and 0.3 ms at one row, any kernel 0.5 ms.
    return {"bucket_reference": 1.0, "one_row_reference": 0.3}.get(fn.__name__, 0.5)


SPEC = vm.QuantSpec(n=64, k=256, group_size=64, bits=4, x_dtype=mx.float32, scales_dtype=mx.float32)


def test_a_correct_faster_kernel_is_used_and_the_choice_cached() -> None:
    kernel = FakeKernel("exact")
    verify = vm.VerifyMatmul(backend="cuda", kernel=kernel, enabled=True, timer=fake_timer)
    decision = verify.decide(SPEC, 16)
    assert decision.tiling == vm.TILINGS[16][0] and decision.max_rel_error < FP32_RTOL
    calls = kernel.calls
    assert verify.decide(SPEC, 16) is decision and kernel.calls == calls  # cached, not re-checked
    w, s, b = quantized(64, 256)
    x = mx.random.normal((16, 256))
    assert rel_close(verify(x, w, s, b, 64, 4), vm.reference_qmm(x, w, s, b, 64, 4))
    assert kernel.calls == calls + 1
    verify(x[:1], w, s, b, 64, 4)  # one row: decode takes mx.quantized_matmul
    assert kernel.calls == calls + 1


def test_decisions_are_stored_and_a_later_start_reads_them_without_checking(tmp_path: Path) -> None:
    """A fresh CUDA process spent minutes compiling and timing tilings: a restart reads the decisions."""
    store = DiskCache(tmp_path / "kernels.json", vm.CACHE_ENTRIES)
    first = vm.VerifyMatmul(backend="cuda", kernel=FakeKernel("exact"), enabled=True, timer=fake_timer,
                            store=store, source_id="abc")
    decided = first.decide(SPEC, 16), first.decide(SPEC, 8)
    later_kernel = FakeKernel("wrong")  # would be rejected if it were checked again
    later = vm.VerifyMatmul(backend="cuda", kernel=later_kernel, enabled=True, timer=fake_timer, store=store,
                            source_id="abc")
    assert (later.decide(SPEC, 16), later.decide(SPEC, 8)) == decided and later_kernel.calls == 0
    edited = vm.VerifyMatmul(backend="cuda", kernel=FakeKernel("wrong"), enabled=True, timer=fake_timer,
                             store=store, source_id="edited kernel")
    assert edited.decide(SPEC, 16).tiling is None  # another kernel source is decided again (and fails here)
    (tmp_path / "kernels.json").write_text("{not json")
    damaged = vm.VerifyMatmul(backend="cuda", kernel=FakeKernel("exact"), enabled=True, timer=fake_timer,
                              store=store, source_id="abc")
    assert damaged.decide(SPEC, 16) == decided[0]  # a damaged file means deciding again, not failing
    assert DiskCache.default("kernels.json", vm.CACHE_ENV, 8, {vm.CACHE_ENV: "off"}) is None


def test_no_kernel_is_compiled_where_rows_cost_what_one_row_costs() -> None:
    """Launch-bound layers (SmolLM2's on the H200: 7-12 us at 1 to 32 rows) skip the kernel and its compile."""
    kernel = FakeKernel("exact")
    flat = lambda fn: {"bucket_reference": 0.0100, "one_row_reference": 0.0080}.get(fn.__name__, 0.001)  # noqa: E731
    verify = vm.VerifyMatmul(backend="cuda", kernel=kernel, enabled=True, timer=flat)
    decision = verify.decide(SPEC, 16)
    assert decision.tiling is None and decision.reason.startswith("nothing to win") and kernel.calls == 0
    # with room to win (16 rows cost 3x one row) the same kernel is checked and chosen
    steep = lambda fn: {"bucket_reference": 0.030, "one_row_reference": 0.010}.get(fn.__name__, 0.012)  # noqa: E731
    assert vm.VerifyMatmul(backend="cuda", kernel=kernel, enabled=True, timer=steep).decide(SPEC, 16).tiling
    assert kernel.calls > 0


def test_a_kernel_that_fails_numerics_is_rejected() -> None:
    kernel = FakeKernel("wrong")
    verify = vm.VerifyMatmul(backend="cuda", kernel=kernel, enabled=True, timer=fake_timer)
    decision = verify.decide(SPEC, 8)
    assert decision.tiling is None and "numerics" in decision.reason
    w, s, b = quantized(64, 256)
    x = mx.random.normal((8, 256))
    calls = kernel.calls
    assert mx.array_equal(verify(x, w, s, b, 64, 4), vm.reference_qmm(x, w, s, b, 64, 4))
    assert kernel.calls == calls


def test_a_slower_kernel_is_rejected() -> None:
    def timer(fn: object) -> float:
        # the kernel is timed for real; the reference's timings are injected so that there is
        # something to win on any device (on an H200 16 rows of SPEC cost what 1 row does)
        return {"bucket_reference": 1.0, "one_row_reference": 0.3}.get(fn.__name__) or vm.time_ms(fn)

    verify = vm.VerifyMatmul(backend="cuda", kernel=FakeKernel("slow"), enabled=True, timer=timer)
    decision = verify.decide(SPEC, 16)
    assert decision.tiling is None and decision.reason == "kernel not faster"
    assert decision.kernel_ms > decision.reference_ms


def test_a_kernel_that_raises_is_rejected() -> None:
    def broken(*_: object) -> mx.array:
        raise RuntimeError("nvrtc: error")

    verify = vm.VerifyMatmul(backend="metal", kernel=broken, enabled=True, timer=fake_timer)
    assert verify.decide(SPEC, 4).tiling is None


def test_gpu_kernels_are_off_on_the_cpu_and_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    if mx.default_device() == mx.cpu:
        assert vm.detect_backend() == "cpu"
        assert vm.VerifyMatmul().kernel is None
    monkeypatch.setenv(vm.ENABLE_ENV, "0")
    assert not vm.kernels_enabled_by_env()
    assert vm.VerifyMatmul(backend="cuda", kernel=FakeKernel("exact")).kernel is None
    monkeypatch.setenv(vm.ENABLE_ENV, "1")
    assert vm.VerifyMatmul(backend="cuda", kernel=FakeKernel("exact")).kernel is not None


def tiny_quantized_llama(group_size: int = 32, dtype: mx.Dtype = mx.float32) -> nn.Module:
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    model = Model(ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2,
                            intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                            rms_norm_eps=1e-5, vocab_size=160, tie_word_embeddings=True))
    model.set_dtype(dtype)
    nn.quantize(model, group_size=group_size, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("kernel", ["none", "exact"])
def test_swap_leaves_logits_unchanged(kernel: str) -> None:
    model = tiny_quantized_llama()
    tokens = mx.array([[1, 5, 9, 3, 7, 2, 8, 4, 6]])
    before = model(tokens)
    fake = FakeKernel("exact")
    verify = vm.VerifyMatmul(backend="cpu" if kernel == "none" else "cuda", kernel=fake,
                             enabled=True, timer=fake_timer)
    assert vm.apply(model, verify) == 2 * 7 + 1  # 7 projections per layer + the tied embedding
    assert isinstance(model.model.embed_tokens, vm.VerifyQuantizedEmbedding)
    assert isinstance(model.model.layers[1].mlp.down_proj, vm.VerifyQuantizedLinear)
    trainable = [name for name, _ in nn.utils.tree_flatten(model.trainable_parameters())]
    assert trainable and all("norm" in name for name in trainable)  # swapped layers stay frozen
    after = model(tokens)
    if kernel == "none":
        assert mx.array_equal(before, after)
    else:
        assert fake.calls > 0  # the 9-row forward went through the (exact) kernel
        assert rel_close(after, before)


class CountingVerifyMatmul(vm.VerifyMatmul):
    """A VerifyMatmul on a fake kernel that records every (spec, bucket) it checks."""

    def __init__(self) -> None:
        super().__init__(backend="cuda", kernel=FakeKernel("exact"), enabled=True, timer=fake_timer)
        self.checked: list[tuple[vm.QuantSpec, int]] = []

    def _check(self, spec: vm.QuantSpec, bucket: int) -> vm.Decision:
        self.checked.append((spec, bucket))
        return super()._check(spec, bucket)


def gguf_like_llama() -> nn.Module:
    """float16 scales with float32 norms, as a GGUF loads: every layer after the first norm gets float32 x."""
    from mlx.utils import tree_map_with_path

    model = tiny_quantized_llama(dtype=mx.float16)
    model.update(tree_map_with_path(lambda path, p: p.astype(mx.float32) if "norm" in path else p,
                                    model.parameters()))
    mx.eval(model.parameters())
    return model


def test_load_decides_every_bucket_for_the_dtype_the_forward_feeds() -> None:
    """Decisions at load are for float32 x, the dtype these layers really get (not their scales' float16),
    so forwards of new widths and batches, as requests make them, check nothing more."""
    model = gguf_like_llama()
    verify = CountingVerifyMatmul()
    vm.apply(model, verify)
    specs = {spec for spec, _ in verify.checked}
    assert specs and {spec.scales_dtype for spec in specs} == {mx.float16}
    assert {spec.x_dtype for spec in specs} == {mx.float32}  # nothing decided for a dtype never used
    assert sorted(verify.checked, key=str) == sorted(((s, b) for s in specs for b in vm.BUCKETS), key=str)
    checked = len(verify.checked)
    for rows in (1, 3, 9, 16, 17, 32):  # verify widths
        mx.eval(model(mx.arange(rows)[None] % 160))
    mx.eval(model(mx.arange(5)[:, None]))  # a batched step: 5 rows of one token
    assert len(verify.checked) == checked and verify.kernel.calls > 0


def test_a_spec_first_seen_later_has_all_its_buckets_decided_at_once() -> None:
    verify = CountingVerifyMatmul()
    w, s, b = quantized(64, 256)
    verify(mx.random.normal((3, 256)), w, s, b, 64, 4)
    assert sorted(bucket for _, bucket in verify.checked) == list(vm.BUCKETS)
    verify(mx.random.normal((20, 256)), w, s, b, 64, 4)
    assert len(verify.checked) == len(vm.BUCKETS)


def test_kernel_sources_exist_and_split() -> None:
    assert not (vm.KERNELS_DIR / "__init__.py").exists()  # kernels/ must not be a Python package
    for name, entry in (("verify_qmm.cu", "__shfl_xor_sync"), ("verify_qmm.metal", "simd_sum")):
        header, body = vm.read_kernel_source(name)
        for needed in ("x_shape[0]", "w_shape[0]", "scales[", "biases[", "y[" if name.endswith("metal")
                       else "vqmm_store(y", "MB", "BITS", "GS", "NC", "WN", "WK", entry):
            assert needed in body, (name, needed)
    assert "struct VqmmX<__nv_bfloat16>" in vm.read_kernel_source("verify_qmm.cu")[0]


# ---------------------------------------------------------------- kernel source on a CPU SIMT shim

MAIN = r"""
template <typename V> std::vector<V> read_all(const char* path, size_t n) {
  std::vector<V> v(n); std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), n * sizeof(V)); return v;
}
int main(int argc, char** argv) {
  const int M = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]);
  const int x_shape[2] = {M, K}, w_shape[2] = {N, K * BITS_ / 32};
  auto x = read_all<XT>(argv[4], (size_t)M * K);
  auto w = read_all<uint32_t>(argv[5], (size_t)N * K * BITS_ / 32);
  auto s = read_all<ST>(argv[6], (size_t)N * (K / GS_));
  auto b = read_all<ST>(argv[7], (size_t)N * (K / GS_));
  std::vector<OT> y((size_t)M * N);
  const int threads = THREADS_, blocks = (N + COLUMNS_ - 1) / COLUMNS_;
  setup_barriers(threads);
  BLOCKDIM_;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] {
    g_tid = t;
    for (int blk = 0; blk < blocks; ++blk) {
      SET_THREAD(t, blk);
      verify_qmm(x.data(), x_shape, w.data(), w_shape, s.data(), b.data(), y.data());
      block_sync();
    }
  });
  for (auto& p : pool) p.join();
  std::ofstream(argv[8], std::ios::binary).write(reinterpret_cast<char*>(y.data()), y.size() * sizeof(OT));
}
"""

def run_on_shim(backend: str, tmp: Path, m: int, k: int, n: int, bits: int, gs: int, x_dtype: str,
                s_dtype: str, o_dtype: str, bucket: int, tiling: vm.Tiling) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(m * 1000 + k + n)
    x_raw, x = round_to(rng.normal(size=(m, k)), x_dtype)
    words = rng.integers(0, 2**32, size=(n, k * bits // 32), dtype=np.uint64).astype(np.uint32)
    s_raw, s = round_to(rng.uniform(0.5, 1.5, size=(n, k // gs)) * 0.02, s_dtype)
    b_raw, b = round_to(rng.normal(size=(n, k // gs)) * 0.1, s_dtype)
    per = 32 // bits  # values per uint32, little end first
    q = np.stack([(words >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], -1).reshape(n, k)
    dense = q.reshape(n, k // gs, gs) * s[..., None] + b[..., None]
    expected = x @ dense.reshape(n, k).T

    ctype = 0 if backend == "cuda" else 1
    header, body = vm.read_kernel_source("verify_qmm.cu" if backend == "cuda" else "verify_qmm.metal")
    header = header.replace("#include <metal_stdlib>", "")  # the shim stands in for it
    xt, st, ot = (C_TYPES[d][ctype] for d in (x_dtype, s_dtype, o_dtype))
    dev = "" if backend == "cuda" else "device "
    constants = (f"  using T = {xt}; using S = {st}; using O = {ot};\n" + "".join(
        f"  constexpr int {name} = {value};\n" for name, value in
        (("MB", bucket), ("BITS", bits), ("GS", gs), ("NC", tiling.nc), ("WN", tiling.wn), ("WK", tiling.wk))))
    source = (SHIM_CUDA if backend == "cuda" else SHIM_METAL) + header + (
        f"void verify_qmm(const {dev}{xt}* x, const int* x_shape, const {dev}uint32_t* w, const int* w_shape,"
        f" const {dev}{st}* scales, const {dev}{st}* biases, {dev}{ot}* y) {{\n{constants}{body}\n}}\n")
    defines = {"XT": xt, "ST": st, "OT": ot, "BITS_": bits, "GS_": gs, "THREADS_": tiling.threads,
               "COLUMNS_": tiling.columns,
               "BLOCKDIM_": f"blockDim.x = {tiling.threads}" if backend == "cuda" else "(void)0"}
    source += "".join(f"#define {key} {value}\n" for key, value in defines.items()) + MAIN
    (tmp / "k.cpp").write_text(source)
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-w", "-o", str(tmp / "k"), str(tmp / "k.cpp")],
                   check=True, capture_output=True, text=True)
    for name, arr in (("x", x_raw), ("w", words), ("s", s_raw), ("b", b_raw)):
        np.ascontiguousarray(arr).tofile(tmp / name)
    subprocess.run([str(tmp / "k"), str(m), str(k), str(n)] + [str(tmp / f) for f in "xwsb"] + [str(tmp / "y")],
                   check=True, timeout=120)
    store = C_TYPES[o_dtype][2]
    y = stored_to_float(np.fromfile(tmp / "y", dtype=store).reshape(m, n), o_dtype)
    return y, expected


SHIM_CASES = [  # m, k, n, bits, gs, x, scales, out, bucket, tiling: tails in K and N, partial buckets
    (5, 576, 40, 4, 64, "bfloat16", "bfloat16", "bfloat16", 8, vm.Tiling(4, 2, 4)),
    (16, 320, 36, 4, 32, "float16", "float16", "float16", 16, vm.Tiling(4, 4, 2)),
    (32, 384, 20, 8, 128, "float32", "float32", "float32", 32, vm.Tiling(2, 8, 1)),
    (2, 256, 17, 4, 32, "bfloat16", "float32", "float32", 4, vm.Tiling(4, 4, 2)),
    (9, 1024, 24, 8, 64, "bfloat16", "bfloat16", "bfloat16", 16, vm.Tiling(2, 4, 2)),
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
@pytest.mark.parametrize("backend", ["cuda", "metal"])
@pytest.mark.parametrize("case", SHIM_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}g{c[4]}{c[5]}")
def test_kernel_source_on_a_cpu_simt_shim(backend: str, case: tuple, tmp_path: Path) -> None:
    m, k, n, bits, gs, x_dtype, s_dtype, o_dtype, bucket, tiling = case
    y, expected = run_on_shim(backend, tmp_path, m, k, n, bits, gs, x_dtype, s_dtype, o_dtype, bucket, tiling)
    tol = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}[o_dtype]
    err = np.max(np.abs(y - expected)) / np.max(np.abs(expected))
    assert err < tol, f"max rel error {err:.3g}"


# ---------------------------------------------------------------- the real kernels on a GPU

GPU = vm.detect_backend() != "cpu"
DEVICE_SHAPES = [(576, 1536), (1536, 576), (576, 49152), (4096, 12288), (12288, 4096)]  # (K, N)


@pytest.mark.skipif(not GPU, reason="needs MLX's CUDA or Metal backend")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("k,n", DEVICE_SHAPES)
def test_device_kernel_numerics(k: int, n: int, dtype: mx.Dtype) -> None:
    verify = vm.VerifyMatmul(enabled=True)
    assert verify.kernel is not None
    for group_size, bits in ((64, 4), (32, 4), (64, 8)) if k == 576 else ((64, 4),):
        spec = vm.QuantSpec(n, k, group_size, bits, dtype, dtype)
        w, s, b = vm.random_quantized(spec)
        for rows in (1, 2, 8, 16, 32):
            bucket = vm.row_bucket(max(rows, 2))
            for tiling in vm.TILINGS[bucket]:
                x = mx.random.normal((rows, k)).astype(dtype)
                y = verify.kernel(x, w, s, b, spec, bucket, tiling).astype(mx.float32)
                ref = vm.dequant_reference(x, w, s, b, group_size, bits)
                err = (mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))).item()
                assert err < vm.TOLERANCE[dtype], (rows, tiling, group_size, err)


def test_a_model_without_a_causal_lm_call_is_decided_from_its_scales() -> None:
    """A draft (called with target taps, not token ids and a cache) cannot run the probe forward: its layers
    are decided for their scales' dtype, every bucket, at load, and the swap still happens."""

    class Block(nn.Module):  # a forward that needs more than token ids
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.QuantizedLinear(256, 64, bias=False, group_size=32, bits=4)

        def __call__(self, x: mx.array, taps: mx.array) -> mx.array:
            return self.proj(x + taps)

    block = Block()
    verify = CountingVerifyMatmul()
    assert vm.apply(block, verify) == 1
    specs = {spec for spec, _ in verify.checked}
    assert len(specs) == 1 and next(iter(specs)).x_dtype == block.proj["scales"].dtype
    assert sorted(b for _, b in verify.checked) == sorted(vm.BUCKETS)
