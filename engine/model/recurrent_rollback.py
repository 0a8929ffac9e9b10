"""Rollback of the Gated DeltaNet layers of hybrid targets (Qwen3.5, Qwen3-Next), spec §2.4.

A GDN layer carries a conv window (the last K-1 rows its causal conv has seen) and a
recurrent state; neither can be trimmed like a KV cache. While a short forward (a verify
block) runs, each GDN layer leaves a `StepRecord` on its `RecurrentCache`: the conv input
and the arguments of its `gated_delta_update` call. Trimming n of the S rows re-runs the
recurrence over the first S-n steps from the recorded initial state and cuts the conv
window ending at that step, as REF-MLX does. Why not dflash-mlx's innovation tape: on a
0.8B-shaped target (CPU, bench/rollback_cost.py) this costs 1-10% of one verify (a = 0..B-2),
a tape replay about half that, but the tape must come out of the verify's own recurrence
(our kernel instead of mlx-lm's); a loop-free recompute matches the tape without that.
On an H200 (MLX CUDA, bf16) the step loop is launch-bound: 4-31% of a verify on the 0.8B
shape, 10-58% on the 4B shape, where the loop-free recompute costs 9-14% / 23-27%.

mlx-lm's forward runs unchanged: the layer's and its conv's classes are swapped for
recording subclasses (as target.py does for taps), and the model module's
`gated_delta_update` name is wrapped by a pass-through that records only inside a
recording layer call on the same thread.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache

# GDN layers whose cache is [conv window over the concatenated q/k/v projection, recurrent
# state] and whose recurrence is one gated_delta_update call: (module, class name)
GDN_CLASSES = frozenset({
    ("mlx_lm.models.qwen3_5", "GatedDeltaNet"),
    ("mlx_lm.models.qwen3_next", "Qwen3NextGatedDeltaNet"),
})
# Longer forwards are prefill chunks, which are never rolled back; recording them would
# keep O(chunk) activations of every GDN layer alive until the next forward.
MAX_RECORDED_ROWS = 128
_TIME_AXIS_ARGS = ("q", "k", "v", "a", "b", "mask")  # gated_delta_update arguments, time on axis 1

_active = threading.local()  # .record: the StepRecord of the GDN call running on this thread
_RECORDING_CLASSES: dict[type, type] = {}


class StepRecord:
    """What one GDN layer needs to redo the first steps of its last forward."""

    def __init__(self, kernel_size: int, update: Callable[..., tuple[mx.array, mx.array]]) -> None:
        self.kernel_size = kernel_size
        self.update = update  # mlx-lm's gated_delta_update itself, not the recording wrapper
        self.conv_input: mx.array | None = None  # (B, K-1+S, conv_dim): old window, then S rows
        self.update_args: dict[str, Any] = {}  # q, k (B, S, Hk, Dk), v (B, S, Hv, Dv), a, b (B, S, Hv), state…
        self.rows = 0  # steps of the recorded forward still in the cache

    def state_after(self, steps: int) -> tuple[mx.array, mx.array | None]:
        """(conv window (B, K-1, conv_dim), recurrent state (B, Hv, Dv, Dk)) after `steps` steps."""
        args = dict(self.update_args)
        state = args["state"]  # None: the layer started from zeros
        if steps > 0:
            for name in _TIME_AXIS_ARGS:
                if args.get(name) is not None:
                    args[name] = args[name][:, :steps]
            _, state = self.update(**args)
        window = mx.contiguous(self.conv_input[:, steps : steps + self.kernel_size - 1])
        return window, state


class RecurrentCache(ArraysCache):
    """A GDN layer's [conv window, recurrent state] that can drop the tail of its last forward.

    `is_trimmable` is True so mlx-lm's trim helpers accept it; `trim` raises when the rows to
    drop were not all added by the last recorded forward.
    """

    def __init__(self) -> None:
        super().__init__(size=2)
        self.offset = 0  # tokens seen, counted as KVCache counts them
        self.record: StepRecord | None = None

    def advance(self, n: int) -> None:
        super().advance(n)
        self.offset += n

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        if n <= 0:
            return 0
        record = self.record
        if record is None or n > record.rows:
            kept = 0 if record is None else record.rows
            raise RuntimeError(
                f"cannot roll a Gated DeltaNet layer back by {n} rows: only the last forward can be "
                f"rolled back ({kept} rows recorded; forwards over {MAX_RECORDED_ROWS} rows are not recorded)"
            )
        record.rows -= n
        self[0], self[1] = record.state_after(record.rows)
        self.offset -= n
        return n


def _gdn_of(layer: nn.Module) -> nn.Module | None:
    gdn = getattr(layer, "linear_attn", None)
    cls = _base_class(type(gdn))
    return gdn if (cls.__module__, cls.__name__) in GDN_CLASSES else None


def _base_class(cls: type) -> type:
    return cls.__bases__[0] if cls in _RECORDING_CLASSES.values() else cls


def recurrent_layer_ids(layers: Sequence[nn.Module]) -> tuple[int, ...]:
    """Indices of the decoder layers whose mixer is a Gated DeltaNet this module can roll back."""
    return tuple(i for i, layer in enumerate(layers) if _gdn_of(layer) is not None)


def wrap_caches(cache: list[Any], layer_ids: Sequence[int]) -> list[Any]:
    """Replace the model's ArraysCache of each GDN layer (one cache per layer) by a RecurrentCache."""
    for i in layer_ids:
        assert type(cache[i]) is ArraysCache, f"layer {i}: expected mlx-lm's ArraysCache, got {type(cache[i]).__name__}"
        cache[i] = RecurrentCache()
    return cache


