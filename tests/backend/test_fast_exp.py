"""engine/backend/fast_exp.py: the polynomial exp, softmax and SwiGLU agree with float64 and with MLX's own ops."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_swiglu

from engine.backend import fast_exp


@pytest.fixture
def forced_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fast_exp.set_enabled(True)  # the polynomial path on any backend: it is plain MLX ops
    monkeypatch.setattr(fast_exp, "MIN_ELEMENTS", 0)  # at every size
    yield
    fast_exp.set_enabled(None)


def test_exp_is_accurate_over_the_float32_range() -> None:
    x = np.linspace(-87.0, 88.0, 200_001, dtype=np.float32)
    got = np.array(fast_exp.exp(mx.array(x)), dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-7  # MLX's CPU exp is off by up to 4e-6 here


def test_exp_edges() -> None:
    x = mx.array([-mx.inf, -1000.0, -88.5, 0.0, 1.0, -1.0, 88.0])
    got = np.array(fast_exp.exp(x))
    assert got[:3].tolist() == [0.0, 0.0, 0.0]  # masked scores weigh exactly nothing
    np.testing.assert_allclose(got[3:], np.exp(np.array([0.0, 1.0, -1.0, 88.0])), rtol=2e-7)
    assert np.isnan(np.array(fast_exp.exp(mx.array([np.nan])))).all()
    half = fast_exp.exp(mx.array([1.0], dtype=mx.float16))  # other dtypes: mx.exp
    assert half.dtype == mx.float16


def test_softmax_matches_mlx_with_masked_entries(forced_on: None) -> None:
    scores = mx.random.normal((2, 3, 48, 300), key=mx.random.key(1)) * 8
    keep = mx.arange(300)[None] <= mx.arange(252, 300)[:, None]  # causal rows at the end
    scores = mx.where(keep, scores, mx.array(-mx.inf))
    got = fast_exp.softmax(scores)
    want = mx.softmax(scores, axis=-1, precise=True)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-7, rtol=2e-6)
    assert float(mx.max(mx.where(keep, 0.0, got))) == 0.0
    np.testing.assert_allclose(np.array(mx.sum(got, axis=-1)), 1.0, rtol=3e-6)  # float32 sums of 300


def test_swiglu_matches_mlx_lm(forced_on: None) -> None:
    gate = mx.random.normal((1, 16, 1536), key=mx.random.key(2)) * 6
    up = mx.random.normal((1, 16, 1536), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(fast_exp.swiglu(gate, up)), np.array(mlx_swiglu(gate, up)), atol=1e-6, rtol=1e-5)
    extreme = mx.array([-500.0, -90.0, -30.0, 0.0, 30.0, 90.0, 500.0])
    got = np.array(fast_exp.swiglu(extreme, mx.ones_like(extreme)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.array(mlx_swiglu(extreme, mx.ones_like(extreme))), atol=1e-6, rtol=1e-6)


def test_switched_off_uses_mlx_ops() -> None:
    fast_exp.set_enabled(False)
    try:
        scores = mx.random.normal((4, 40), key=mx.random.key(4))
        assert mx.array_equal(fast_exp.softmax(scores), mx.softmax(scores, axis=-1, precise=True))
        assert mx.array_equal(fast_exp.swiglu(scores, scores), mlx_swiglu(scores, scores))
    finally:
        fast_exp.set_enabled(None)


def test_small_tensors_take_mlx_ops() -> None:
    """Below MIN_ELEMENTS (a decode row) MLX's own ops run; from it on (a verify block) the polynomial."""
    fast_exp.set_enabled(True)
    try:
        n = fast_exp.MIN_ELEMENTS
        small = mx.random.normal((1, n - 1), key=mx.random.key(7)) * 6
        large = mx.random.normal((1, n), key=mx.random.key(8)) * 6
        assert mx.array_equal(fast_exp.softmax(small), mx.softmax(small, axis=-1, precise=True))
        assert mx.array_equal(fast_exp.swiglu(small, small), mlx_swiglu(small, small))
        # the polynomial rounds differently from MLX's exp somewhere in 16K normal draws
        assert not mx.array_equal(fast_exp.softmax(large), mx.softmax(large, axis=-1, precise=True))
        assert not mx.array_equal(fast_exp.swiglu(large, large), mlx_swiglu(large, large))
    finally:
        fast_exp.set_enabled(None)


def test_enabled_reads_the_backend_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        monkeypatch.setenv(fast_exp.ENV, "0")
        fast_exp.set_enabled(None)
        assert not fast_exp.enabled()
        monkeypatch.delenv(fast_exp.ENV)
        fast_exp.set_enabled(None)
        assert fast_exp.enabled() == (mx.default_device() == mx.cpu)
    finally:
        fast_exp.set_enabled(None)


def test_gradients_match_mlx(forced_on: None) -> None:
    # the CPU trains through these too (tests, small fits): d/dx flows through the mantissa
    x = mx.random.normal((64,), key=mx.random.key(5)) * 5
    up = mx.random.normal((64,), key=mx.random.key(6))
    got = mx.grad(lambda g: fast_exp.swiglu(g, up).sum())(x)
    want = mx.grad(lambda g: mlx_swiglu(g, up).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=1e-5)
    got = mx.grad(lambda s: (fast_exp.softmax(s) * up).sum())(x)
    want = mx.grad(lambda s: (mx.softmax(s, axis=-1, precise=True) * up).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6, rtol=1e-5)
