"""engine/backend/cpu_quant.py: where the quantized CPU kernel runs, its build, numerics and choice.

The kernel tests build it (seconds, cached under a temporary XDG_CACHE_HOME per session) and skip, saying
why, on machines that cannot: another CPU, no compiler or Python headers.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.backend import cpu_quant
from engine.backend.cpu_quant import CpuQuant, KernelUnavailable
from engine.backend.disk_cache import DiskCache
from engine.model.quant_linear import pack

FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni amx_int8\n"


@pytest.fixture(scope="session")
def ext(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    try:
        cpu_quant.unsupported_here()
        return cpu_quant.load_extension(tmp_path_factory.mktemp("cpu_quant"))
    except KernelUnavailable as e:
        pytest.skip(f"the quantized CPU kernel cannot run here: {e}")


def test_choice_reads_the_environment() -> None:
    assert cpu_quant.choice({}) == "auto"
    assert cpu_quant.choice({"DFLASH_CPU_QUANT": "0"}) == "off"
    assert cpu_quant.choice({"DFLASH_CPU_QUANT": "On"}) == "on"
    with pytest.raises(KernelUnavailable, match="expected one of auto, on, off"):
        cpu_quant.choice({"DFLASH_CPU_QUANT": "fast"})


def test_cpus_without_vnni_are_refused_by_name() -> None:
    if mx.default_device() != mx.cpu:
        pytest.skip("MLX runs on a GPU")
    try:
        cpu_quant.unsupported_here(FLAGS)
    except KernelUnavailable as e:  # another platform: refused before the flags are read
        assert "x86-64 Linux only" in str(e)
        return
    with pytest.raises(KernelUnavailable, match="lacks avx512_vnni"):
        cpu_quant.unsupported_here(FLAGS.replace(" avx512_vnni", ""))


def test_a_missing_compiler_is_one_clear_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu_quant.shutil, "which", lambda name: None)
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler"):
        cpu_quant.compile_extension(tmp_path / "lib.so")


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_lays_out_every_weight_once(bits: int) -> None:
    """Unpacking the kernel's layout by its documented formula gives back MLX's values, rows padded to 16."""
    rng = np.random.default_rng(bits)
    n, k = 37, 96
    w, scales, biases = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32)), group_size=32, bits=bits)
    values, packed_scales, mins = pack(w, scales, biases, 32, bits)
    groups = (n + 15) // 16
    assert values.shape == (groups, k // 32, 8 * bits * 8) and packed_scales.shape == mins.shape == (groups, k // 32, 16)
    v = np.asarray(values)
    q = np.zeros((groups * 16, k), np.uint8)
    for g in range(groups):
        for b in range(k // 32):
            for i in range(8 if bits == 8 else 4):
                for j in range(16):
                    for t in range(4):
                        byte = v[g, b, i * 64 + j * 4 + t]
                        if bits == 8:
                            q[16 * g + j, 32 * b + 4 * i + t] = byte
                        else:
                            q[16 * g + j, 32 * b + 4 * i + t] = byte & 15
                            q[16 * g + j, 32 * b + 16 + 4 * i + t] = byte >> 4
    dense = q[:n] * np.asarray(packed_scales, np.float32).transpose(0, 2, 1).reshape(-1, k // 32)[:n].repeat(32, 1) \
        + np.asarray(mins, np.float32).transpose(0, 2, 1).reshape(-1, k // 32)[:n].repeat(32, 1)
    assert np.array_equal(dense.astype(np.float32), np.asarray(mx.dequantize(w, scales, biases, 32, bits)))
    assert not q[n:].any()  # padding rows are zero
    assert packed_scales.dtype == mx.float32  # mx.quantize's float32 scales are not all float16-exact


def test_float16_exact_scales_are_stored_in_float16() -> None:
    w, scales, biases = mx.quantize(mx.random.normal((16, 64), key=mx.random.key(0)), group_size=32, bits=4)
    _, packed, mins = pack(w, scales.astype(mx.float16).astype(mx.float32), biases.astype(mx.float16), 32)
    assert packed.dtype == mins.dtype == mx.float16


def test_kernel_is_exact_on_int8_activations_and_batch_invariant(ext: ModuleType) -> None:
    assert cpu_quant.max_rel_error(ext) <= cpu_quant.MAX_REL_ERROR


@pytest.mark.parametrize(("bits", "group", "rows"), [(4, 32, 1), (4, 64, 5), (8, 32, 9), (8, 128, 16)])
def test_kernel_tracks_float_on_normal_activations(ext: ModuleType, bits: int, group: int, rows: int) -> None:
    """Normal activations as two int8 codes per block of 32: within ~1e-4 of the float product (one code
    was ~1e-2 off, enough to change the embedded model's greedy answers)."""
    rng = np.random.default_rng(rows)
    n, k = 50, 256
    w, scales, biases = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32)), group_size=group, bits=bits)
    x = mx.array(rng.standard_normal((rows, k)).astype(np.float32))
    got = np.asarray(ext.quant_matmul(x, *pack(w, scales, biases, group, bits), n, group))
    want = np.asarray(x) @ np.asarray(mx.dequantize(w, scales, biases, group, bits)).T
    assert got.shape == (rows, n)
    assert np.abs(got - want).mean() / np.abs(want).mean() < 2e-4


