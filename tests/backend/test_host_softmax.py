"""Prefill attention with NumPy's softmax equals MLX's attention, for every mask the target feeds it."""

from __future__ import annotations

import mlx.core as mx
import pytest

from engine.backend import host_softmax
from engine.backend.host_softmax import host_softmax_attention
from engine.model import attention


def _inputs(rows: int, length: int, heads: int = 6, kv_heads: int = 2, seed: int = 0) -> tuple[mx.array, ...]:
    mx.random.seed(seed)
    q = mx.random.normal((1, heads, rows, 32))
    k = mx.random.normal((1, kv_heads, length, 32)) * 3  # peaked rows: the max matters
    v = mx.random.normal((1, kv_heads, length, 32))
    return q, k, v


@pytest.mark.parametrize("rows,length", [(130, 130), (130, 400), (7, 300), (257, 1000)])
def test_causal_prefill_equals_mlx_attention(rows: int, length: int) -> None:
    q, k, v = _inputs(rows, length)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    got = host_softmax_attention(q, k, v, scale=0.2, mask="causal")
    assert got.shape == want.shape and mx.allclose(got, want, atol=2e-5, rtol=1e-4).item()


@pytest.mark.parametrize("kind", ["bool", "additive", "per-head"])
def test_array_masks_equal_mlx_attention(kind: str) -> None:
    q, k, v = _inputs(140, 300, seed=1)
    visible = mx.random.uniform(shape=(140, 300)) > 0.3
    visible = visible | (mx.arange(300)[None] == 299)  # every row sees a key
    if kind == "bool":
        mask = visible
    elif kind == "additive":
        mask = mx.where(visible, 0.0, -1e9)
    else:
        mask = mx.stack([visible, visible[::-1, ::-1] | (mx.arange(300)[None] == 0)] * 3)[None]  # (1, H, L, S)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    got = host_softmax_attention(q, k, v, scale=0.2, mask=mask)
    assert mx.allclose(got, want, atol=2e-5, rtol=1e-4).item()


def test_target_prefill_chunks_take_it_on_the_cpu_and_blocks_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = host_softmax_attention
    monkeypatch.setattr(attention, "host_softmax_attention", lambda q, *a, **kw: calls.append(q.shape[2]) or real(q, *a, **kw))
    monkeypatch.setattr(attention.fast_exp, "enabled", lambda: True)
    attention.set_mode("auto")
    for rows, on_host in [(host_softmax.MIN_ROWS, True), (host_softmax.MIN_ROWS - 1, True), (200, False)]:
        q, k, v = _inputs(rows, rows + 10)
        attention.block_attention(q, k, v, scale=0.2, mask="causal", prefill_on_host=on_host)
    assert calls == [host_softmax.MIN_ROWS]  # a verify block (fewer rows) and a draft (not the target) stay in MLX


def test_a_dominant_early_key_neither_overflows_nor_hides_the_rest() -> None:
    q, k, v = _inputs(150, 400, seed=2)
    q = mx.abs(q)
    k = mx.concatenate([mx.full((1, 2, 1, 32), 30.0), k[:, :, 1:]], axis=2)  # scores near 150 at key 0
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    got = host_softmax_attention(q, k, v, scale=0.2, mask="causal")
    assert mx.all(mx.isfinite(got)).item() and mx.allclose(got, want, atol=2e-5, rtol=1e-4).item()
