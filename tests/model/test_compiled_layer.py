"""Compiled decoder layers: the same logits and taps as the layers' own forwards through a cache (decode rows,
verify blocks, a RoPE table that grows mid-decode), the forwards that keep the layer's own path, retracing
after invalidate(), the switch at load, and greedy DFlash through them."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from tiny_models import build_draft, build_target, draft_config, target_config

from engine.backend import fast_exp, route_epoch
from engine.decode.drafters import DFlashDrafter
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.sampling import SamplingParams, TokenRng
from engine.decode.speculative import SpeculativeDecoder
from engine.model import compiled_layer, fused
from engine.model.compiled_layer import compile_layers, is_compiled
from engine.model.fused import fuse_projections
from engine.model.rope_table import use_table_rope
from engine.model.target import Target, inner_model
from engine.runtime.serving_model import prepare_model

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]
GREEDY = SamplingParams(temperature=0.0)


def twins(family: str, quantized: bool = False, table: bool = False) -> tuple[nn.Module, nn.Module]:
    """Two identical packed tiny models, the second with compiled layers."""
    models = build_target(target_config(family), seed=1), build_target(target_config(family), seed=1)
    for model in models:
        if quantized:
            nn.quantize(model, group_size=32, bits=4)
        fuse_projections(model)
        if table:
            use_table_rope(model)
    assert compile_layers(models[1]) == 4
    return models


def same_through_caches(eager: nn.Module, compiled: nn.Module, chunks: list[mx.array]) -> None:
    caches = make_prompt_cache(eager), make_prompt_cache(compiled)
    for chunk in chunks:
        want, got = eager(chunk, cache=caches[0]), compiled(chunk, cache=caches[1])
        assert mx.array_equal(want, got).item(), mx.abs(want - got).max().item()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("quantized", [False, True])
def test_compiled_layers_compute_what_their_own_forwards_do(family: str, quantized: bool) -> None:
    eager, compiled = twins(family, quantized)
    ids = mx.array([PROMPT])
    same_through_caches(eager, compiled, [ids, ids[:, :1], ids[:, 2:6], ids[:, :16], ids[:, 5:6]])
    assert all(layer._dflash_graphs is not None for layer in inner_model(compiled).layers)  # they ran


def test_the_table_rope_grows_under_compiled_layers() -> None:
    """The CPU's RoPE table starts at 4,096 positions: decode steps across that edge read the grown table."""
    eager, compiled = twins("llama", table=True)
    prefill = mx.array([[(7 * i) % 90 + 3 for i in range(4090)]])
    steps = [mx.array([[t]]) for t in PROMPT[:12]]
    same_through_caches(eager, compiled, [prefill[:, :2048], prefill[:, 2048:], *steps, mx.array([PROMPT])])


def test_taps_are_the_same_through_compiled_layers() -> None:
    eager, compiled = twins("qwen3")
    layer_ids = [1, 3]
    outs = []
    for model in (eager, compiled):
        target = Target(model, layer_ids)
        cache = target.make_cache()
        target(mx.array([PROMPT]), cache, taps=True)
        outs.append(target(mx.array([PROMPT[:8]]), cache, taps=True))
        target.close()
    assert mx.array_equal(outs[0][0], outs[1][0]).item() and mx.array_equal(outs[0][1], outs[1][1]).item()


def test_the_qk_norm_switch_traces_each_route_once() -> None:
    """fused.set_one_qk_norm: a compiled layer traces again where the route it runs changes, not at every
    switch, and keeps the other route's graphs (bench/regime.py --qknorm-ab alternates the routes call by call)."""
    _, compiled = twins("qwen3")
    layer = inner_model(compiled).layers[0]
    cache = make_prompt_cache(compiled)

    def graphs_after_a_step() -> object:
        compiled(mx.array([PROMPT[:1]]), cache=cache)
        return layer._dflash_graphs

    default = fused.one_qk_norm()  # off on the CPU, on on GPUs
    try:
        first = graphs_after_a_step()
        assert first is not None and first.one_norm is default
        fused.set_one_qk_norm(default)
        assert graphs_after_a_step() is first  # the same route: kept
        fused.set_one_qk_norm(not default)
        second = graphs_after_a_step()
        assert second is not first and second.one_norm is (not default)
        fused.set_one_qk_norm(None)
        assert graphs_after_a_step() is first  # back to the first route: its graphs, not a new trace
        fused.set_one_qk_norm(not default)
        assert graphs_after_a_step() is second
        compiled_layer.invalidate()  # a new epoch: neither is current any more
        fresh = graphs_after_a_step()
        assert fresh is not second and fresh is not first and fresh.one_norm is (not default)
        fused.set_one_qk_norm(None)
        assert graphs_after_a_step() is not first  # the spare was traced in the old epoch
    finally:
        fused.set_one_qk_norm(None)


