"""Packed Q/K/V and gate/up projections: same logits and taps as the unfused model, unknown modules untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import (
    assert_same_cached_logits,
    build_draft,
    build_target,
    draft_config,
    plain_greedy,
    random_qk_norms,
    speculative_greedy,
    target_config,
)

from engine.decode.drafters import DFlashDrafter
from engine.decode.sampling import SamplingParams, TokenRng
from engine.decode.speculative import SpeculativeDecoder
from engine.model.fused import concat_linears, fuse_projections, is_fused, qk_norm_of, set_one_qk_norm
from engine.model.compiled_layer import compile_layers
from engine.model.packed_draft import pack_draft
from engine.model.target import Target
from engine.runtime.config import EngineConfig
from engine.runtime.serving_model import ServingModel

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]
GDN = {
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
}


def pair(family: str, quantized: bool, **overrides: object) -> tuple[nn.Module, nn.Module]:
    """Two identical tiny models; the second gets fused by the test."""
    config = target_config(family, **overrides)
    models = build_target(config, seed=1), build_target(config, seed=1)
    if quantized:
        for m in models:
            nn.quantize(m, group_size=32, bits=4)
    return models


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_logits_equal_unfused(family: str, quantized: bool) -> None:
    plain, fused = pair(family, quantized)
    num_params = sum(v.size for _, v in tree_flatten(fused.parameters()))
    assert fuse_projections(fused) == 4
    layer = fused.model.layers[0]
    assert is_fused(layer.self_attn) and is_fused(layer.mlp)
    assert "q_proj" not in layer.self_attn and "gate_proj" not in layer.mlp
    assert isinstance(layer.self_attn.qkv_proj, nn.QuantizedLinear if quantized else nn.Linear)
    assert sum(v.size for _, v in tree_flatten(fused.parameters())) == num_params
    ids = mx.array([PROMPT])
    # through the cache too: a prompt, then one row, then a 4-row block (the verify shapes)
    caches = [make_prompt_cache(plain), make_prompt_cache(fused)]
    for chunk in (ids, ids[:, :1], ids[:, 2:6]):
        want, got = plain(chunk, cache=caches[0]), fused(chunk, cache=caches[1])
        assert mx.allclose(want, got, atol=1e-4, rtol=1e-4).item(), mx.abs(want - got).max().item()
    assert fuse_projections(fused) == 0  # idempotent


def test_fusion_composes_with_target_taps() -> None:
    plain, fused = pair("qwen3", quantized=False)
    ids = mx.array([PROMPT])
    want_logits, want_taps = Target(plain, (1, 3))(ids, None, taps=True)
    tapped = Target(fused, (1, 3))  # taps first, fusion second: both class swaps must hold
    assert fuse_projections(fused) == 4
    logits, taps = tapped(ids, None, taps=True)
    assert mx.allclose(logits, want_logits, atol=1e-4).item() and mx.allclose(taps, want_taps, atol=1e-4).item()
    tapped.close()
    layer = fused.model.layers[1]
    assert "_dflash_tap" not in layer.__dict__ and is_fused(layer.self_attn)
    again_logits, again_taps = Target(fused, (1, 3))(ids, None, taps=True)  # fusion first, taps second
    assert mx.allclose(again_taps, want_taps, atol=1e-4).item()


def test_greedy_dflash_on_fused_target_equals_unfused_plain() -> None:
    plain, fused = pair("llama", quantized=False, tie_word_embeddings=False)
    want, _ = plain_greedy(plain, PROMPT, 24)
    fuse_projections(fused)
    config = target_config("llama")
    target = Target(fused, draft_config(config).target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(draft_config(config)), target), block_size=4)
    out = [t for s in decoder.generate(PROMPT, SamplingParams(temperature=0.0), 24, TokenRng(0)) for t in s.tokens]
    assert out == want


def test_unknown_modules_are_left_untouched() -> None:
    """qwen3_5: Gated DeltaNet layers and gated attention are skipped; its plain MLPs are fused."""
    config = target_config("qwen3_5", tie_word_embeddings=False, **GDN)
    plain, fused = build_target(config, seed=2), build_target(config, seed=2)
    assert fuse_projections(fused) == 4
    for layer in fused.language_model.model.layers:
        assert is_fused(layer.mlp)
        attention = layer.linear_attn if "linear_attn" in layer else layer.self_attn
        assert not is_fused(attention)
    assert "q_proj" in fused.language_model.model.layers[3].self_attn
    ids = mx.array([PROMPT])
    assert mx.allclose(plain(ids), fused(ids), atol=1e-4).item()


def test_incompatible_projections_are_skipped() -> None:
    _, model = pair("llama", quantized=False)
    attn = model.model.layers[0].self_attn
    attn.k_proj = nn.QuantizedLinear.from_linear(attn.k_proj, group_size=32, bits=8)  # mixed precision
    assert concat_linears([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    q8 = nn.QuantizedLinear.from_linear(attn.v_proj, group_size=32, bits=8)
    q4 = nn.QuantizedLinear.from_linear(attn.v_proj, group_size=32, bits=4)
    assert concat_linears([q8, q4]) is None
    assert fuse_projections(model) == 4
    assert not is_fused(attn) and is_fused(model.model.layers[0].mlp) and is_fused(model.model.layers[1].self_attn)


@pytest.mark.parametrize("fuse", [True, False])
def test_serving_model_fuses_unless_turned_off(monkeypatch: pytest.MonkeyPatch, fuse: bool) -> None:
    import engine.model.loader

    model = build_target(target_config("qwen3"))
    loaded = engine.model.loader.LoadedModel(model, None, "tiny", Path("."), 2048, "tiny qwen3")
    monkeypatch.setattr(engine.model.loader, "load_model", lambda spec, dequantize=None, group=None, quant_kernel=None: loaded)
    serving = ServingModel.load(EngineConfig(model="tiny", draft="none", fuse_projections=fuse))
    assert serving.plain.model is model
    assert is_fused(model.model.layers[0].self_attn) == fuse


@pytest.fixture
def one_qk_norm() -> Iterator[None]:
    set_one_qk_norm(True)
    yield
    set_one_qk_norm(None)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_one_qk_norm_call_computes_the_two_norms(dtype: mx.Dtype) -> None:
    """QKNorm: one RMSNorm over every head of the packed projection, then each head's own weight, equals
    q_norm on the query heads and k_norm on the key heads (to the rounding after the norm)."""
    _, model = pair("qwen3", False)
    fuse_projections(model)
    model.set_dtype(dtype)
    attn = model.model.layers[0].self_attn
    attn.q_norm.weight = mx.random.uniform(0.5, 1.5, attn.q_norm.weight.shape, key=mx.random.key(1)).astype(dtype)
    qk_norm = qk_norm_of(attn)
    assert qk_norm is not None and qk_norm.weight.shape == (attn.n_heads + attn.n_kv_heads, attn.q_norm.weight.shape[0])
    heads = mx.random.normal((1, 5, attn.n_heads + 2 * attn.n_kv_heads, qk_norm.weight.shape[1]), key=mx.random.key(2))
    heads = heads.astype(dtype)
    got = qk_norm(heads)
    want = mx.concatenate([attn.q_norm(heads[:, :, : attn.n_heads]),
                           attn.k_norm(heads[:, :, attn.n_heads : attn.n_heads + attn.n_kv_heads])], axis=2)
    assert mx.allclose(got, want, rtol=1e-2 if dtype == mx.bfloat16 else 1e-6).item()
    assert not mx.allclose(got, mx.fast.rms_norm(heads, None, qk_norm.eps)[:, :, : got.shape[2]]).item()  # weights applied


def test_qk_norm_follows_the_norms_weights_and_skips_models_without_them() -> None:
    _, qwen3 = pair("qwen3", False)
    _, llama = pair("llama", False)
    fuse_projections(qwen3)
    fuse_projections(llama)
    assert qk_norm_of(llama.model.layers[0].self_attn) is None
    attn = qwen3.model.layers[0].self_attn
    first = qk_norm_of(attn)
    assert qk_norm_of(attn, first) is first  # built from the current weights: kept
    qwen3.set_dtype(mx.bfloat16)  # a cast after loading replaces the weights
    again = qk_norm_of(attn, first)
    assert again is not first and again is not None and again.weight.dtype == mx.bfloat16


@pytest.mark.usefixtures("one_qk_norm")
def test_compiled_layers_and_greedy_dflash_through_one_qk_norm() -> None:
    """Compiled qwen3 layers through QKNorm compute mlx-lm's logits, and speculative greedy with the packed draft
    through it equals mlx-lm's plain greedy."""
    config = target_config("qwen3")
    model, reference = build_target(config, seed=1), build_target(config, seed=1)
    for m in (model, reference):
        random_qk_norms(m.model.layers)
    fuse_projections(model)  # as a GPU prepares it (the CPU swaps its norms for compiled ones: no QKNorm there)
    assert compile_layers(model) == config["num_hidden_layers"]
    assert_same_cached_logits(reference, model, PROMPT)  # a prompt, a decode step, a verify block
    draft = build_draft(draft_config(config, block_size=8), seed=2)
    assert pack_draft(draft) > 0
    got = speculative_greedy(model, draft, PROMPT, 24)
    want, gap = plain_greedy(reference, PROMPT, 24)
    assert got[:24] == want[: len(got[:24])], gap
