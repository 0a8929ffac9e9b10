"""engine/model/rope_table.py: table RoPE rotates as nn.RoPE does, more exactly, and decoding is unchanged."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import (
    assert_same_cached_logits,
    build_draft,
    build_target,
    draft_config,
    speculative_greedy,
    target_config,
)

from engine.model.fused import fuse_projections
from engine.model.rope_table import TableRoPE, positions_below, use_table_rope

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]


def exact_rope(x: mx.array, offset: int, traditional: bool, base: float, scale: float = 1.0) -> np.ndarray:
    """float64 RoPE of x (…, L, D) at positions offset..offset+L−1."""
    v = np.array(x, dtype=np.float64)
    dims, rows = v.shape[-1], v.shape[-2]
    angles = (np.arange(offset, offset + rows) * scale)[:, None] * base ** (-np.arange(0, dims, 2) / dims)
    cos, sin = np.cos(angles), np.sin(angles)
    if traditional:
        x0, x1 = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out
    x0, x1 = v[..., : dims // 2], v[..., dims // 2 :]
    return np.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("shape, offset", [((1, 9, 1, 64), 0), ((1, 3, 16, 64), 300), ((2, 4, 7, 64), 5000), ((1, 2, 3, 64), 9000)])
def test_rotation_is_exact_to_float32(traditional: bool, shape: tuple[int, ...], offset: int) -> None:
    rope = nn.RoPE(64, traditional=traditional, base=1e5, scale=0.5 if offset == 9000 else 1.0)
    x = mx.random.normal(shape, key=mx.random.key(offset))
    want = exact_rope(x, offset, traditional, 1e5, rope.scale)
    got = np.array(TableRoPE(rope)(x, offset=offset))
    assert np.abs(got - want).max() < 2e-6  # 9000 also grows the table past its first 4096 rows
    if offset == 5000:  # MLX's own float32 angles are this far off here: the table path was taken
        assert np.abs(np.array(rope(x, offset=offset)) - want).max() > 1e-4


def test_other_calls_go_to_mlx() -> None:
    rope = nn.RoPE(16, traditional=False, base=1e4)
    table = TableRoPE(rope)
    x = mx.random.normal((1, 2, 4, 16))
    offsets = mx.array(7)
    assert mx.array_equal(table(x, offset=offsets), rope(x, offset=offsets)).item()  # array offsets
    half = x.astype(mx.bfloat16)
    assert mx.array_equal(table(half, offset=3), rope(half, offset=3)).item()  # not float32
    partial = nn.RoPE(8, traditional=True, base=1e4)  # rotates only the first 8 of 16 features
    assert mx.array_equal(TableRoPE(partial)(x, offset=3), partial(x, offset=3)).item()


@pytest.mark.parametrize("traditional", [True, False])
def test_a_batch_of_offsets_reads_each_rows_table_rows(traditional: bool) -> None:
    """Inside positions_below(), per-row array offsets (a BatchKVCache's) rotate each row exactly as a lone
    row at its int offset does (engine/decode/batch.py relies on it); outside, they go to mx.fast.rope."""
    rope = nn.RoPE(64, traditional=traditional, base=1e4)
    table = TableRoPE(rope)
    x = mx.random.normal((3, 5, 2, 64), key=mx.random.key(1))
    offsets = [0, 4700, 37]  # past the table's first 4096 rows: positions_below grows it
    with positions_below(4702):
        batched = table(x, offset=mx.array(offsets))
    rows = mx.concatenate([table(x[i : i + 1], offset=o) for i, o in enumerate(offsets)])
    assert mx.array_equal(batched, rows).item()
    assert mx.array_equal(table(x, offset=mx.array(offsets)), rope(x, offset=mx.array(offsets))).item()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_swapped_model_gives_the_same_logits(family: str) -> None:
    config = target_config(family)
    plain, swapped = build_target(config, seed=2), build_target(config, seed=2)
    fuse_projections(plain), fuse_projections(swapped)  # the fused attention ropes q and k heads in one call
    before = dict(tree_flatten(swapped.parameters()))
    assert use_table_rope(swapped) == config["num_hidden_layers"]
    assert dict(tree_flatten(swapped.parameters())).keys() == before.keys()  # the table is no parameter
    assert isinstance(swapped.model.layers[0].self_attn.rope, TableRoPE)
    assert_same_cached_logits(plain, swapped, PROMPT)
    assert use_table_rope(swapped) == 0  # idempotent


def test_greedy_speculative_decoding_still_equals_plain() -> None:
    config = target_config("qwen3")
    plain, swapped = build_target(config, seed=2), build_target(config, seed=2)
    use_table_rope(swapped)
    draft = build_draft(draft_config(config), seed=3)
    want = speculative_greedy(plain, draft, PROMPT, 24)
    assert use_table_rope(draft) == 1  # the draft's one rope, as load_draft swaps it on the CPU
    got = speculative_greedy(swapped, draft, PROMPT, 24)
    assert got == want and len(want) == 24


@pytest.mark.parametrize("traditional", [True, False])
def test_layers_at_one_offset_share_the_tables_rows(traditional: bool, tmp_path) -> None:
    """Every layer of a forward reads the same table rows: one pair of slices in the graph, and each
    rotation is a gather of the partner features plus one kernel (graph nodes cost ~5 us each on the CPU)."""
    rope = nn.RoPE(64, traditional=traditional, base=1e4)
    layers = [TableRoPE(rope) for _ in range(3)]
    x = mx.random.normal((1, 4, 1, 64), key=mx.random.key(2))
    mx.eval(x)
    outs = [layer(x * (i + 1), offset=123) for i, layer in enumerate(layers)]
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), *outs)
    nodes = re.findall(r'label ="([^"]+)"', path.read_text())
    assert nodes.count("Slice") == 2 and "Concatenate" not in nodes, nodes
    for i, out in enumerate(outs):
        assert np.abs(np.array(out) - exact_rope(x * (i + 1), 123, traditional, 1e4)).max() < 2e-6
