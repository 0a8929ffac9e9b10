"""engine/model/transposed.py: transposed float matrices give the same logits, taps and greedy decoding."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
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
from engine.model.transposed import (
    TransposedEmbedding,
    TransposedLinear,
    transpose_linears,
    untransposed_parameters,
)

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]


def _pair(family: str, **overrides: object) -> tuple[nn.Module, nn.Module]:
    config = target_config(family, **overrides)
    return build_target(config, seed=2), build_target(config, seed=2)


def test_logits_equal_through_the_cache() -> None:
    plain, swapped = _pair("llama")  # tied embeddings: the LM head reads the transposed embedding
    fuse_projections(plain), fuse_projections(swapped)
    before = dict(tree_flatten(swapped.parameters()))
    assert transpose_linears(swapped) == 4 * 4 + 1  # qkv, o, gate_up, down per layer + the embedding
    assert isinstance(swapped.model.embed_tokens, TransposedEmbedding)
    assert isinstance(swapped.model.layers[0].mlp.gate_up_proj, TransposedLinear)
    after = dict(untransposed_parameters(swapped))
    assert after.keys() == before.keys() and all(mx.array_equal(after[k], before[k]) for k in before)
    assert_same_cached_logits(plain, swapped, PROMPT)
    assert transpose_linears(swapped) == 0  # idempotent


def test_untied_head_bias_and_quantized_layers() -> None:
    plain, swapped = _pair("qwen3", tie_word_embeddings=False)
    nn.quantize(plain.model.layers[1], group_size=32, bits=4)
    nn.quantize(swapped.model.layers[1], group_size=32, bits=4)
    swapped.model.layers[0].self_attn.q_proj = nn.Linear(*reversed(plain.model.layers[0].self_attn.q_proj.weight.shape), bias=True)
    plain.model.layers[0].self_attn.q_proj = swapped.model.layers[0].self_attn.q_proj
    transpose_linears(swapped)
    assert isinstance(swapped.lm_head, TransposedLinear)
    assert isinstance(swapped.model.layers[1].mlp.gate_proj, nn.QuantizedLinear)  # left alone
    assert "bias" in swapped.model.layers[0].self_attn.q_proj
    ids = mx.array([PROMPT])
    assert mx.allclose(plain(ids), swapped(ids), atol=1e-5, rtol=1e-5).item()


def test_greedy_speculative_decoding_still_equals_plain() -> None:
    plain, swapped = _pair("qwen3")
    transpose_linears(swapped)
    draft = build_draft(draft_config(target_config("qwen3")), seed=3)  # shared, transposed as load_draft does
    want = speculative_greedy(plain, draft, PROMPT, 24)
    transpose_linears(draft)
    got = speculative_greedy(swapped, draft, PROMPT, 24)
    assert got == want and len(want) == 24


def test_one_row_batches_take_one_matmul_node_and_follow_new_weights(tmp_path) -> None:
    """A batch of one multiplies against a (1, in, out) view: one graph node (a 2-D weight adds a Flatten
    and an Unflatten, ~5 us each on the CPU backend), the same product, and new weights are used."""
    linear = nn.Linear(24, 40, bias=False)
    swapped = TransposedLinear(linear)
    for shape in ((1, 1, 24), (1, 16, 24), (3, 5, 24), (7, 24)):
        x = mx.random.normal(shape, key=mx.random.key(shape[0]))
        assert mx.array_equal(swapped(x), x @ swapped.weight_t).item(), shape  # as the 2-D product rounds
        assert mx.allclose(swapped(x), linear(x), atol=1e-5).item()
    x = mx.random.normal((1, 4, 24))
    mx.eval(x, swapped.parameters())
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), swapped(x))
    assert re.findall(r'label ="([^"]+)"', path.read_text()) == ["Matmul"]
    fresh = nn.Linear(24, 40, bias=False)
    swapped.load_weights([("weight_t", mx.contiguous(fresh.weight.T))])
    assert mx.allclose(swapped(x), fresh(x), atol=1e-6).item()  # the view follows loaded weights