def test_only_steps_and_blocks_over_a_plain_cache_take_the_graphs() -> None:
    _, compiled = twins("qwen3")
    layer = inner_model(compiled).layers[0]
    x = mx.zeros((1, 16, 64))
    assert compiled_layer._takes_graphs(layer, x, "causal", KVCache())
    assert compiled_layer._takes_graphs(layer, x[:, :1], None, KVCache())
    assert not compiled_layer._takes_graphs(layer, mx.zeros((1, 65, 64)), "causal", KVCache())  # a prefill chunk
    assert not compiled_layer._takes_graphs(layer, x, mx.ones((16, 16), dtype=mx.bool_), KVCache())  # a window
    assert not compiled_layer._takes_graphs(layer, x[:, :1], None, BatchKVCache([0]))  # a batched step
    assert not compiled_layer._takes_graphs(layer, x, "causal", None)
    compiled_layer.set_enabled(False)
    try:
        assert not compiled_layer._takes_graphs(layer, x, "causal", KVCache())
    finally:
        compiled_layer.set_enabled(True)


def test_a_long_prefill_runs_the_layers_own_forward() -> None:
    _, compiled = twins("llama")
    compiled(mx.array([[5] * 100]), cache=make_prompt_cache(compiled))
    assert all(layer._dflash_graphs is None for layer in inner_model(compiled).layers)


def test_invalidate_traces_the_graphs_again() -> None:
    _, compiled = twins("llama")
    cache = make_prompt_cache(compiled)
    compiled(mx.array([PROMPT]), cache=cache)
    first = [layer._dflash_graphs for layer in inner_model(compiled).layers]
    compiled_layer.invalidate()
    compiled(mx.array([PROMPT[:2]]), cache=cache)
    again = [layer._dflash_graphs for layer in inner_model(compiled).layers]
    assert all(a is not b and b.epoch == route_epoch.current() for a, b in zip(first, again))


def test_switching_a_cpu_kernel_route_traces_the_graphs_again() -> None:
    _, compiled = twins("llama")
    cache = make_prompt_cache(compiled)
    compiled(mx.array([PROMPT]), cache=cache)
    first = [layer._dflash_graphs for layer in inner_model(compiled).layers]
    fast_exp.use_cpu_kernel(fast_exp._cpu_kernel)  # the same route, set again: still a switch
    compiled(mx.array([PROMPT[:2]]), cache=cache)
    assert all(a is not layer._dflash_graphs for a, layer in zip(first, inner_model(compiled).layers))


@pytest.mark.parametrize("setting,expected", [("1", 4), ("0", 0)])
def test_prepare_model_compiles_layers_unless_switched_off(setting: str, expected: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled_layer.ENV, setting)
    model = build_target(target_config("qwen3"), seed=1)
    notes = prepare_model(model, fuse=True)
    assert sum(is_compiled(layer) for layer in inner_model(model).layers) == expected
    assert ("4 decoder layers compiled" in notes) == bool(expected)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_dflash_through_compiled_layers_equals_plain(family: str) -> None:
    cfg = target_config(family, tie_word_embeddings=False)
    model = build_target(cfg, seed=1)
    prepare_model(model, fuse=True)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    try:
        plain = [t for s in PlainDecoder(model).generate(PROMPT, GREEDY, 40, TokenRng(0)) for t in s.tokens]
        decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=8)
        spec = [t for s in decoder.generate(PROMPT, GREEDY, 40, TokenRng(0)) for t in s.tokens]
    finally:
        target.close()
    assert spec == plain
    assert all(layer._dflash_graphs is not None for layer in inner_model(model).layers)
