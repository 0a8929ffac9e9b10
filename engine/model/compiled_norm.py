"""RMSNorm as one compiled kernel for MLX's CPU backend.

MLX's CPU `mx.fast.rms_norm` falls back to eleven graph nodes (square, sum, the broadcasts of eps and the
weight, rsqrt, three multiplies), and each node costs ~5 us to schedule on this backend whatever its size:
a decoder layer's two norms were 22 of the 73 nodes of its decode step. The same formula under `mx.compile`
is three (square, sum, one fused elementwise kernel). Like engine/model/transposed.py it
is a swap of an exact type (nn.RMSNorm) at load time, for float32 inputs up to MAX_ELEMENTS (decode rows
and verify blocks); larger ones (prefill chunks) keep MLX's own: there the node count is a small share of
the work, and only the small calls were measured (docs/benchmarks.md).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.backend import route_epoch

MAX_ELEMENTS = 16384  # a 16-row block of a 1,024-wide model; prefill chunks are far above it


def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array, inverse_dims: mx.array) -> mx.array:
    # mean as MLX computes it (the sum times 1/n), with 1/n an input: a shapeless mean would add a node
    return weight * (x * mx.rsqrt(mx.sum(mx.square(x), axis=-1, keepdims=True) * inverse_dims + eps))


# shapeless: one compile per rank, whatever the rows
_compiled = mx.compile(_rms_norm, shapeless=True)
_constants: dict[tuple[float, int], tuple[mx.array, mx.array]] = {}  # (eps, dims) -> the two scalars


def _scalars(eps: float, dims: int) -> tuple[mx.array, mx.array]:
    if (eps, dims) not in _constants:  # built once, not on every call of every layer
        _constants[(eps, dims)] = (mx.array(eps, dtype=mx.float32), mx.array(1.0 / dims, dtype=mx.float32))
    return _constants[(eps, dims)]


_cpu_kernel: object | None = None  # the quantized CPU kernel's extension, once a model runs on it


def use_cpu_kernel(ext: object | None) -> None:
    """Run float32 norms as the CPU kernel's one-node op (kernels/cpu_quant), any number of rows; None: the
    compiled formula again."""
    global _cpu_kernel
    _cpu_kernel = ext
    route_epoch.changed()


class CompiledRMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose small float32 calls run the compiled formula, or every float32 call the CPU kernel's
    op where a model runs on it (installed by class swap)."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float32 or self.weight.dtype != mx.float32:
            return super().__call__(x)
        if _cpu_kernel is not None:
            return _cpu_kernel.rms_norm(x, self.weight, self.eps)  # type: ignore[attr-defined]
        if x.size > MAX_ELEMENTS:
            return super().__call__(x)
        return _compiled(x, self.weight, *_scalars(self.eps, x.shape[-1]))


def compile_norms(model: nn.Module) -> int:
    """Swap every exact nn.RMSNorm under `model` for CompiledRMSNorm, in place; returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        if type(module) is nn.RMSNorm:
            module.__class__ = CompiledRMSNorm
            swapped += 1
    return swapped
