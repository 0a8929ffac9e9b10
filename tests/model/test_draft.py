"""The DFlash 1 draft: config, published checkpoint layout, and the training/inference API."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from tiny_models import (
    build_draft,
    build_target,
    draft_config,
    save_tiny_draft,
    target_config,
)

from engine.model.draft import (
    DFlashDraft,
    DraftConfig,
    build_target_layer_ids,
    load_draft,
    save_draft,
)
from engine.model.packed_draft import is_packed, unpacked_parameters
from engine.model.transposed import untransposed_parameters

TARGET = target_config("qwen3")
TARGET_SIZES = {"target_hidden_size": 64, "target_vocab_size": 96, "target_num_layers": 4}


def _published_keys(num_layers: int) -> set[str]:
    per_layer = [
        "input_layernorm.weight", "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"), "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    ]
    layers = {f"layers.{i}.{k}" for i in range(num_layers) for k in per_layer}
    return layers | {"fc.weight", "hidden_norm.weight", "norm.weight"}


@pytest.mark.parametrize(
    "layers, taps, want",
    [(36, 5, (1, 9, 17, 25, 33)), (64, 5, (1, 16, 31, 46, 61)), (52, 5, (1, 13, 25, 37, 49)),
     (48, 8, (1, 7, 14, 20, 26, 32, 39, 45)), (60, 6, (1, 12, 23, 35, 46, 57)), (36, 1, (18,))],
)
def test_tap_formula_matches_published_drafts(layers: int, taps: int, want: tuple[int, ...]) -> None:
    assert build_target_layer_ids(layers, taps) == want


def test_config_reads_dflash_config_first_then_top_level() -> None:
    raw = draft_config(TARGET).to_dict()
    raw["block_size"] = 8
    raw["dflash_config"]["block_size"] = 16
    del raw["dflash_config"]["target_layer_ids"]
    raw["num_target_layers"] = 36
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    del raw["rope_theta"]
    config = DraftConfig.from_dict(raw)
    assert config.block_size == 16
    assert config.target_layer_ids == (1, 33)  # formula with N = draft layers
    assert config.rope_theta == 1e6 and config.rope_scaling is None
    del raw["dflash_config"]["mask_token_id"]
    with pytest.raises(ValueError, match="mask_token_id"):
        DraftConfig.from_dict(raw)


def test_config_round_trips_through_the_published_layout() -> None:
    config = draft_config(
        TARGET, layer_types=("sliding_attention", "full_attention"), sliding_window=64,
        final_logit_softcapping=20.0, output_multiplier=0.5, input_embedding_scale=2.0, is_causal=False,
    )
    raw = config.to_dict()
    assert raw["architectures"] == ["DFlashDraftModel"] and raw["model_type"] == "qwen3"
    assert raw["dflash_config"]["mask_token_id"] == config.mask_token_id
    assert raw["dflash_config"]["target_layer_ids"] == list(config.target_layer_ids)
    assert DraftConfig.from_dict(json.loads(json.dumps(raw))) == config


def test_a_dflash2_architecture_needs_the_dflash2_keys() -> None:
    """DFlash 2 drafts load (tests/model/test_dflash2.py); one without its conv/selector keys is refused."""
    raw = draft_config(TARGET).to_dict()
    raw["architectures"] = ["DFlash2DraftModel"]
    with pytest.raises(ValueError, match=r"DFlash 2 draft config.json is missing dflash_config\.conv_kernel_size"):
        DraftConfig.from_dict(raw)


def test_save_and_load_use_the_published_keys(tmp_path: Path) -> None:
    draft = build_draft(draft_config(TARGET), seed=1)
    save_tiny_draft(draft, tmp_path)
    assert set(mx.load(str(tmp_path / "model.safetensors"))) == _published_keys(2)
    loaded = load_draft(tmp_path, **TARGET_SIZES)
    # the loaded copy is packed (engine/model/packed_draft.py), and on the CPU stores its matrices transposed
    assert is_packed(loaded)
    published = dict(unpacked_parameters(loaded))
    assert set(published) == _published_keys(2)
    for k, a in tree_flatten(draft.parameters()):
        assert mx.array_equal(a, published[k]), k
    save_draft(loaded, tmp_path / "resaved", dtype=mx.float32)  # a loaded, packed draft saves the published layout
    assert set(mx.load(str(tmp_path / "resaved" / "model.safetensors"))) == _published_keys(2)
    save_draft(draft, tmp_path / "bf16")  # default dtype: what z-lab publishes
    assert mx.load(str(tmp_path / "bf16" / "model.safetensors"))["fc.weight"].dtype == mx.bfloat16
    on_cpu = mx.default_device() == mx.cpu  # where bf16 matmuls skip BLAS, drafts run in float32
    bf16 = load_draft(tmp_path / "bf16", **TARGET_SIZES)
    reloaded = dict(unpacked_parameters(bf16))
    assert reloaded["fc.weight"].dtype == (mx.float32 if on_cpu else mx.bfloat16)
    save_draft(loaded, tmp_path / "again", dtype=mx.float32)  # a loaded (transposed) draft saves as published
    assert set(mx.load(str(tmp_path / "again" / "model.safetensors"))) == _published_keys(2)


def _corrupt(path: Path, what: str) -> dict[str, int]:
    sizes = dict(TARGET_SIZES)
    weights = mx.load(str(path / "model.safetensors"))
    if what == "hidden":
        sizes["target_hidden_size"] = 32
    elif what == "mask_token_id":
        sizes["target_vocab_size"] = 50
    elif what == "target_layer_ids":
        sizes["target_num_layers"] = 2
    elif what == "missing":
        del weights["layers.1.mlp.up_proj.weight"]
    elif what == "unexpected":
        weights["layers.1.extra.weight"] = mx.zeros((2,))
    elif what in ("lm_head", "embed_tokens"):
        weights[f"{what}.weight"] = mx.zeros((96, 64))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return sizes


@pytest.mark.parametrize(
    "what, message",
    [("hidden", "hidden_size"), ("mask_token_id", "mask_token_id"), ("target_layer_ids", "target_layer_ids"),
     ("missing", "missing.*up_proj"), ("unexpected", "unexpected.*extra"), ("lm_head", "lm_head"),
     ("embed_tokens", "embed_tokens")],
)
def test_load_refuses_mismatches(tmp_path: Path, what: str, message: str) -> None:
    save_tiny_draft(build_draft(draft_config(TARGET)), tmp_path)
    sizes = _corrupt(tmp_path, what)
    with pytest.raises(ValueError, match=message):
        load_draft(tmp_path, **sizes)


def test_quantized_draft_round_trips(tmp_path: Path) -> None:
    draft = build_draft(draft_config(TARGET), seed=2)
    nn.quantize(draft, group_size=32, bits=8)
    save_draft(draft, tmp_path, dtype=mx.float32)
    loaded = load_draft(tmp_path, **TARGET_SIZES)
    noise, ctx = mx.random.normal((1, 4, 64), key=mx.random.key(0)), mx.random.normal((1, 6, 64), key=mx.random.key(1))
    want = draft(noise, ctx, q_offset=6)
    assert mx.allclose(loaded(noise, ctx, q_offset=6), want, atol=1e-5).item()


# --- one API for inference (cached, incremental) and training (all blocks at once) ------------

LAYOUTS = {
    "full": {},
    "sliding-causal": {"layer_types": ("sliding_attention", "full_attention"), "sliding_window": 5},
    "causal-override": {"is_causal": True},
}


def _inference(draft: DFlashDraft, ctx: mx.array, block: mx.array, anchor: int) -> mx.array:
    """Context rows 0..anchor-1 fed in two chunks (the first with a throwaway block)."""
    cache = draft.make_cache()
    half = anchor // 2
    draft(block, ctx[:, :half], cache=cache, q_offset=half)  # block K/V must not be cached
    return draft(block, ctx[:, half:anchor], cache=cache, q_offset=mx.array(anchor))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_call_equals_incremental_inference(layout: str) -> None:
    draft = build_draft(draft_config(TARGET, **LAYOUTS[layout]), seed=3)
    block_size, anchors, seq = 4, (5, 9), 12
    ctx = mx.random.normal((1, seq, 64), key=mx.random.key(4))  # projected context rows
    noise = mx.random.normal((1, len(anchors) * block_size, 64), key=mx.random.key(5))
    positions = mx.concatenate([p + mx.arange(block_size) for p in anchors])  # (N*B,)
    block_of = mx.repeat(mx.arange(len(anchors)), block_size)  # (N*B,)
    sees_ctx = mx.arange(seq)[None, :] < mx.array(anchors)[block_of][:, None]  # strictly before the anchor
    own_block = block_of[:, None] == block_of[None, :]
    mask = mx.concatenate([sees_ctx, own_block], axis=1)  # (N*B, S + N*B)
    trained = draft(noise, ctx, q_offset=positions, ctx_positions=mx.arange(seq), mask=mask)
    for j, anchor in enumerate(anchors):
        rows = slice(j * block_size, (j + 1) * block_size)
        inferred = _inference(draft, ctx, noise[:, rows], anchor)
        assert mx.allclose(trained[:, rows], inferred, atol=1e-5).item(), (layout, anchor)


def test_additive_masks_and_batches_work() -> None:
    draft = build_draft(draft_config(TARGET), seed=3)
    ctx = mx.random.normal((2, 6, 64), key=mx.random.key(6))
    noise = mx.random.normal((2, 4, 64), key=mx.random.key(7))
    visible = mx.concatenate([mx.broadcast_to(mx.arange(6) < 3, (4, 6)), mx.ones((4, 4), mx.bool_)], axis=1)[None, None]
    as_bool = draft(noise, ctx, q_offset=mx.arange(3, 7), mask=visible)
    as_add = draft(noise, ctx, q_offset=mx.arange(3, 7), mask=mx.where(visible, 0.0, -mx.inf))
    assert as_bool.shape == (2, 4, 64)
    assert mx.allclose(as_bool, as_add, atol=1e-6).item()
    first = _inference(draft, ctx[:1], noise[:1], 3)
    assert mx.allclose(as_bool[:1], first, atol=1e-5).item()


def test_gradients_reach_every_draft_weight() -> None:
    draft = build_draft(draft_config(TARGET), seed=4)
    head = nn.Linear(64, 96, bias=False)
    taps = mx.random.normal((2, 8, 128), key=mx.random.key(8))
    noise = mx.random.normal((2, 4, 64), key=mx.random.key(9))
    labels = mx.random.randint(0, 96, (2, 3), key=mx.random.key(10))
    mask = mx.concatenate([mx.broadcast_to(mx.arange(8) < 4, (4, 8)), mx.ones((4, 4), mx.bool_)], axis=1)

    def loss_fn(model: DFlashDraft) -> mx.array:
        hidden = model(noise, model.project_context(taps), q_offset=mx.arange(4, 8), mask=mask)
        return nn.losses.cross_entropy(model.logits(hidden[:, 1:], head), labels).mean()

    loss, grads = nn.value_and_grad(draft, loss_fn)(draft)
    assert mx.isfinite(loss).item()
    for name, g in tree_flatten(grads):
        assert mx.isfinite(g).all().item() and mx.abs(g).sum().item() > 0, name


def test_logits_apply_multiplier_then_softcap_in_float32() -> None:
    draft = build_draft(draft_config(TARGET, output_multiplier=0.5, final_logit_softcapping=2.0))
    head = lambda h: (h * 10).astype(mx.bfloat16)  # noqa: E731
    hidden = mx.random.normal((3, 64), key=mx.random.key(11))
    logits = draft.logits(hidden, head)
    assert logits.dtype == mx.float32
    raw = head(hidden).astype(mx.float32) * 0.5
    assert mx.allclose(logits, mx.tanh(raw / 2.0) * 2.0).item()
    assert mx.abs(logits).max().item() <= 2.0


def test_noise_embedding_uses_the_target_embedding_and_scale() -> None:
    model = build_target(TARGET)
    draft = build_draft(draft_config(TARGET, input_embedding_scale=3.0))
    ids = mx.array([[1, 95, 95]])
    want = model.model.embed_tokens(ids) * 3.0
    assert mx.allclose(draft.noise_embedding(ids, model.model.embed_tokens), want).item()
