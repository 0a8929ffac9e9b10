"""Decoder layers whose work around attention runs as two compiled graphs, for decode steps and blocks.

MLX builds a forward's graph in Python before it launches anything: ~65 us a Qwen3 decoder layer (the input
norm, the packed projection and its split, per-head norms, RoPE: ~20 ops through nn.Module calls) and
~15 us for the MLP and residuals, so ~4 ms of a 36-layer Qwen3-8B-shape forward on a 2-core Xeon, where
an H100 runs that forward in ~12 ms of wall time and ~7 ms of device time. Under `mx.compile` a layer's
graphs are traced once per row count and replayed from C++: before attention (input norm, Q/K/V, per-head
norms, RoPE at an offset array) and after it (o_proj, the residuals, the MLP). The KV cache update and the
attention stay eager: the cache's slices move every step, and attention picks its kernel per key length.
Only decode steps and query blocks (rows <= MAX_ROWS) over a plain KVCache with a causal or no mask take
the graphs; prefill chunks, tree verifies, batched steps and sliding windows run the layer's own forward.
A trace freezes the routes its ops read while tracing (which kernel a row count takes, the CPU kernel's
ops): whatever switches a route bumps engine/backend/route_epoch.py (the CPU kernel's setters do; a tool
that pauses GPU kernels calls invalidate()), and older traces are traced again. `DFLASH_COMPILE_LAYERS=0`
turns this off at load.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.cache import KVCache

from engine.backend import route_epoch
from engine.model.attention import MAX_BLOCK_ROWS
from engine.model.fused import attend, is_fused, one_qk_norm, project_out, project_qkv, qk_norm_of
from engine.model.rope_table import TableRoPE
from engine.model.target import inner_model

ENV = "DFLASH_COMPILE_LAYERS"
MAX_ROWS = MAX_BLOCK_ROWS
# forwards read: h = x + attn(input_norm(x)); out = h + mlp(post_norm(h))
_LAYER_CLASSES: tuple[type, ...] = (llama.TransformerBlock, qwen2.TransformerBlock, qwen3.TransformerBlock)
_COMPILED_CLASSES: dict[type, type] = {}

_enabled = True
_offset: tuple[int, mx.array] | None = None  # the last offset as an array: one for all layers of a forward


def invalidate() -> None:
    """Drop every compiled layer's traces (a kernel route changed); they are traced again at the next call."""
    route_epoch.changed()


def set_enabled(on: bool) -> None:
    """Run compiled layers' graphs (True) or their own forwards (False), e.g. to A/B them in one process."""
    global _enabled
    _enabled = on


def is_enabled() -> bool:
    return _enabled


def enabled_by_env(environ: Any = os.environ) -> bool:
    return environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def compile_layers(model: nn.Module) -> int:
    """Swap every recognised decoder layer (exact class, packed attention and MLP) for its compiled form,
    in place; returns how many. Call it last: after fusing and every layer swap."""
    swapped = 0
    for layer in inner_model(model).layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(layer) not in _LAYER_CLASSES or attn is None or not is_fused(attn) or mlp is None or not is_fused(mlp):
            continue
        layer._dflash_graphs = layer._dflash_spare = None
        layer.__class__ = _compiled_class(type(layer))
        swapped += 1
    return swapped


def is_compiled(layer: nn.Module) -> bool:
    return type(layer) in _COMPILED_CLASSES.values()


class _Graphs:
    """One layer's two compiled graphs, traced for the routes of one epoch."""

    def __init__(self, layer: nn.Module, one_norm: bool) -> None:
        attn = layer.self_attn
        self.epoch = route_epoch.current()
        self.one_norm = one_norm
        # the CPU's table RoPE reads its rows at an int offset: they come in as inputs (the table grows)
        self.table = isinstance(attn.rope, TableRoPE)
        qk_norm = qk_norm_of(attn) if one_norm else None  # fused.QKNorm: fewer launches on GPUs

        def before(x: mx.array, offset: mx.array, *rows: mx.array) -> tuple[mx.array, mx.array, mx.array]:
            if self.table:
                return project_qkv(attn, layer.input_layernorm(x), lambda t: attn.rope.rotate_with(t, offset, *rows),
                                   qk_norm)
            return project_qkv(attn, layer.input_layernorm(x), lambda t: attn.rope(t, offset=offset), qk_norm)

        def after(x: mx.array, attended: mx.array) -> mx.array:
            h = x + project_out(attn, attended)
            return h + layer.mlp(layer.post_attention_layernorm(h))

        self.before, self.after = mx.compile(before), mx.compile(after)

    def runs(self, one_norm: bool) -> bool:
        """Whether these graphs are what the layer runs now: traced in this epoch, for this QKNorm route."""
        return self.epoch == route_epoch.current() and self.one_norm == one_norm


def _switch_graphs(layer: nn.Module, one_norm: bool) -> _Graphs:
    """The layer's graphs for a new epoch or QKNorm route. The other route's are kept as a spare, so that an A/B
    switching the route call by call (bench/regime.py --qknorm-ab) traces each route once, not at every call."""
    spare: _Graphs | None = getattr(layer, "_dflash_spare", None)
    graphs = spare if spare is not None and spare.runs(one_norm) else _Graphs(layer, one_norm)
    current: _Graphs | None = layer._dflash_graphs
    # graphs of an older epoch are never run again: not kept
    layer._dflash_spare = current if current is not None and current.epoch == route_epoch.current() else None
    layer._dflash_graphs = graphs
    return graphs


def _offset_array(offset: int) -> mx.array:
    global _offset
    if _offset is None or _offset[0] != offset:
        _offset = (offset, mx.array(offset, dtype=mx.int32))
    return _offset[1]


def _takes_graphs(layer: nn.Module, x: mx.array, mask: Any, cache: Any) -> bool:
    if not _enabled or type(cache) is not KVCache or x.shape[1] > MAX_ROWS:
        return False
    if mask is not None and not isinstance(mask, str):  # an array mask: a window or a batch's padding
        return False
    tree = getattr(layer.self_attn, "_dflash_tree", None)  # engine/model/tree_attention.py
    return tree is None or tree.rows is None


def _compiled_class(cls: type) -> type:
    if cls not in _COMPILED_CLASSES:

        def __call__(self: nn.Module, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
            if not _takes_graphs(self, x, mask, cache):
                return cls.__call__(self, x, mask, cache)
            graphs, one_norm = self._dflash_graphs, one_qk_norm()
            if graphs is None or not graphs.runs(one_norm):
                graphs = _switch_graphs(self, one_norm)
            attn = self.self_attn
            rows = attn.rope.rows(cache.offset, x.shape[1]) if graphs.table else ()
            queries, keys, values = graphs.before(x, _offset_array(cache.offset), *rows)
            return graphs.after(x, attend(attn, queries, keys, values, mask, cache))

        name = f"Compiled{cls.__name__}"
        _COMPILED_CLASSES[cls] = type(name, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _COMPILED_CLASSES[cls]
