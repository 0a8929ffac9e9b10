"""An mlx-lm model bound as a DFlash target: logits plus the hidden states of chosen layers.

Taps are recorded by swapping each tapped decoder layer's class for a subclass whose
`__call__` stores its output. The model's own forward (masks, sliding windows, per-family
quirks) runs unchanged, parameter paths stay the same, and nothing of mlx-lm is forked.
Hybrid targets' Gated DeltaNet layers are hooked the same way and get caches that roll back
by recomputing the accepted steps of the last verify (engine/model/recurrent_rollback.py), so
`trim` covers them; trimming 0 rows (every draft accepted) recomputes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    KVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from engine.model import attention, tree_attention
from engine.model.recurrent_rollback import (
    install_recorders,
    recurrent_layer_ids,
    remove_recorders,
    wrap_caches,
)
from engine.model.split_head import SplitHead, output_head
from engine.model.tree_attention import TreeRows

_TAPPED_CLASSES: dict[type, type] = {}


class _TapSlot:
    """The last output of one tapped layer, shared by every Target bound to that layer."""

    def __init__(self, original_class: type) -> None:
        self.original_class = original_class
        self.value: mx.array | None = None
        self.users = 0


def _tapped_class(cls: type) -> type:
    if cls not in _TAPPED_CLASSES:

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            out = cls.__call__(self, *args, **kwargs)
            self._dflash_tap.value = out[0] if isinstance(out, tuple) else out
            return out

        name = f"Tapped{cls.__name__}"
        _TAPPED_CLASSES[cls] = type(name, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _TAPPED_CLASSES[cls]


def _install_tap(layer: nn.Module) -> _TapSlot:
    slot = layer.__dict__.get("_dflash_tap")
    if slot is None:
        slot = _TapSlot(type(layer))
        layer._dflash_tap = slot
        layer.__class__ = _tapped_class(type(layer))
    slot.users += 1
    return slot


def _remove_tap(layer: nn.Module) -> None:
    slot: _TapSlot = layer.__dict__["_dflash_tap"]
    slot.users -= 1
    if slot.users == 0:
        layer.__class__ = slot.original_class
        del layer.__dict__["_dflash_tap"]


def inner_model(model: nn.Module) -> nn.Module:
    """The module holding `embed_tokens` and `layers` (llama, qwen2/3, gemma, … and VLM wrappers)."""
    for path in (("model",), ("language_model", "model"), ()):
        inner = model
        for name in path:
            inner = getattr(inner, name, None)
        if inner is not None and hasattr(inner, "embed_tokens") and hasattr(inner, "layers"):
            return inner
    raise ValueError(
        f"{type(model).__name__} has no model.embed_tokens / model.layers; only mlx-lm decoder "
        "models with that layout can be DFlash targets"
    )


class Target:
    """Wraps an mlx-lm model: `__call__` returns logits and, optionally, the tapped hidden states."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[int] = ()) -> None:
        self.model = model
        inner = inner_model(model)
        self.layers: list[nn.Module] = inner.layers
        # Gated DeltaNet layers (qwen3_5, qwen3_next) roll back by recomputing accepted steps
        self._recurrent_ids = recurrent_layer_ids(self.layers)
        if not can_trim_prompt_cache(wrap_caches(make_prompt_cache(model), self._recurrent_ids)):
            raise ValueError(
                "speculative decoding needs a trimmable target cache; hybrid/recurrent targets other "
                "than Gated DeltaNet ones (qwen3_5, qwen3_next), e.g. Mamba layers, are not supported yet"
            )
        if bad := [i for i in layer_ids if not 0 <= i < len(self.layers)]:
            raise ValueError(f"tap layer ids {bad} are out of range for a {len(self.layers)}-layer target")
        self.layer_ids = tuple(layer_ids)
        self._embed_tokens = inner.embed_tokens
        # gemma-style targets scale their embedding; REF-MLX reads the same attribute
        self.embed_scale = float(getattr(inner.embed_tokens, "embed_scale", getattr(inner, "embed_scale", 1.0)))
        self._lm_head = output_head(model, inner)
        self._split = SplitHead.probe(model)  # before the taps and recorders: a plain forward
        self._slots = [_install_tap(self.layers[i]) for i in self.layer_ids]
        install_recorders(self.layers, self._recurrent_ids)
        self._tree: tree_attention._TreeSlot | None = None  # installed by enable_trees()

    @property
    def has_recurrent_layers(self) -> bool:
        return bool(self._recurrent_ids)

    def tree_support(self) -> str | None:
        """None when verify forwards can take tree rows (positions and an ancestor mask), else why not.

        Recurrent layers advance their state in row order, which a mask cannot split into branches,
        and rotating or quantized KV caches cannot gather an accepted path's rows: those stay on chains.
        """
        if self._recurrent_ids:
            return "hybrid (recurrent) target: chains only"
        if kinds := sorted({type(c).__name__ for c in make_prompt_cache(self.model) if type(c) is not KVCache}):
            return f"{', '.join(kinds)} caches cannot keep a tree's path: chains only"
        return tree_attention.unsupported_reason(self.layers)

    def enable_trees(self) -> None:
        """Install the tree hooks on the attention modules (idempotent); see tree_support()."""
        if reason := self.tree_support():
            raise ValueError(reason)
        if self._tree is None:
            self._tree = tree_attention.install(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.embed(mx.array([0])).shape[-1])  # works for quantized embeddings too

    @property
    def vocab_size(self) -> int:
        args = getattr(self.model, "args", None)
        return int(getattr(args, "vocab_size", 0) or self._embed_tokens.weight.shape[0])

    @property
    def splits_head(self) -> bool:
        """Whether `last=True` is available (engine/model/split_head.py)."""
        return self._split is not None

    def __call__(
        self, tokens: mx.array, cache: list[Any] | None, *, taps: bool, tree: TreeRows | None = None,
        last: bool = False,
    ) -> tuple[mx.array, mx.array | None]:
        """tokens (b, L) -> logits (b, L, V) and taps (b, L, T*H) in layer_ids order (spec §1.3).

        tree: the rows' positions and mask for a tree verify (engine/decode/tree.py); needs enable_trees().
        last: logits of the last row only, (b, 1, V) (a prefill's end); needs `splits_head`.
        """
        if taps and not self._slots:
            raise ValueError("this Target was built without layer_ids; pass the draft's target_layer_ids")
        if last:
            assert self._split is not None and tree is None, "last=True needs splits_head and no tree"
            logits = self._split.last_logits(tokens, cache)
        elif tree is None:
            logits = self.model(tokens, cache=cache)
        else:
            assert self._tree is not None, "enable_trees() first"
            self._tree.rows = tree
            try:
                if tree.bits is None:
                    logits = self.model(tokens, cache=cache)
                else:
                    with attention.tree_bits(tree.mask, tree.bits):
                        logits = self.model(tokens, cache=cache)
            finally:
                self._tree.rows = None
        hidden = None
        if taps:
            hidden = mx.concatenate([slot.value for slot in self._slots], axis=-1)
        for slot in self._slots:
            slot.value = None  # don't keep the activation alive past this call
        return logits, hidden

    def embed(self, ids: mx.array) -> mx.array:
        """(…) -> (…, H), scaled like the target's own input embedding."""
        h = self._embed_tokens(ids)
        return h * self.embed_scale if self.embed_scale != 1.0 else h

    def lm_head(self, hidden: mx.array) -> mx.array:
        return self._lm_head(hidden)

    @property
    def output_head(self) -> Any:
        """The LM head itself (a module, or a tied embedding's bound `as_linear`), for its weights."""
        return self._lm_head

    def make_cache(self) -> list[Any]:
        return wrap_caches(make_prompt_cache(self.model), self._recurrent_ids)

    def cache_length(self, cache: list[Any]) -> int:
        return int(cache[0].offset)

    def trim(self, cache: list[Any], num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if not can_trim_prompt_cache(cache):
            raise RuntimeError(
                "target cache can no longer be trimmed (a sliding-window layer wrapped around); "
                "speculative decoding past the window is not supported for this target yet"
            )
        trimmed = trim_prompt_cache(cache, num_tokens)
        assert trimmed == num_tokens, f"trimmed {trimmed} of {num_tokens} cache rows"

    def keep_rows(self, cache: list[Any], start: int, rows: list[int]) -> None:
        """Move the K/V rows start + rows[i] to start + i (a tree's accepted path; rows increasing).

        Only the tail moves: a chain-shaped path needs no copy, and the committed rows are never read.
        Trim the rest afterwards.
        """
        first = next((i for i, r in enumerate(rows) if r != i), len(rows))
        if first == len(rows):
            return
        index = mx.array([start + r for r in rows[first:]], dtype=mx.int32)
        lo, hi = start + first, start + len(rows)
        for c in cache:
            keys, values = mx.take(c.keys, index, axis=2), mx.take(c.values, index, axis=2)  # read, then write
            c.keys[..., lo:hi, :] = keys
            c.values[..., lo:hi, :] = values

    def close(self) -> None:
        """Restore the tapped layers' classes once the last Target on them is closed.

        A Target that is never closed leaves its hooks installed; they only record a reference.
        """
        for i in self.layer_ids:
            _remove_tap(self.layers[i])
        remove_recorders(self.layers, self._recurrent_ids)
        if self._tree is not None:
            tree_attention.remove(self._tree)
            self._tree = None
        self._slots = []
        self.layer_ids = ()
        self._recurrent_ids = ()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
