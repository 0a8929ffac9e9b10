"""engine/model/packed_draft.py: a packed draft computes what the published layout computes, in a cycle's
forwards through the draft cache and in a training-style forward over positions and masks."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny_models import build_draft, build_draft2, close_to_scale, draft_config, random_qk_norms, target_config

from engine.model.draft import DFlashDraft
from engine.model.fused import QKNorm, set_one_qk_norm
from engine.model.packed_draft import PackedDraftAttention, is_packed, pack_draft, unpacked_parameters

TARGET = target_config("qwen3")
H = TARGET["hidden_size"]


def twins(dflash2: bool = False, **overrides: object) -> tuple[DFlashDraft, DFlashDraft]:
    config = draft_config(TARGET, **overrides)
    make = build_draft2 if dflash2 else build_draft
    published, packed = make(config, seed=4), make(config, seed=4)
    assert pack_draft(packed) == config.num_hidden_layers and is_packed(packed) and not is_packed(published)
    assert all(type(layer.self_attn) is PackedDraftAttention for layer in packed.layers)
    return published, packed


def assert_cycles_match(published: DFlashDraft, packed: DFlashDraft, new_rows: tuple[int, ...], block: int) -> None:
    """Cycles as the drafter runs them (new context rows, then the block after them): the same hidden states,
    and the cache keeps the context rows only (the block's are dropped again)."""
    caches = [published.make_cache(), packed.make_cache()]
    for cycle, n in enumerate(new_rows):
        context = mx.random.normal((1, n, 2 * H), key=mx.random.key(cycle))  # two taps
        noise = mx.random.normal((1, block, H), key=mx.random.key(10 + cycle))
        q_offset = caches[0][0].offset + n
        want = published(noise, published.project_context(context), cache=caches[0], q_offset=q_offset)
        got = packed(noise, packed.project_context(context), cache=caches[1], q_offset=q_offset)
        assert close_to_scale(got, want), cycle
        assert [c.offset for c in caches[1]] == [c.offset for c in caches[0]]


@pytest.mark.parametrize("dflash2", [False, True])
def test_cycles_through_the_cache_match_the_published_layout(dflash2: bool) -> None:
    assert_cycles_match(*twins(dflash2), (7, 1, 3), 5)


def test_a_sliding_window_layer_matches_the_published_layout() -> None:
    assert_cycles_match(*twins(layer_types=("sliding_attention", "full_attention"), sliding_window=4), (6, 2), 4)


def test_a_training_forward_over_positions_and_masks_matches() -> None:
    """No cache: context rows at their positions, blocks at theirs, a mask saying which keys each row sees
    (what engine/train/objective.py runs, and bench/width_replay.py on a loaded, packed draft)."""
    published, packed = twins()
    context = mx.random.normal((2, 9, H), key=mx.random.key(1))
    noise = mx.random.normal((2, 8, H), key=mx.random.key(2))
    q_offset = mx.array([3, 4, 5, 6, 6, 7, 8, 9])
    mask = mx.random.bernoulli(0.7, (2, 1, 8, 17), key=mx.random.key(3)) | (mx.arange(17) == 0)
    want = published(noise, context, q_offset=q_offset, mask=mask)
    got = packed(noise, context, q_offset=q_offset, mask=mask)
    assert close_to_scale(got, want)


def test_unpacked_parameters_are_the_published_ones() -> None:
    published, packed = twins()
    assert dict(unpacked_parameters(packed)).keys() == dict(tree_flatten(published.parameters())).keys()
    for name, value in unpacked_parameters(packed):
        assert mx.array_equal(value, dict(tree_flatten(published.parameters()))[name]).item(), name


@pytest.mark.parametrize("dflash2,overrides", [
    (False, {}), (True, {}), (False, {"layer_types": ("sliding_attention", "full_attention"), "sliding_window": 4})])
def test_cycles_through_one_qk_norm_match_the_published_layout(dflash2: bool, overrides: dict[str, object]) -> None:
    """fused.QKNorm (one norm call for the query and key heads, one RoPE call over the context's and the block's
    rows, as GPUs run the packed draft): the published layer's hidden states."""
    published, packed = twins(dflash2, **overrides)
    for draft in (published, packed):
        random_qk_norms(draft.layers)
    set_one_qk_norm(True)
    try:
        assert_cycles_match(published, packed, (7, 1, 3), 5)
        assert all(isinstance(layer.self_attn._qk_norm, QKNorm) for layer in packed.layers)  # the route ran
    finally:
        set_one_qk_norm(None)
