"""Tree rows in a target forward: per-row positions and an ancestor mask for mlx-lm attention modules.

mlx-lm attention modules rotate queries and keys at the scalar `cache.offset` and take the mask the
model builds ("causal" for a block). A tree verify (engine/decode/tree.py) needs row i at position
P + depth(i), attending to the committed rows, its ancestors and itself. As Target's taps do, this
swaps classes on module instances, so the model's own forward runs unchanged: each attention
module's class for a subclass that passes the tree mask instead of the model's while a tree forward
is under way, and its `rope`'s class for one that rotates at the rows' positions. Outside a tree
forward both call the original. The array mask sends every attention path to its masked form: the
explicit composition on the CPU, mx.fast's masked attention on Metal; on CUDA the packed attention
(engine/model/fused.py) takes the block-attention kernel's tree variant, which reads the rows' ancestor
bit sets (TreeRows.bits) instead of the mask, and the mask is never computed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn


class TreeRows(NamedTuple):
    positions: mx.array  # (T,) int32: each verify row's sequence position (P + depth)
    mask: mx.array  # (1, 1, T, P + T) bool: True where a row may attend
    end: int  # the largest position + 1 (a bound for position tables)
    bits: mx.array | None = None  # (T, 4) uint32: each row's ancestors as bits (engine/model/attention.tree_bits)


class _TreeSlot:
    """The rows of the tree forward under way (None outside one), shared by a model's attention modules."""

    def __init__(self) -> None:
        self.rows: TreeRows | None = None
        self.users = 0
        self.classes: list[tuple[nn.Module, type]] = []  # swapped modules and their original classes


_SWAPPED: dict[tuple[type, str], type] = {}


def unsupported_reason(layers: list[nn.Module]) -> str | None:
    """Why the tree swaps cannot cover these decoder layers, or None."""
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not isinstance(getattr(attn, "rope", None), nn.Module):
            return f"layer {i} has no self_attn with a rope module (a recurrent or unfamiliar layer)"
    return None


def install(layers: list[nn.Module]) -> _TreeSlot:
    """Swap every layer's attention and rope classes (once per model); returns the shared slot."""
    first = layers[0].self_attn
    slot = first.__dict__.get("_dflash_tree")
    if slot is None:
        slot = _TreeSlot()
        for layer in layers:
            attn, rope = layer.self_attn, layer.self_attn.rope
            for module, kind in ((attn, "attention"), (rope, "rope")):
                module._dflash_tree = slot
                slot.classes.append((module, type(module)))
                module.__class__ = _swapped_class(type(module), kind)
    slot.users += 1
    return slot


def remove(slot: _TreeSlot) -> None:
    slot.users -= 1
    if slot.users == 0:
        for module, cls in slot.classes:
            module.__class__ = cls
            del module.__dict__["_dflash_tree"]
        slot.classes = []


def _swapped_class(cls: type, kind: str) -> type:
    if (cls, kind) not in _SWAPPED:
        call = _attention_call(cls) if kind == "attention" else _rope_call(cls)
        name = f"Tree{cls.__name__}"
        _SWAPPED[(cls, kind)] = type(name, (cls,), {"__call__": call, "__module__": cls.__module__})
    return _SWAPPED[(cls, kind)]


def _attention_call(cls: type) -> Any:
    def __call__(self: nn.Module, x: mx.array, mask: Any = None, cache: Any = None, *args: Any, **kwargs: Any) -> Any:
        rows = self._dflash_tree.rows
        return cls.__call__(self, x, mask if rows is None else rows.mask, cache, *args, **kwargs)

    return __call__


def _rope_call(cls: type) -> Any:
    def __call__(self: nn.Module, x: mx.array, offset: Any = 0, *args: Any, **kwargs: Any) -> mx.array:
        rows = self._dflash_tree.rows
        if rows is None:
            return cls.__call__(self, x, offset, *args, **kwargs)
        rotate_at = getattr(self, "rotate_at", None)  # engine/model/rope_table.py: a table gather
        if rotate_at is not None:
            return rotate_at(x, rows.positions, rows.end)
        return rotate_rows(lambda y, offsets: cls.__call__(self, y, offsets, *args, **kwargs), x, rows.positions)

    return __call__


def rotate_rows(rope: Any, x: mx.array, positions: mx.array) -> mx.array:
    """Rotate each row of x (1, H, T, D) at its own position with one call: rows go to the batch axis,
    where mx.fast.rope takes one offset per batch element."""
    assert x.shape[0] == 1, "tree rows are one sequence's"
    return rope(x.transpose(2, 1, 0, 3), positions).transpose(2, 1, 0, 3)  # (T, H, 1, D) and back
