"""Which variant of a GPU kernel runs: the fastest that passes numerics, if it beats the reference path.

Shared by engine/backend/verify_matmul.py and engine/backend/attention_kernel.py. A variant that fails to compile or
launch (NVRTC errors, too many registers for its block size) is rejected like a wrong one: the server
keeps the reference path rather than failing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import mlx.core as mx

log = logging.getLogger("dflash.kernels")

V = TypeVar("V")
SPEEDUP_MARGIN = 0.97  # a kernel must beat the reference by 3% to be used (timing noise)


def exact_float32(product: Callable[[], mx.array]) -> mx.array:
    """A float32 numerics oracle computed on the CPU stream: MLX's CUDA float32 matmul runs in TF32 by
    default (MLX_ENABLE_TF32; ~3e-4 relative error), which failed every correct float32 kernel at 1e-4."""
    with mx.stream(mx.cpu):
        return product()


@dataclass(frozen=True)
class Pick(Generic[V]):
    variant: V | None  # None: the reference path
    kernel_ms: float
    max_rel_error: float
    reason: str
    correct: V | None = None  # the fastest variant that passed numerics, chosen or not


def pick_fastest(variants: Iterable[V], *, max_rel_error: Callable[[V], float], time_ms: Callable[[V], float],
                 tolerance: float, reference_ms: float, noun: str, describe: Callable[[V], str] = str,
                 what: str = "") -> Pick[V]:
    """Time every variant within `tolerance` of the float32 oracle; keep the fastest if it wins."""
    best: Pick[V] = Pick(None, float("inf"), float("nan"), f"no {noun} passed numerics")
    for variant in variants:
        try:
            error = max_rel_error(variant)
            if not error <= tolerance:  # also catches NaN
                log.warning("%s %s failed numerics for %s: rel err %.3g", noun, describe(variant), what, error)
                continue
            ms = time_ms(variant)
        except Exception as e:  # a compile or launch failure rejects the variant, not the server
            log.warning("%s %s failed for %s: %s", noun, describe(variant), what, e)
            continue
        if ms < best.kernel_ms:
            best = Pick(variant, ms, error, "")
    if best.variant is None:
        return best
    if best.kernel_ms >= reference_ms * SPEEDUP_MARGIN:
        return Pick(None, best.kernel_ms, best.max_rel_error, "kernel not faster", best.variant)
    return Pick(best.variant, best.kernel_ms, best.max_rel_error,
                f"{reference_ms / best.kernel_ms:.2f}x faster with {describe(best.variant)}", best.variant)
