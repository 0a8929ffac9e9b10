"""engine/model/attention.py: the explicit block attention equals mx.fast's, and the mode switch routes by rows."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import FP32_ATOL

from engine.backend import fast_exp
from engine.model import attention


def _qkv(rows: int, length: int, heads: int = 9, kv_heads: int = 3, dim: int = 64) -> tuple[mx.array, ...]:
    k1, k2, k3 = mx.random.split(mx.random.key(rows * 1000 + length), 3)
    q = mx.random.normal((2, heads, rows, dim), key=k1)
    k = mx.random.normal((2, kv_heads, length, dim), key=k2)
    v = mx.random.normal((2, kv_heads, length, dim), key=k3)
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive", "bool_per_head", "bool_shared_head",
                                       "additive_key_row"])
@pytest.mark.parametrize("rows,length", [(1, 7), (4, 4), (16, 37), (16, 300)])
def test_unfused_equals_fast(mask_kind: str, rows: int, length: int) -> None:
    q, k, v = _qkv(rows, length)
    rng = np.random.default_rng(rows + length)
    mask: mx.array | str | None = None
    if mask_kind == "causal":
        mask = "causal"
    elif mask_kind == "bool":
        keep = rng.random((rows, length)) < 0.7
        keep[:, 0] = True  # no fully masked row
        mask = mx.array(keep)
    elif mask_kind == "additive":
        mask = mx.array(rng.normal(size=(rows, length)).astype(np.float32))
    elif mask_kind == "bool_per_head":
        keep = rng.random((2, 9, rows, length)) < 0.5
        keep[..., -1] = True
        mask = mx.array(keep)
    elif mask_kind == "bool_shared_head":  # (B, 1, L, S)
        keep = rng.random((2, 1, rows, length)) < 0.6
        keep[..., 0] = True
        mask = mx.array(keep)
    elif mask_kind == "additive_key_row":  # (1, S): one bias per key, every row
        mask = mx.array(rng.normal(size=(1, length)).astype(np.float32))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    got = attention.unfused_attention(q, k, v, scale=0.125, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=FP32_ATOL)


def test_causal_block_sees_exactly_its_prefix() -> None:
    """Row i of a 4-row block over 10 keys sees keys 0..6+i: changing key 7 changes rows 1..3 only."""
    q, k, v = _qkv(4, 10)
    base = attention.unfused_attention(q, k, v, scale=0.125, mask="causal")
    v2 = v.at[:, :, 7].add(1.0)
    moved = attention.unfused_attention(q, k, v2, scale=0.125, mask="causal")
    changed = np.abs(np.array(moved - base)).max(axis=(0, 1, 3)) > 0
    assert changed.tolist() == [False, True, True, True]


def test_mode_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        attention.set_mode("unfused")
        assert attention.use_unfused(16) and not attention.use_unfused(1)
        attention.set_mode("fused")
        assert not attention.use_unfused(16)
        attention.set_mode("auto")  # CUDA: explicit for 2..64 rows; CPU: explicit for 1..64 rows
        assert attention.use_unfused(16) == (attention._on_cuda() or fast_exp.enabled())
        assert attention.use_unfused(1) == fast_exp.enabled() and not attention.use_unfused(512)
        fast_exp.set_enabled(False)  # DFLASH_FAST_EXP=0 on the CPU: mx.fast for every row count
        assert attention.use_unfused(16) == attention._on_cuda() and not attention.use_unfused(1)
        with pytest.raises(ValueError, match="attention mode"):
            attention.set_mode("flash")
        monkeypatch.setenv(attention.ENV, "unfused")
        attention.set_mode(None)
        assert attention.mode() == "unfused"
    finally:
        attention.set_mode(None)
        fast_exp.set_enabled(None)
        monkeypatch.delenv(attention.ENV, raising=False)
        attention.set_mode(None)


class _Recorder:
    """Stands in for the explicit composition and counts its calls (the real one computes the result)."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = attention.unfused_attention

    def __call__(self, *args: object, **kwargs: object) -> mx.array:
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Recorder]:
    """The CUDA routing on this machine: a fresh PrefillPlans and a counted explicit path."""
    recorder = _Recorder()
    monkeypatch.setattr(attention, "_on_cuda", lambda: True)
    monkeypatch.setattr(attention, "_prefill_plans", attention.PrefillPlans())
    monkeypatch.setattr(attention, "unfused_attention", recorder)
    monkeypatch.delenv(attention.PREFILL_ENV, raising=False)
    attention.set_mode("auto")
    yield recorder
    attention.set_mode(None)