def _record_gdn_call(cls: type) -> Callable[..., mx.array]:
    def __call__(self: nn.Module, inputs: mx.array, mask: mx.array | None = None, cache: Any = None) -> mx.array:
        if not isinstance(cache, RecurrentCache):
            return cls.__call__(self, inputs, mask, cache)
        if inputs.shape[1] > MAX_RECORDED_ROWS:
            cache.record = None
            return cls.__call__(self, inputs, mask, cache)
        record = StepRecord(self.conv_kernel_size, sys.modules[cls.__module__].gated_delta_update.dflash_original)
        _active.record = record
        try:
            out = cls.__call__(self, inputs, mask, cache)
        finally:
            _active.record = None
        assert record.conv_input is not None and record.update_args, f"{cls.__name__}'s forward changed: nothing recorded"
        record.rows = inputs.shape[1]
        cache.record = record
        return out

    return __call__


def _record_conv_call(cls: type) -> Callable[[nn.Module, mx.array], mx.array]:
    def __call__(self: nn.Module, x: mx.array) -> mx.array:
        if (record := getattr(_active, "record", None)) is not None:
            record.conv_input = x
        return cls.__call__(self, x)

    return __call__


def _recording_class(cls: type, make_call: Callable[[type], Callable[..., Any]]) -> type:
    if cls not in _RECORDING_CLASSES:
        attrs = {"__call__": make_call(cls), "__module__": cls.__module__}
        _RECORDING_CLASSES[cls] = type(f"Recording{cls.__name__}", (cls,), attrs)
    return _RECORDING_CLASSES[cls]


def _wrap_update(module: Any) -> None:
    """Wrap `module.gated_delta_update` once; it stays, a pass-through outside recording calls."""
    update = module.gated_delta_update
    if hasattr(update, "dflash_original"):
        return
    signature = inspect.signature(update)

    def gated_delta_update(*args: Any, **kwargs: Any) -> tuple[mx.array, mx.array]:
        if (record := getattr(_active, "record", None)) is not None:
            record.update_args = dict(signature.bind(*args, **kwargs).arguments)
        return update(*args, **kwargs)

    gated_delta_update.dflash_original = update  # type: ignore[attr-defined]
    module.gated_delta_update = gated_delta_update


def install_recorders(layers: Sequence[nn.Module], layer_ids: Sequence[int]) -> None:
    """Make those GDN layers record into RecurrentCaches; counted, like taps, per Target."""
    for i in layer_ids:
        gdn = _gdn_of(layers[i])
        users = gdn.__dict__.get("_dflash_recorders", 0)
        if users == 0:
            _wrap_update(sys.modules[type(gdn).__module__])
            gdn.conv1d.__class__ = _recording_class(type(gdn.conv1d), _record_conv_call)
            gdn.__class__ = _recording_class(type(gdn), _record_gdn_call)
        gdn._dflash_recorders = users + 1


def remove_recorders(layers: Sequence[nn.Module], layer_ids: Sequence[int]) -> None:
    """Undo install_recorders; the last Target to leave restores the original classes."""
    for i in layer_ids:
        gdn = _gdn_of(layers[i])
        gdn._dflash_recorders -= 1
        if gdn._dflash_recorders == 0:
            gdn.__class__ = _base_class(type(gdn))
            gdn.conv1d.__class__ = _base_class(type(gdn.conv1d))
            del gdn.__dict__["_dflash_recorders"]
