"""exp, softmax and SwiGLU for MLX's CPU backend, as compiled float32 polynomials.

On Linux MLX's CPU `exp` runs one scalar call per element: ~18 ns, so in a 16-row SmolLM2 verify
the SwiGLU and the attention softmax cost ~45 of 183 ms (2 cores, MLX 0.32.4). The same
exp as a range reduction plus a degree-7 polynomial, compiled by mx.compile, runs 2-4x faster
(24K elements: 444 -> 100 us) and is more accurate (max relative error 8e-8 vs mx.exp's 4e-6
over [-87, 88]). It pays from about MIN_ELEMENTS elements on: below that its graph nodes cost more than
the scalar calls they save (six bench prompts, one process, interleaved: the embedded model decoded
18.5 -> 20.0 tok/s plainly and 22.7 -> 24.5 with its draft when tensors below it went back to MLX's exp).
GPUs keep MLX's own ops: there exp is not the cost. `DFLASH_FAST_EXP=0` switches this off.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx_lm.models.activations import swiglu as mlx_swiglu

from engine.backend import route_epoch

ENV = "DFLASH_FAST_EXP"
LOG2E = 1.4426950408889634
# ln 2 split in two (Cody-Waite) so x - n·ln2 stays exact for |n| <= 127
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
# Cephes expf: exp(r) ~ 1 + r + r^2 · P(r) on |r| <= ln2 / 2
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)

_enabled: bool | None = None
# Smaller tensors take MLX's own ops: the polynomial is ~14 graph nodes (its compiled kernels, their
# broadcasts, a view) at ~5 us each against ~18 ns an element for mx.exp. A decode step's SwiGLU (1,536)
# and softmax (9 heads x keys) are below it, a 16-row block's SwiGLU (24,576) above.
MIN_ELEMENTS = 16384


def enabled() -> bool:
    """True on the CPU backend unless DFLASH_FAST_EXP=0 (read once per process)."""
    global _enabled
    if _enabled is None:
        off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")
        _enabled = not off and mx.default_device() == mx.cpu
    return _enabled


def set_enabled(value: bool | None) -> None:
    """Force the choice (None: read the backend and DFLASH_FAST_EXP again)."""
    global _enabled
    _enabled = value


def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """exp(x) = mantissa · 2^n: returns the mantissa and 2^n's float32 bit pattern (int32)."""
    # below -88, 2^n's biased exponent is 0 and exp is exactly 0 (masked scores give 0 weight)
    x = mx.clip(x, -88.0, 88.0)
    n = mx.floor(x * LOG2E + 0.5)
    r = x - n * LN2_HI - n * LN2_LO
    p = _P[0]
    for c in _P[1:]:
        p = p * r + c
    mantissa = p * r * r + r + 1.0
    return mantissa, mx.left_shift(n.astype(mx.int32) + 127, 23)


# shapeless: one kernel per dtype/rank whatever the rows or key length. `view` can't be traced
# shapelessly, so 2^n's bits leave the compiled part and are reinterpreted outside it.
_parts = mx.compile(_exp_parts, shapeless=True)
_scaled = mx.compile(lambda mantissa, two_n: mantissa * two_n, shapeless=True)
_swiglu_tail = mx.compile(lambda gate, up, mantissa, two_n: gate * up / (1.0 + mantissa * two_n), shapeless=True)


def _two_n(bits: mx.array) -> mx.array:
    # n is piecewise constant, so gradients flow through the mantissa alone (and `view` has no vjp)
    return mx.stop_gradient(bits.view(mx.float32))


def exp(x: mx.array) -> mx.array:
    """float32 exp; other dtypes go to mx.exp."""
    if x.dtype != mx.float32:
        return mx.exp(x)
    mantissa, bits = _parts(x)
    return _scaled(mantissa, _two_n(bits))


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax in float32 along `axis`, rows with a finite max (as causal attention rows have)."""
    if not enabled() or x.dtype != mx.float32 or x.size < MIN_ELEMENTS:
        return mx.softmax(x, axis=axis, precise=True)
    weights = exp(x - mx.max(x, axis=axis, keepdims=True))
    return weights / mx.sum(weights, axis=axis, keepdims=True)


def logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    """log(sum(exp(x))) along `axis`, kept (rows with a finite max: a draft's logits over its vocabulary)."""
    if not enabled() or x.dtype != mx.float32 or x.size < MIN_ELEMENTS:
        return mx.logsumexp(x, axis=axis, keepdims=True)
    top = mx.max(x, axis=axis, keepdims=True)
    return top + mx.log(mx.sum(exp(x - top), axis=axis, keepdims=True))


_cpu_kernel: object | None = None  # the quantized CPU kernel's extension, once a model runs on it


def use_cpu_kernel(ext: object | None) -> None:
    """Take packed float32 SwiGLUs through the CPU kernel's one-pass op (kernels/cpu_quant: ~0.25 ms less
    per 16-row block than the polynomial here, and a value the same in any number of rows); None: not."""
    global _cpu_kernel
    _cpu_kernel = ext
    route_epoch.changed()


def packed_swiglu(gate_up: mx.array, hidden: int) -> mx.array:
    """swiglu of a packed [gate | up] product (..., 2 * hidden): the CPU kernel's op where it runs."""
    if _cpu_kernel is not None and gate_up.dtype == mx.float32:
        return _cpu_kernel.swiglu(gate_up, hidden)  # type: ignore[attr-defined]
    gate, up = mx.split(gate_up, [hidden], axis=-1)
    return swiglu(gate, up)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) · up = gate · up / (1 + exp(-gate)), as mlx-lm's swiglu."""
    if not enabled() or gate.dtype != mx.float32 or gate.size < MIN_ELEMENTS:
        return mlx_swiglu(gate, up)
    mantissa, bits = _parts(-gate)
    return _swiglu_tail(gate, up, mantissa, _two_n(bits))
