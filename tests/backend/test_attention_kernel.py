"""engine/backend/attention_kernel.py: the CUDA block-attention kernel's source on a CPU SIMT shim (blocks
and left-padded decode steps), the runtime decision (numerics, then speed) with fake kernels, the dispatch
in engine/model/attention.py and in the generator's padded decode hook, and, on a CUDA device, the real
kernel against the float32 reference, inside greedy speculative decoding and inside batched generation."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from simt_shim import C_TYPES, SHIM_CUDA, round_to, stored_to_float
from tiny_models import (
    build_draft,
    build_target,
    draft_config,
    plain_greedy,
    target_config,
)

from engine.backend import attention_kernel as ak
from engine.backend.verify_matmul import read_kernel_source
from engine.decode.drafters import DFlashDrafter
from engine.decode.sampling import SamplingParams, TokenRng
from engine.decode.speculative import SpeculativeDecoder
from engine.model import attention
from engine.model.fused import fuse_projections
from engine.model.target import Target
from engine.train.generator import GenerationConfig, Job, ResponseGenerator, padded_decode_attention

SPEC = ak.AttentionSpec(mx.float32, 64, 4, 2, True)


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                    start: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """(B, H, L, D) float64 attention over (B, Hkv, S, D) keys; causal over the last L positions; batch
    row b over keys start[b] .. S-1 when `start` is given; where the bool (L, S) `mask` holds when given."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = scale * q @ k.swapaxes(-1, -2)  # (B, H, L, S)
    if causal:
        rows, length = q.shape[2], k.shape[2]
        keep = np.arange(length)[None] <= np.arange(length - rows, length)[:, None]
        scores = np.where(keep, scores, -np.inf)
    if start is not None:
        scores = np.where(np.arange(k.shape[2])[None, None, None] >= start[:, None, None, None], scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


# ---------------------------------------------------------------- kernel source on a CPU SIMT shim

MAIN = r"""
template <typename V> std::vector<V> read_all(const char* path, size_t n) {
  std::vector<V> v(n); std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), n * sizeof(V)); return v;
}
int main(int argc, char** argv) {
  const int B = atoi(argv[1]), H = atoi(argv[2]), L = atoi(argv[3]), Hkv = atoi(argv[4]), S = atoi(argv[5]);
  const int spare = atoi(argv[6]);
  const float scale = atof(argv[7]);
  const int cap = S + spare;
  // q is stored (B, L, H, D) and read as its (B, H, L, D) transpose; k and v are prefixes of (B, Hkv, cap, D)
  const int q_shape[4] = {B, H, L, D_};
  const long long q_strides[4] = {(long long)L * H * D_, D_, (long long)H * D_, 1};
  const int k_shape[4] = {B, Hkv, S, D_};
  const long long kv_strides[4] = {(long long)Hkv * cap * D_, (long long)cap * D_, D_, 1};
  auto q = read_all<TT>(argv[8], (size_t)B * L * H * D_);
  auto k = read_all<TT>(argv[9], (size_t)B * Hkv * cap * D_);
  auto v = read_all<TT>(argv[10], (size_t)B * Hkv * cap * D_);
  auto start = read_all<int>(argv[12], (size_t)B);
  const long long start_strides[1] = {1};
  auto bits = read_all<uint32_t>(argv[13], (size_t)L * 4);
  const long long bits_strides[2] = {4, 1};
  std::vector<TT> out((size_t)B * L * H * D_);
  const int threads = WARPS_ * 32;
  setup_barriers(threads);
  blockDim.x = threads;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] {
    g_tid = t;
    for (int b = 0; b < B; ++b) for (int row = 0; row < L; ++row) for (int h = 0; h < (GROUPED_ ? Hkv : H); ++h) {
      SET_BLOCK(t, h, row, b);
      block_attention(q.data(), q_shape, q_strides, k.data(), k_shape, kv_strides, v.data(), kv_strides,
                      &scale, start.data(), start_strides, bits.data(), bits_strides, out.data());
      block_sync();
    }
  });
  for (auto& p : pool) p.join();
  std::ofstream(argv[11], std::ios::binary).write(reinterpret_cast<char*>(out.data()), out.size() * sizeof(TT));
}
"""


def run_on_shim(tmp: Path, b: int, heads: int, kv_heads: int, rows: int, length: int, dim: int, dtype: str,
                causal: bool, warps: int, spare: int, starts: list[int] | None = None,
                mutate: tuple[str, str] | None = None, ancestors: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's output and the float64 expectation; `starts` selects the PADDED variant, `ancestors`
    (L, L) the TREE variant, and `mutate` = (old, new) edits the kernel body first (to show a test catches
    that bug)."""
    rng = np.random.default_rng(rows * 1000 + length + b)
    cap = length + spare
    q_raw, q = round_to(rng.normal(size=(b, rows, heads, dim)), dtype)  # stored (B, L, H, D)
    k_raw, k = round_to(rng.normal(size=(b, kv_heads, cap, dim)), dtype)
    v_raw, v = round_to(rng.normal(size=(b, kv_heads, cap, dim)), dtype)
    start = np.array(starts if starts is not None else [0] * b, dtype=np.int32)
    scale = dim**-0.5
    mask = None if ancestors is None else np.array(ak.tree_mask_of(ancestors, length))
    expected = numpy_attention(q.transpose(0, 2, 1, 3), k[:, :, :length], v[:, :, :length], scale, causal,
                               None if starts is None else start, mask)
    bits = np.zeros((rows, 4), dtype=np.uint32) if ancestors is None else ak.tree_bits(ancestors)

    header, body = read_kernel_source("block_attention.cu")
    if mutate is not None:
        assert mutate[0] in header + body, mutate[0]
        header, body = header.replace(mutate[0], mutate[1]), body.replace(mutate[0], mutate[1])
    ct = C_TYPES[dtype][0]
    grouped = str(warps == ak.GROUPED).lower()
    warps = heads // kv_heads if warps == ak.GROUPED else warps  # GROUPED: a warp per query head of a group
    constants = (f"  using T = {ct}; constexpr int D = {dim}; constexpr bool CAUSAL = {str(causal).lower()};\n"
                 f"  constexpr bool PADDED = {str(starts is not None).lower()}; constexpr int WARPS = {warps};\n"
                 f"  constexpr bool TREE = {str(ancestors is not None).lower()}; constexpr bool GROUPED = {grouped};\n")
    source = SHIM_CUDA + header + (
        f"void block_attention(const {ct}* q, const int* q_shape, const long long* q_strides, const {ct}* k,"
        f" const int* k_shape, const long long* k_strides, const {ct}* v, const long long* v_strides,"
        f" const float* scale, const int* start, const long long* start_strides, const uint32_t* bits,"
        f" const long long* bits_strides, {ct}* out) {{\n"
        f"{constants}{body}\n}}\n")
    defines = {"TT": ct, "D_": dim, "WARPS_": warps, "GROUPED_": grouped}
    source += "".join(f"#define {key} {value}\n" for key, value in defines.items()) + MAIN
    (tmp / "k.cpp").write_text(source)
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-w", "-o", str(tmp / "prog"), str(tmp / "k.cpp")],
                   check=True, capture_output=True, text=True)
    for name, arr in (("q", q_raw), ("k", k_raw), ("v", v_raw), ("start", start), ("bits", bits)):
        np.ascontiguousarray(arr).tofile(tmp / name)
    subprocess.run([str(tmp / "prog"), *(str(x) for x in (b, heads, rows, kv_heads, length, spare, repr(scale))),
                    *(str(tmp / f) for f in ("q", "k", "v", "out", "start", "bits"))], check=True, timeout=300)
    raw = np.fromfile(tmp / "out", dtype=C_TYPES[dtype][2]).reshape(b, rows, heads, dim)
    return stored_to_float(raw, dtype).transpose(0, 2, 1, 3), expected


SHIM_CASES = [  # b, heads, kv_heads, rows, keys, dim, dtype, causal, warps, spare
    (1, 9, 3, 16, 37, 64, "bfloat16", True, 4, 5),     # GQA, a strided cache prefix, causal tail
    (2, 4, 2, 3, 300, 64, "float32", False, 4, 0),     # several chunks per warp, full attention
    (1, 2, 1, 5, 5, 128, "float16", True, 4, 3),       # L = S: row 0 sees one key
    (1, 3, 3, 2, 70, 64, "bfloat16", False, 8, 0),     # warps with no keys at all
    (1, 9, 3, 16, 37, 64, "bfloat16", True, ak.GROUPED, 5),    # GROUPED: 3 warps share a KV head's tiles
    (2, 8, 2, 3, 300, 128, "float32", False, ak.GROUPED, 4),   # ten tiles, the last one partial, D = 128
    (1, 2, 2, 5, 5, 64, "float16", True, ak.GROUPED, 3),       # no GQA: one warp a block; row 0 sees one key
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
@pytest.mark.parametrize("case", SHIM_CASES, ids=lambda c: f"h{c[1]}/{c[2]}L{c[3]}S{c[4]}D{c[5]}{c[6]}"
                         f"{'causal' if c[7] else 'full'}w{c[8]}")
def test_kernel_source_on_a_cpu_simt_shim(case: tuple, tmp_path: Path) -> None:
    got, expected = run_on_shim(tmp_path, *case)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[case[6]]
    err = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
    assert err < tol, f"max rel error {err:.3g}"


def shim_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))  # NaN where a row saw no keys


PADDED_CASES = [  # b, heads, kv_heads, rows, keys, dim, dtype, causal, warps, spare, starts
    (4, 9, 3, 1, 37, 64, "bfloat16", False, 4, 5, [0, 36, 5, 17]),         # GQA, strided prefix, S-1: one key
    (3, 4, 2, 1, 300, 64, "float32", False, 2, 0, [0, 299, 100]),          # several chunks per warp
    (5, 3, 3, 1, 100, 64, "float32", False, 8, 0, [0, 1, 31, 32, 99]),     # starts at chunk edges, idle warps
    (2, 2, 1, 1, 70, 128, "float16", True, 4, 3, [69, 33]),                # D = 128; causal is full at L = 1
    (2, 4, 2, 4, 40, 64, "float32", True, 4, 0, [0, 36]),                  # a causal block: row 0 sees key 36
    (3, 8, 2, 1, 100, 64, "float32", False, ak.GROUPED, 5, [0, 99, 33]),   # GROUPED: tiles from a start on
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
@pytest.mark.parametrize("case", PADDED_CASES, ids=lambda c: f"b{c[0]}h{c[1]}/{c[2]}L{c[3]}S{c[4]}D{c[5]}{c[6]}"
                         f"w{c[8]}")
def test_padded_kernel_source_on_a_cpu_simt_shim(case: tuple, tmp_path: Path) -> None:
    got, expected = run_on_shim(tmp_path, *case[:10], starts=case[10])
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[case[6]]
    assert shim_error(got, expected) < tol


START = "start[b * start_strides[0]]"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
@pytest.mark.parametrize("shift", ["+ 1", "- 1"])
def test_an_off_by_one_key_start_fails_the_shim_check(shift: str, tmp_path: Path) -> None:
    """The padded test catches a kernel that starts one key late or early (starts >= 1: no read before k)."""
    case = (3, 9, 3, 1, 37, 64, "float32", False, 4, 0)
    got, expected = run_on_shim(tmp_path, *case, starts=[1, 36, 20])
    assert shim_error(got, expected) < 1e-5
    got, expected = run_on_shim(tmp_path, *case, starts=[1, 36, 20], mutate=(START, f"({START} {shift})"))
    assert not shim_error(got, expected) < 1e-5


TREE_CASES = [  # b, heads, kv_heads, rows, keys, dim, dtype, causal, warps, spare; the tree's seed
    (1, 9, 3, 9, 40, 64, "bfloat16", False, 4, 5, 0),      # GQA, a strided cache prefix, 31 keys before
    (1, 4, 2, 33, 60, 64, "float32", False, 8, 0, 1),      # warps whose every key is another branch's
    (1, 2, 1, 65, 70, 128, "float16", False, 4, 3, 2),     # three bit words, D = 128
    (1, 2, 2, 40, 40, 64, "float32", False, 4, 0, 3),      # no committed keys: the root sees itself only
    (1, 8, 2, 33, 60, 64, "float32", False, ak.GROUPED, 0, 1),   # GROUPED: tiles whose keys are all others'
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: f"h{c[1]}/{c[2]}L{c[3]}S{c[4]}D{c[5]}{c[6]}w{c[8]}")
def test_tree_kernel_source_on_a_cpu_simt_shim(case: tuple, tmp_path: Path) -> None:
    ancestors = ak.random_ancestors(case[3], case[10])
    got, expected = run_on_shim(tmp_path, *case[:10], ancestors=ancestors)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[case[6]]
    assert shim_error(got, expected) < tol


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
def test_a_tree_kernel_that_ignores_the_bits_fails_the_shim_check(tmp_path: Path) -> None:
    case = (1, 4, 2, 17, 50, 64, "float32", False, 4, 0)
    ancestors = ak.random_ancestors(17, 5)
    got, expected = run_on_shim(tmp_path, *case, ancestors=ancestors, mutate=("& 1u;", "| 1u;"))
    assert not shim_error(got, expected) < 1e-5


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_grouped_kernel_stages_word_by_word_where_rows_are_not_16_byte_aligned(dtype: str, tmp_path: Path) -> None:
    """The shim's rows are contiguous and aligned, so its GROUPED cases take 16-byte loads: here the other path."""
    case = (1, 6, 2, 7, 45, 64, dtype, True, ak.GROUPED, 3)
    got, expected = run_on_shim(tmp_path, *case, mutate=("const bool wide = ", "const bool wide = false && "))
    assert shim_error(got, expected) < {"float32": 1e-5, "bfloat16": 1e-2}[dtype]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
def test_a_grouped_kernel_that_gives_every_warp_one_head_fails_the_shim_check(tmp_path: Path) -> None:
    case = (1, 8, 2, 4, 50, 64, "float32", True, ak.GROUPED, 0)
    got, expected = run_on_shim(tmp_path, *case)
    assert shim_error(got, expected) < 1e-5
    got, expected = run_on_shim(tmp_path, *case, mutate=("blockIdx.x * WARPS + warp", "blockIdx.x * WARPS"))
    assert not shim_error(got, expected) < 1e-5


def test_tree_bits_hold_the_ancestor_matrix() -> None:
    ancestors = ak.random_ancestors(70, 9)
    bits = ak.tree_bits(ancestors)
    assert bits.shape == (70, 4) and bits.dtype == np.uint32
    unpacked = (bits[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.array_equal(unpacked.reshape(70, 128)[:, :70].astype(bool), ancestors)
    assert not unpacked.reshape(70, 128)[:, 70:].any()
    mask = np.array(ak.tree_mask_of(ancestors, 100))
    assert mask[:, :30].all() and np.array_equal(mask[:, 30:], ancestors)


def test_the_float32_oracle_honours_key_starts() -> None:
    rng = np.random.default_rng(4)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((3, 6, 1, 64), (3, 2, 50, 64), (3, 2, 50, 64)))
    start = np.array([0, 49, 17], dtype=np.int32)
    got = ak.float32_reference(mx.array(q), mx.array(k), mx.array(v), 0.125, False, start=mx.array(start))
    np.testing.assert_allclose(np.array(got), numpy_attention(q, k, v, 0.125, False, start), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(got[1, :, 0]), np.repeat(v[1, :, 49], 3, axis=0), rtol=1e-5)  # one key


def test_kernel_source_exists_and_names_its_inputs() -> None:
    header, body = read_kernel_source("block_attention.cu")
    for needed in ("q_shape[", "q_strides[", "k_shape[", "k_strides[", "v_strides[", "scale[0]", "battn_store(out",
                   "CAUSAL", "PADDED", "TREE", "GROUPED", START, "WARPS", "__shfl_sync"):
        assert needed in body, needed
    assert "battn_pair(const __nv_bfloat16*" in header and "__shfl_xor_sync" in header


# ---------------------------------------------------------------- the runtime decision (fake kernels)


def exact_kernel(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool,
                 warps: int, start: mx.array | None = None, bits: mx.array | None = None) -> mx.array:
    mask = None
    if bits is not None:  # the tree variant's semantics: unpack the rows' bit sets
        rows = queries.shape[2]
        unpacked = (np.array(bits)[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
        mask = ak.tree_mask_of(unpacked.reshape(rows, -1)[:, :rows].astype(bool), keys.shape[2])
    return ak.float32_reference(queries, keys, values, scale, causal, start=start, mask=mask).astype(queries.dtype)


def decider(kernel: object, kernel_ms: float, reference_ms: float) -> ak.BlockAttentionKernel:
    """A BlockAttentionKernel on a pretend CUDA device whose timer reads `kernel_ms` for timings that
    ran the kernel and `reference_ms` for the others."""
    ran = [False]

    def tracked(*args: object, **kwargs: object) -> mx.array:
        ran[0] = True
        return kernel(*args, **kwargs)  # type: ignore[operator]

    def timer(fn: object) -> float:
        ran[0] = False
        mx.eval(fn())  # type: ignore[operator]
        return kernel_ms if ran[0] else reference_ms

    return ak.BlockAttentionKernel(kernel=tracked, reference=ak.float32_reference, backend="cuda", timer=timer)


def test_a_correct_faster_kernel_is_used_and_the_choice_cached() -> None:
    calls = []

    def kernel(*args: object) -> mx.array:
        calls.append(args[-1])
        return exact_kernel(*args)  # type: ignore[arg-type]

    d = decider(kernel, kernel_ms=0.5, reference_ms=2.0)
    decision = d.decide(SPEC)
    assert decision.warps == ak.WARPS[64][0] and decision.max_rel_error < 1e-5
    assert "4.00x faster" in decision.reason
    n = len(calls)
    assert d.decide(SPEC) is decision and len(calls) == n  # cached: no second check
    assert d.summary() == {"mlx.core.float32 D=64 heads 4/2 causal": {
        "warps": decision.warps, "kernel_ms": 0.5, "explicit_ms": 2.0, "max_rel_error": decision.max_rel_error,
        "reason": decision.reason}}


def test_a_kernel_that_fails_numerics_is_rejected() -> None:
    def wrong(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int) -> mx.array:
        return exact_kernel(queries, keys, values, scale, not causal, warps)  # the mask ignored

    decision = decider(wrong, kernel_ms=0.1, reference_ms=2.0).decide(SPEC)
    assert decision.warps is None and decision.reason == "no warp count passed numerics"


def test_a_slower_kernel_is_rejected() -> None:
    decision = decider(exact_kernel, kernel_ms=2.0, reference_ms=2.0).decide(SPEC)
    assert decision.warps is None and decision.reason == "kernel not faster"


def test_a_kernel_that_lost_alone_runs_in_forwards_only_where_they_chose_it() -> None:
    """A correct kernel slower alone keeps its fastest warp count: it runs when `in_forward` is set (a whole
    forward was faster with it, engine/backend/verify_kernels.py), never if it failed numerics."""
    d = decider(exact_kernel, kernel_ms=2.0, reference_ms=1.0)
    q, k = mx.zeros((1, 4, 16, 64)), mx.zeros((1, 2, 40, 64))
    assert d.warps_for(q, k, "causal") is None
    assert d.lost_alone() == [SPEC] and d.decide(SPEC).correct_warps in ak.WARPS[64]
    d.in_forward = True
    assert d.warps_for(q, k, "causal") == d.decide(SPEC).correct_warps

    def wrong(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int) -> mx.array:
        return exact_kernel(queries, keys, values, scale, not causal, warps)

    failed = decider(wrong, kernel_ms=0.1, reference_ms=2.0)
    failed.in_forward = True
    assert failed.warps_for(q, k, "causal") is None and failed.lost_alone() == []


@pytest.mark.parametrize(("with_ms", "without_ms", "kept"), [(14.8, 17.5, True), (17.9, 17.5, False)])
def test_the_kernel_runs_where_it_lost_alone_only_if_a_forward_is_faster(with_ms: float, without_ms: float,
                                                                          kept: bool) -> None:
    from engine.backend import verify_kernels

    d = decider(exact_kernel, kernel_ms=2.0, reference_ms=1.0)
    now = [0.0]
    seen: list[bool] = []

    def forward() -> None:
        seen.append(d.in_forward)
        now[0] += (with_ms if d.in_forward else without_ms) / 1e3

    report = verify_kernels.confirm_in_forward(forward, d, reps=3, clock=lambda: now[0])
    assert d.in_forward is kept and seen == [True, False] * 4  # interleaved, one warm-up round each
    assert f"{with_ms:.2f} ms with the kernel, {without_ms:.2f} ms without" in report


def test_a_kernel_that_raises_is_rejected() -> None:
    def broken(*args: object) -> mx.array:
        raise RuntimeError("nvrtc: compile failed")

    decision = decider(broken, kernel_ms=0.1, reference_ms=2.0).decide(SPEC)
    assert decision.warps is None


def test_only_causal_or_unmasked_supported_blocks_take_the_kernel() -> None:
    d = decider(exact_kernel, kernel_ms=0.5, reference_ms=2.0)
    q = mx.zeros((1, 4, 16, 64))
    k = mx.zeros((1, 2, 40, 64))
    assert d.spec_for(q, k, "causal") == SPEC
    assert d.spec_for(q, k, None) == ak.AttentionSpec(mx.float32, 64, 4, 2, False)
    assert d.spec_for(q, k, mx.ones((16, 40), dtype=mx.bool_)) is None  # array masks stay explicit
    assert d.spec_for(q, mx.zeros((1, 2, 8, 64)), "causal") is None  # fewer keys than causal rows
    assert d.spec_for(mx.zeros((1, 4, 16, 80)), mx.zeros((1, 2, 40, 80)), None) is None  # head dim
    assert d.spec_for(q, mx.zeros((1, 3, 40, 64)), None) is None  # heads not a multiple of KV heads
    assert d.spec_for(q.astype(mx.bfloat16), k, None) is None  # mixed dtypes


PADDED_SPEC = ak.AttentionSpec(mx.float32, 64, 4, 2, False, padded=True)


def test_a_correct_faster_padded_kernel_is_used() -> None:
    decision = decider(exact_kernel, kernel_ms=0.5, reference_ms=2.0).decide(PADDED_SPEC)
    assert decision.warps == ak.DECODE_WARPS[64][0] and decision.max_rel_error < 1e-5
    d = decider(exact_kernel, kernel_ms=0.5, reference_ms=2.0)
    d.decide(PADDED_SPEC)
    assert list(d.summary()) == ["mlx.core.float32 D=64 heads 4/2 full padded"]


def test_a_padded_kernel_that_ignores_the_starts_is_rejected() -> None:
    def unpadded(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int,
                 start: mx.array | None = None) -> mx.array:
        return exact_kernel(queries, keys, values, scale, causal, warps)

    decision = decider(unpadded, kernel_ms=0.1, reference_ms=2.0).decide(PADDED_SPEC)
    assert decision.warps is None and decision.reason == "no warp count passed numerics"


TREE_SPEC = ak.AttentionSpec(mx.float32, 64, 4, 2, False, tree=True)


def test_a_tree_kernel_is_checked_against_the_masked_reference() -> None:
    decision = decider(exact_kernel, kernel_ms=0.5, reference_ms=2.0).decide(TREE_SPEC)
    assert decision.warps == ak.WARPS[64][0] and decision.max_rel_error < 1e-5

    def unmasked(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int,
                 bits: mx.array | None = None) -> mx.array:
        return exact_kernel(queries, keys, values, scale, causal, warps)  # every branch seen

    decision = decider(unmasked, kernel_ms=0.1, reference_ms=2.0).decide(TREE_SPEC)
    assert decision.warps is None and decision.reason == "no warp count passed numerics"
    d = decider(exact_kernel, kernel_ms=0.5, reference_ms=2.0)
    assert d.tree_warps_for(mx.zeros((1, 4, 33, 64)), mx.zeros((1, 2, 40, 64))) == ak.WARPS[64][0]
    assert d.tree_warps_for(mx.zeros((1, 4, 129, 64)), mx.zeros((1, 2, 200, 64))) is None  # past 4 bit words
    assert d.tree_warps_for(mx.zeros((2, 4, 33, 64)), mx.zeros((2, 2, 40, 64))) is None  # one sequence only


def test_only_one_row_steps_are_padded_specs() -> None:
    d = decider(exact_kernel, kernel_ms=0.5, reference_ms=2.0)
    k = mx.zeros((3, 2, 40, 64))
    assert d.padded_spec_for(mx.zeros((3, 4, 1, 64)), k) == PADDED_SPEC
    assert d.padded_spec_for(mx.zeros((3, 4, 2, 64)), k) is None  # a block: the unpadded kernel's job
    assert d.padded_spec_for(mx.zeros((3, 4, 1, 64)), mx.zeros((3, 3, 40, 64))) is None  # heads % KV heads
    assert d.padded_spec_for(mx.zeros((3, 4, 1, 64), dtype=mx.float16), k) is None  # mixed dtypes
    assert ak.BlockAttentionKernel(kernel=exact_kernel, backend="cpu").padded_warps_for(
        mx.zeros((3, 4, 1, 64)), k) is None


def test_no_kernel_off_cuda() -> None:
    cpu = ak.BlockAttentionKernel(kernel=exact_kernel, backend="cpu")
    assert cpu.kernel is None and cpu.warps_for(mx.zeros((1, 4, 16, 64)), mx.zeros((1, 2, 40, 64)), None) is None


def test_attention_dispatches_to_a_decided_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA in auto mode a covered block goes to the kernel; unfused mode and array masks do not."""
    calls = []

    def kernel(*args: object) -> mx.array:
        calls.append(args)
        return exact_kernel(*args)  # type: ignore[arg-type]

    d = decider(kernel, kernel_ms=0.5, reference_ms=2.0)
    monkeypatch.setattr(ak, "_DEFAULT", d)
    monkeypatch.setattr(attention, "_on_cuda", lambda: True)
    k1, k2, k3 = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((1, 4, 16, 64), key=k1)
    k = mx.random.normal((1, 2, 40, 64), key=k2)
    v = mx.random.normal((1, 2, 40, 64), key=k3)
    expected = attention.unfused_attention(q, k, v, scale=0.125, mask="causal")
    try:
        attention.set_mode("auto")
        d.decide(SPEC)
        calls.clear()
        got = attention.block_attention(q, k, v, scale=0.125, mask="causal")
        assert len(calls) == 1 and calls[0][3] == 0.125 and calls[0][4] is True
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)
        attention.block_attention(q, k, v, scale=0.125, mask=mx.ones((16, 40), dtype=mx.bool_))
        attention.set_mode("unfused")
        attention.block_attention(q, k, v, scale=0.125, mask="causal")
        assert len(calls) == 1
    finally:
        attention.set_mode(None)


# ---------------------------------------------------------------- the generator's padded decode hook

VOCAB = 96


def wave(seed: int = 0, n: int = 7) -> list[Job]:
    """Prompts of 1..14 tokens: rows of the wave carry different left padding."""
    rng = np.random.default_rng(seed)
    return [Job(rng.integers(0, VOCAB - 1, size=int(rng.integers(1, 15))).tolist(), i, 0) for i in range(n)]


def test_the_decode_hook_is_inert_on_the_cpu() -> None:
    from mlx_lm.models import base, llama

    model = build_target(target_config("llama", vocab_size=VOCAB))
    with padded_decode_attention(model) as on:
        assert not on and llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    jobs = wave()
    config = GenerationConfig(max_new_tokens=12, batch_size=len(jobs), prefill_chunk=4)
    outs, _ = ResponseGenerator(model, set(), config).decode(jobs)
    assert outs == [plain_greedy(model, j.prompt_ids, 12)[0] for j in jobs]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_decode_hook_sends_padded_steps_to_an_adopted_kernel(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a (fake, exact) kernel adopted, every decode step's attention goes to it with the cache's left
    padding as key starts, prefill stays on mlx-lm's path, and the greedy answers do not change."""
    from mlx_lm.models import base

    calls: list[tuple[int, list[int]]] = []

    def kernel(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int,
               start: mx.array | None = None) -> mx.array:
        if start is not None and queries.shape[0] == len(jobs):  # the generator's calls, not the check's
            calls.append((queries.shape[2], start.tolist()))
        return exact_kernel(queries, keys, values, scale, causal, warps, start)

    model = build_target(target_config(family, vocab_size=VOCAB, hidden_size=256, head_dim=64), seed=3)
    jobs = wave(seed=1)
    config = GenerationConfig(max_new_tokens=10, batch_size=len(jobs), prefill_chunk=4)
    monkeypatch.setattr(ak, "_DEFAULT", decider(kernel, kernel_ms=0.5, reference_ms=2.0))
    module = importlib.import_module(f"mlx_lm.models.{family}")
    with padded_decode_attention(model) as on:
        assert on and module.scaled_dot_product_attention is not base.scaled_dot_product_attention
    assert module.scaled_dot_product_attention is base.scaled_dot_product_attention  # restored
    outs, _ = ResponseGenerator(model, set(), config).decode(jobs)
    width = max(len(j.prompt_ids) for j in jobs)
    layers = len(model.layers)
    assert len(calls) == 11 * layers  # 10 tokens and the step launched ahead of the host; no prefill calls
    assert {c[0] for c in calls} == {1} and {tuple(c[1]) for c in calls} == {tuple(width - len(j.prompt_ids) for j in jobs)}
    assert outs == [plain_greedy(model, j.prompt_ids, 10)[0] for j in jobs]


def test_batched_decode_steps_take_the_padded_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's batched steps (engine/decode/batch.py on a fused target): with a (fake, exact) padded
    kernel adopted on a pretend CUDA device, every layer of every step attends through it with the batch
    cache's left padding as key starts, prefills (one request alone, several rows) never do, and each row
    decodes its solo greedy tokens."""
    from engine.decode.batch import BatchDecoder
    from engine.decode.prefix_cache import PrefixLease

    calls: list[tuple[int, bool, list[int]]] = []

    def kernel(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int,
               start: mx.array | None = None) -> mx.array:
        if start is not None:
            calls.append((queries.shape[2], causal, start.tolist()))
        return exact_kernel(queries, keys, values, scale, causal, warps, start)

    d = decider(kernel, kernel_ms=0.5, reference_ms=2.0)
    monkeypatch.setattr(ak, "_DEFAULT", d)
    monkeypatch.setattr(attention, "_on_cuda", lambda: True)
    model = build_target(target_config("llama", vocab_size=VOCAB, hidden_size=256, head_dim=64), seed=5)
    fuse_projections(model)
    heads, kv_heads = model.args.num_attention_heads, model.args.num_key_value_heads
    assert d.padded_warps_for(mx.zeros((1, heads, 1, 64)), mx.zeros((1, kv_heads, 8, 64))) is not None
    calls.clear()  # the decision's own checks
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2], [11, 3, 6, 6, 2]]
    batch = BatchDecoder(model)
    tokens: list[list[int]] = []
    for ids in prompts:
        row = batch.make_row(SamplingParams(temperature=0.0), TokenRng(0), PrefixLease(None, ids, None), len(ids),
                             wants_taps=False)
        tokens.append(batch.prefill_and_join(row, ids).tokens[:1])
    attention.set_mode("auto")
    try:
        for _ in range(6):
            for row, step in batch.step():
                tokens[batch.rows.index(row)] += step.tokens
    finally:
        attention.set_mode(None)
    width = max(len(p) for p in prompts)
    assert len(calls) == 6 * len(model.layers)
    assert {(rows, causal, tuple(start)) for rows, causal, start in calls} == {
        (1, False, tuple(width - len(p) for p in prompts))}
    assert tokens == [plain_greedy(model, p, 6)[0] for p in prompts]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tree_verifies_take_the_tree_kernel(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy DFlash with a tree of 12 nodes every cycle on a fused target, a (fake, exact) kernel adopted on
    a pretend CUDA device: every layer of every tree verify attends through the kernel's tree variant with
    the rows' bit sets (the dense mask is never needed), and the output is plain greedy decoding's."""
    calls: list[int] = []

    def kernel(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int,
               start: mx.array | None = None, bits: mx.array | None = None) -> mx.array:
        if bits is not None:
            calls.append(queries.shape[2])
        return exact_kernel(queries, keys, values, scale, causal, warps, start, bits)

    d = decider(kernel, kernel_ms=0.5, reference_ms=2.0)
    monkeypatch.setattr(ak, "_DEFAULT", d)
    monkeypatch.setattr(attention, "_on_cuda", lambda: True)
    cfg = target_config(family, vocab_size=VOCAB, hidden_size=256, head_dim=64)
    model = build_target(cfg, seed=5)
    prompt = [5, 9, 2, 7, 1, 4]
    ref, _ = plain_greedy(model, prompt, 24)
    fuse_projections(model)
    dcfg = draft_config(cfg, block_size=6)
    target = Target(model, dcfg.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=6,
                                 adaptive=False, tree_budget=12)
    attention.set_mode("auto")
    try:
        d.decide(ak.AttentionSpec(mx.float32, 64, model.args.num_attention_heads, model.args.num_key_value_heads,
                                  False, tree=True))
        calls.clear()  # the decision's own checks
        out = [t for s in decoder.generate(prompt, SamplingParams(temperature=0.0), 24, TokenRng(0)) for t in s.tokens]
    finally:
        attention.set_mode(None)
        target.close()
    trees = sum(1 for b in decoder.stats.budgets if b)
    assert trees >= 2 and len(calls) == trees * len(model.layers) and set(calls) <= {13}
    assert out == ref


def test_a_rejected_padded_kernel_leaves_generation_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool, warps: int,
              start: mx.array | None = None) -> mx.array:
        return exact_kernel(queries, keys, values, scale, causal, warps)  # attends to the padding too

    d = decider(wrong, kernel_ms=0.1, reference_ms=2.0)
    monkeypatch.setattr(ak, "_DEFAULT", d)
    model = build_target(target_config("llama", vocab_size=VOCAB, hidden_size=256, head_dim=64), seed=3)
    jobs = wave(seed=2, n=4)
    outs, _ = ResponseGenerator(model, set(), GenerationConfig(max_new_tokens=6, batch_size=4)).decode(jobs)
    assert [d.warps for d in d.decisions.values()] == [None]
    assert outs == [plain_greedy(model, j.prompt_ids, 6)[0] for j in jobs]


# ---------------------------------------------------------------- the real kernel on a CUDA device

CUDA = ak.detect_backend() == "cuda"


@pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("heads,kv_heads,dim,dtype", [(9, 3, 64, mx.bfloat16), (9, 3, 64, mx.float16),
                                                    (9, 3, 64, mx.float32), (32, 8, 128, mx.bfloat16)])
def test_device_kernel_numerics(heads: int, kv_heads: int, dim: int, dtype: mx.Dtype) -> None:
    kernel = ak.BlockAttentionKernel()
    assert kernel.kernel is not None
    for spec in (ak.AttentionSpec(dtype, dim, heads, kv_heads, True), ak.AttentionSpec(dtype, dim, heads, kv_heads, False),
                 ak.AttentionSpec(dtype, dim, heads, kv_heads, False, tree=True)):
        for warps in ak.WARPS[dim]:
            error = kernel.max_rel_error(spec, warps)
            assert error < ak.TOLERANCE[dtype], (spec, warps, error)


@pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_device_greedy_dflash_through_the_kernel_equals_plain(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify and draft blocks through the real kernel (its speed check skipped, numerics kept):
    greedy speculative output stays plain decoding's."""
    prompt = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    cfg = target_config(family, tie_word_embeddings=False, hidden_size=256, head_dim=64)
    model = build_target(cfg, seed=1)
    ref, gap = plain_greedy(model, prompt, 40)
    assert gap > 1e-4
    fuse_projections(model)
    dcfg = draft_config(cfg, block_size=8, head_dim=64)
    target = Target(model, dcfg.target_layer_ids)
    kernel = decider(ak.make_cuda_kernel(), kernel_ms=0.5, reference_ms=2.0)
    monkeypatch.setattr(ak, "_DEFAULT", kernel)
    attention.set_mode("auto")
    try:
        decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=8,
                                     adaptive=False)
        steps = [s for s in decoder.generate(prompt, SamplingParams(temperature=0.0), 40, TokenRng(0)) if s.tokens]
    finally:
        attention.set_mode(None)
        target.close()
    assert {spec.causal for spec, d in kernel.decisions.items() if d.warps is not None} == {True, False}  # verify and draft
    assert [t for s in steps for t in s.tokens] == ref


@pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("heads,kv_heads,dim,dtype", [(9, 3, 64, mx.bfloat16), (9, 3, 64, mx.float32),
                                                    (32, 8, 128, mx.bfloat16), (8, 8, 64, mx.float16)])
def test_device_padded_kernel_numerics(heads: int, kv_heads: int, dim: int, dtype: mx.Dtype) -> None:
    kernel = ak.BlockAttentionKernel()
    spec = ak.AttentionSpec(dtype, dim, heads, kv_heads, False, padded=True)
    for warps in ak.DECODE_WARPS[dim]:
        error = kernel.max_rel_error(spec, warps)
        assert error < ak.TOLERANCE[dtype], (spec, warps, error)


@pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend")
def test_device_padded_kernel_matches_masked_sdpa_at_the_generation_shape() -> None:
    """SmolLM2-135M's decode step in a wave of 1024 rows over 320 keys, strided like a BatchKVCache."""
    spec = ak.AttentionSpec(mx.bfloat16, 64, 9, 3, False, padded=True)
    q, k, v = ak.random_block(spec, 1, 320, spare=192, batch=1024)
    start = (mx.arange(1024) * 7 % 64).astype(mx.int32)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=ak.padding_mask(start, 320))
    oracle = ak.float32_reference(q, k, v, 0.125, False, start=start)
    kernel = ak.BlockAttentionKernel()
    for warps in ak.DECODE_WARPS[64]:
        got = kernel(q, k, v, 0.125, False, warps, start=start).astype(mx.float32)
        # against mx.fast both sides round to bfloat16, so twice the oracle's tolerance; wrong starts give O(1)
        for ref, tol in ((oracle, ak.TOLERANCE[mx.bfloat16]), (want.astype(mx.float32), 2 * ak.TOLERANCE[mx.bfloat16])):
            error = (mx.max(mx.abs(got - ref)) / mx.max(mx.abs(ref))).item()
            assert error < tol, (warps, error)


@pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_device_generation_through_the_padded_kernel_equals_mx_fast(family: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A wave's greedy answers with decode steps through the real kernel (speed check skipped, numerics
    kept) equal those with mx.fast's masked attention (the hook off under DFLASH_ATTENTION=fused)."""
    model = build_target(target_config(family, vocab_size=VOCAB, hidden_size=256, head_dim=64), seed=3)
    jobs = wave(seed=5, n=16)
    config = GenerationConfig(max_new_tokens=24, batch_size=len(jobs), prefill_chunk=8)
    kernel = decider(ak.make_cuda_kernel(), kernel_ms=0.5, reference_ms=2.0)
    monkeypatch.setattr(ak, "_DEFAULT", kernel)
    try:
        attention.set_mode("fused")
        want, _ = ResponseGenerator(model, set(), config).decode(jobs)
        attention.set_mode("auto")
        got, _ = ResponseGenerator(model, set(), config).decode(jobs)
    finally:
        attention.set_mode(None)
    assert [d.warps is not None for spec, d in kernel.decisions.items() if spec.padded] == [True]
    assert got == want