def test_kernel_refuses_shapes_it_cannot_run(ext: ModuleType) -> None:
    w, scales, biases = mx.quantize(mx.random.normal((16, 64), key=mx.random.key(1)), group_size=32, bits=4)
    packed = pack(w, scales, biases, 32)
    with pytest.raises(ValueError, match="quant_matmul: x"):
        ext.quant_matmul(mx.zeros((1, 48)), *packed, 16, 32)  # K differs from the weights'
    with pytest.raises(ValueError, match="quant_matmul: x"):
        ext.quant_matmul(mx.zeros((1, 64), dtype=mx.float16), *packed, 16, 32)


def test_timed_choice_keeps_float32_where_the_kernel_is_slower(ext: ModuleType, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cpu_quant.json", 4)
    cache.put(cpu_quant.machine_key(), {"kernel_ms": 10.0, "float32_ms": 10.1}, "test")
    slow = cpu_quant.timed_choice(ext, cache)
    assert slow.ext is None and "not faster than float32" in slow.reason
    cache.put(cpu_quant.machine_key(), {"kernel_ms": 4.0, "float32_ms": 10.0}, "test")
    fast = cpu_quant.timed_choice(ext, cache)
    assert fast.ext is ext and "2.50x float32's speed" in fast.reason


def test_timing_measures_both(ext: ModuleType) -> None:
    entry = cpu_quant.time_products(ext, rounds=1)
    assert entry["kernel_ms"] > 0 and entry["float32_ms"] > 0


def test_off_is_float32_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFLASH_CPU_QUANT", "off")
    cpu_quant.default_cpu_quant.cache_clear()
    try:
        assert cpu_quant.default_cpu_quant() == CpuQuant(None, "off (DFLASH_CPU_QUANT=off)")
    finally:
        cpu_quant.default_cpu_quant.cache_clear()


def test_block_attention_matches_float64_and_each_row_alone(ext: ModuleType) -> None:
    assert cpu_quant.attention_error(ext, np.random.default_rng(5)) <= cpu_quant.MAX_REL_ERROR


def test_block_attention_refuses_shapes_it_cannot_run(ext: ModuleType) -> None:
    q, kv = mx.zeros((1, 4, 3, 32)), mx.zeros((1, 3, 8, 32))  # 4 heads over 3 KV heads
    with pytest.raises(ValueError, match="block_attention: q"):
        ext.block_attention(q, kv, kv, 1.0, False)
    with pytest.raises(ValueError, match="block_attention: q"):
        ext.block_attention(mx.zeros((1, 2, 9, 32)), mx.zeros((1, 2, 8, 32)), mx.zeros((1, 2, 8, 32)), 1.0, True)


def test_attention_routes_blocks_through_the_kernel(ext: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a model runs on the kernel, unmasked and causal float32 blocks take its attention; the rest
    (array masks, batched rows' padding) keep MLX's composition."""
    from engine.model import attention

    calls: list[bool] = []

    class Counting:
        def block_attention(self, *args: object) -> mx.array:
            calls.append(bool(args[-1]))
            return ext.block_attention(*args)

    q, k, v = (mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate([(1, 4, 3, 32), (1, 2, 9, 32), (1, 2, 9, 32)]))
    want = attention.block_attention(q, k, v, scale=0.2, mask="causal")
    monkeypatch.setattr(attention, "_cpu_kernel", Counting())
    got = attention.block_attention(q, k, v, scale=0.2, mask="causal")
    attention.block_attention(q, k, v, scale=0.2, mask=None)
    attention.block_attention(q, k, v, scale=0.2, mask=mx.ones((3, 9), dtype=mx.bool_))
    assert calls == [True, False]
    assert mx.allclose(got, want, atol=1e-5).item()


def test_top_probability_matches_softmax(ext: ModuleType) -> None:
    assert cpu_quant.top_probability_error(ext, np.random.default_rng(3)) <= cpu_quant.MAX_REL_ERROR
    rows = mx.array([[0.0, -mx.inf, -mx.inf], [-mx.inf, -mx.inf, -mx.inf]])
    assert np.asarray(ext.top_probability(rows)).tolist() == [1.0, 0.0]  # a sure row; a row with no distribution
    assert ext.top_probability(mx.zeros((2, 3, 40))).shape == (2, 3)


def test_quant_matmul_maps_over_a_batch_of_inputs(ext: ModuleType) -> None:
    """vmap over the activations (the training objective's per-sequence draft forwards on a kernel draft), the
    mapped axis first or last: each slice equals the product of that slice alone."""
    rng = np.random.default_rng(1)
    w, scales, biases = mx.quantize(mx.array(rng.standard_normal((40, 64)).astype(np.float32)), group_size=32, bits=8)
    packed = pack(w, scales, biases, 32, 8)
    x = mx.array(rng.standard_normal((3, 5, 64)).astype(np.float32))
    alone = np.stack([np.asarray(ext.quant_matmul(x[i], *packed, 40, 32)) for i in range(3)])
    mapped = mx.vmap(lambda a: ext.quant_matmul(a, *packed, 40, 32))(x)
    assert np.array_equal(np.asarray(mapped), alone)
    last = mx.vmap(lambda a: ext.quant_matmul(a, *packed, 40, 32), in_axes=2, out_axes=0)(mx.moveaxis(x, 0, 2))
    assert np.array_equal(np.asarray(last), alone)


def test_strided_inputs_equal_their_row_major_copies(ext: ModuleType) -> None:
    """The kernel's ops take their inputs as they come (no contiguous() node in the graph) and copy a view
    that is not row-major when they run: a transposed, a sliced and a broadcast input each give what their
    contiguous copies give, bit for bit."""
    rng = np.random.default_rng(2)
    w, scales, biases = mx.quantize(mx.array(rng.standard_normal((24, 64)).astype(np.float32)), group_size=32, bits=4)
    packed = pack(w, scales, biases, 32)
    base = mx.array(rng.standard_normal((64, 6)).astype(np.float32))
    views = {"transposed": base.T, "sliced": mx.array(rng.standard_normal((5, 128)).astype(np.float32))[:, ::2],
             "broadcast": mx.broadcast_to(base[:, :1].T, (3, 64))}
    for name, x in views.items():
        got, want = ext.quant_matmul(x, *packed, 24, 32), ext.quant_matmul(mx.contiguous(x), *packed, 24, 32)
        assert np.array_equal(np.asarray(got), np.asarray(want)), name
    q = mx.array(rng.standard_normal((1, 2, 32, 3)).astype(np.float32)).transpose(0, 1, 3, 2)  # last stride 3
    k = mx.array(rng.standard_normal((1, 2, 7, 32)).astype(np.float32))
    v = mx.array(rng.standard_normal((1, 2, 32, 7)).astype(np.float32)).transpose(0, 1, 3, 2)
    got = ext.block_attention(q, k, v, 0.3, True)
    want = ext.block_attention(mx.contiguous(q), k, mx.contiguous(v), 0.3, True)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    scores = mx.array(rng.standard_normal((40, 3)).astype(np.float32))
    assert np.array_equal(np.asarray(ext.top_probability(scores.T)), np.asarray(ext.top_probability(mx.contiguous(scores.T))))


def test_swiglu_matches_float64_and_each_row_alone(ext: ModuleType) -> None:
    assert cpu_quant.swiglu_error(ext, np.random.default_rng(4)) <= cpu_quant.MAX_REL_ERROR
    with pytest.raises(ValueError, match="swiglu: gate_up"):
        ext.swiglu(mx.zeros((2, 10)), 4)  # not 2 x 4 wide


def test_packed_swiglu_takes_the_kernel_where_a_model_runs_on_it(ext: ModuleType) -> None:
    """fast_exp.packed_swiglu (the packed MLPs' activation) goes through the kernel's op once prepare_model
    hands it the kernel, and gives mlx-lm's swiglu to float32 rounding; under vmap too (a kernel draft's
    training-objective forwards)."""
    from mlx_lm.models.activations import swiglu

    from engine.backend import fast_exp

    gate_up = mx.random.normal((3, 4, 2 * 40), key=mx.random.key(7)) * 3
    want = swiglu(gate_up[..., :40], gate_up[..., 40:])
    fast_exp.use_cpu_kernel(ext)
    try:
        graph = fast_exp.packed_swiglu(gate_up, 40)
        assert "DFlashSwiglu" in _graph_ops(graph)
        assert mx.allclose(graph, want, rtol=1e-5, atol=1e-6).item()
        columns = mx.moveaxis(gate_up, 1, 2)  # (3, 80, 4): vmap over the last axis, each slice a (3, 80) block
        mapped = mx.vmap(lambda a: fast_exp.packed_swiglu(a, 40), in_axes=2, out_axes=1)(columns)
        assert mx.array_equal(mapped, graph).item()
    finally:
        fast_exp.use_cpu_kernel(None)
    assert "DFlashSwiglu" not in _graph_ops(fast_exp.packed_swiglu(gate_up, 40))


def _graph_ops(out: mx.array) -> str:
    import io

    buffer = io.StringIO()
    mx.export_to_dot(buffer, out)
    return buffer.getvalue()


def test_rms_norm_matches_float64_and_each_row_alone(ext: ModuleType) -> None:
    assert cpu_quant.rms_norm_error(ext, np.random.default_rng(6)) <= cpu_quant.MAX_REL_ERROR
    with pytest.raises(ValueError, match="rms_norm: x"):
        ext.rms_norm(mx.zeros((2, 10)), mx.ones((8,)), 1e-5)


def test_compiled_norms_take_the_kernel_where_a_model_runs_on_it(ext: ModuleType) -> None:
    """A CompiledRMSNorm (every norm of a model on the CPU) runs the kernel's one-node op once prepare_model hands
    it the kernel, prefill-sized inputs included, and gives nn.RMSNorm's values to float32 rounding."""
    from engine.model import compiled_norm

    norm = nn.RMSNorm(48, eps=1e-6)
    norm.weight = mx.random.normal((48,), key=mx.random.key(2))
    x = mx.random.normal((3, 500, 48), key=mx.random.key(3))
    want = norm(x)
    compiled_norm.compile_norms(norm)
    compiled_norm.use_cpu_kernel(ext)
    try:
        got = norm(x)
        assert "DFlashRmsNorm" in _graph_ops(got)
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()
    finally:
        compiled_norm.use_cpu_kernel(None)
    assert "DFlashRmsNorm" not in _graph_ops(norm(x[:, :2]))
