"""engine/model/compiled_norm.py: the compiled RMSNorm equals MLX's, and the swap takes exact types only."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import build_target, target_config

from engine.model import compiled_norm
from engine.model.compiled_norm import CompiledRMSNorm, compile_norms


def _graph_nodes(out: mx.array, tmp_path: Path) -> list[str]:
    """The op names of the (unevaluated) graph that computes `out`."""
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), out)
    return re.findall(r'label ="([^"]+)"', path.read_text())


def _norm(dims: int) -> nn.RMSNorm:
    norm = nn.RMSNorm(dims, eps=1e-5)
    norm.weight = mx.random.normal((dims,), key=mx.random.key(dims))
    return norm


def test_small_float32_inputs_take_the_compiled_formula(tmp_path: Path) -> None:
    norm = _norm(576)
    x = mx.random.normal((1, 4, 576), key=mx.random.key(1)) * 3
    mx.eval(x, norm.weight)
    want = norm(x)
    mlx_nodes = _graph_nodes(want, tmp_path)
    assert compile_norms(norm) == 1 and type(norm) is CompiledRMSNorm
    got = norm(x)
    nodes = _graph_nodes(got, tmp_path)  # the point: fewer graph nodes, each ~5 us on the CPU backend
    assert any(n.startswith("Compiled") for n in nodes)
    assert "NumberOfElements" not in nodes  # 1/n is a cached input, not a node of every call
    if mx.default_device() == mx.cpu:  # where mx.fast.rms_norm falls back to eleven plain ops
        assert len(nodes) < len(mlx_nodes) / 2, (nodes, mlx_nodes)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-6, atol=2e-6)


def test_large_and_half_inputs_keep_mlx_ops() -> None:
    norm = _norm(576)
    compile_norms(norm)
    rows = compiled_norm.MAX_ELEMENTS // 576 + 1  # just over the bound
    x = mx.random.normal((1, rows, 576), key=mx.random.key(2))
    assert mx.array_equal(norm(x), mx.fast.rms_norm(x, norm.weight, norm.eps))
    half = x[:, :2].astype(mx.bfloat16)
    assert mx.array_equal(norm(half), mx.fast.rms_norm(half, norm.weight, norm.eps))


def test_swap_takes_exact_types_and_keeps_the_model() -> None:
    class Custom(nn.RMSNorm):
        pass

    holder = nn.Module()
    holder.plain, holder.custom = _norm(64), Custom(64)
    assert compile_norms(holder) == 1
    assert type(holder.plain) is CompiledRMSNorm and type(holder.custom) is Custom

    model = build_target(target_config("qwen3"), seed=3)  # input, post-attention, q/k norms and the final one
    names = [k for k, _ in tree_flatten(model.parameters())]
    ids = mx.array([[3, 14, 15, 9, 26, 5, 35, 8]])
    want = model(ids, cache=make_prompt_cache(model))
    swapped = compile_norms(model)
    assert swapped == sum(isinstance(m, CompiledRMSNorm) for _, m in model.named_modules()) > 4
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    got = model(ids, cache=make_prompt_cache(model))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    assert compile_norms(model) == 0  # idempotent