def test_prefill_chunk_at_a_new_shape_skips_the_plan(on_cuda: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a layer's first chunk at a (rows, keys) shape is explicit, its second fused; per layer."""
    q, k, v = _qkv(100, 300)
    layer_a, layer_b = object(), object()
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    for site, explicit in ((layer_a, 1), (layer_b, 2), (layer_a, 2), (layer_b, 2)):
        got = attention.block_attention(q, k, v, scale=0.125, mask="causal", site=site)
        assert on_cuda.calls == explicit
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=FP32_ATOL)
    q2, k2, v2 = _qkv(100, 301)  # one more key: a new shape for layer a
    attention.block_attention(q2, k2, v2, scale=0.125, mask="causal", site=layer_a)
    attention.block_attention(q2, k2, v2, scale=0.125, mask=None, site=layer_a)  # another mask, another plan
    assert on_cuda.calls == 4
    attention.block_attention(q, k, v, scale=0.125, mask="causal")  # no site: not a target layer's prefill
    assert on_cuda.calls == 4
    monkeypatch.setenv(attention.PREFILL_ENV, "fused")
    attention.block_attention(q, k, v, scale=0.125, mask="causal", site=object())
    assert on_cuda.calls == 4


def test_prefill_scores_over_the_bound_stay_fused(on_cuda: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(100, 300)  # scores: 2 x 9 x 100 x 300 float32 = 2.16 MB
    monkeypatch.setattr(attention, "PREFILL_SCORES_BYTES", 2 * 9 * 100 * 300 * 4 - 1)
    attention.block_attention(q, k, v, scale=0.125, mask="causal", site=object())
    assert on_cuda.calls == 0
    monkeypatch.setattr(attention, "PREFILL_SCORES_BYTES", 2 * 9 * 100 * 300 * 4)
    attention.block_attention(q, k, v, scale=0.125, mask="causal", site=object())
    assert on_cuda.calls == 1


def test_prefill_plans_forget_past_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    plans = attention.PrefillPlans()
    monkeypatch.setattr(attention.PrefillPlans, "MAX_SIGHTINGS", 2)
    q, k, _ = _qkv(100, 300)
    sites = [object() for _ in range(3)]
    assert all(plans.explicit(site, q, k, "causal") for site in sites)  # the third clears the first two
    assert not plans.explicit(sites[2], q, k, "causal") and plans.explicit(sites[0], q, k, "causal")


def test_fused_target_layers_name_themselves(on_cuda: _Recorder) -> None:
    """A packed target's prefill passes its layer: every layer explicit at a new chunk shape, none at a repeat."""
    from mlx_lm.models.cache import make_prompt_cache
    from tiny_models import build_target, target_config

    from engine.model.fused import fuse_projections

    model = build_target(target_config("llama"), seed=0)
    assert fuse_projections(model) == len(model.model.layers)
    ids = mx.array([[(7 * i) % 50 + 1 for i in range(80)]])
    first = model(ids, cache=make_prompt_cache(model))
    assert on_cuda.calls == len(model.model.layers)
    again = model(ids, cache=make_prompt_cache(model))
    assert on_cuda.calls == len(model.model.layers)
    np.testing.assert_allclose(np.array(first), np.array(again), rtol=1e-4, atol=1e-4)
