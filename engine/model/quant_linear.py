"""4- and 8-bit layers run by the CPU kernel (engine/backend/cpu_quant.py): a load-time swap of MLX's layers.

A 4- or 8-bit affine nn.QuantizedLinear (group size a power of two >= 32) becomes a QuantLinear holding the
same weights repacked for the kernel (16 output rows a group, the values laid out for one VNNI product per
4 inputs), and an nn.QuantizedEmbedding a QuantEmbedding whose tied LM-head product takes the kernel and
whose lookups dequantize only the rows they gather. Scales and minima are stored in float16 where that is
exact (a GGUF's Q4_0 / Q4_1), else in float32. Like engine/model/fused.py, a swap of exact types; call it
after fuse_projections (which packs the quantized Q/K/V and gate/up first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

GROUP = 16  # output rows per kernel group


def supported(module: object) -> bool:
    """Whether the kernel can run this layer's weights."""
    if type(module) not in (nn.QuantizedLinear, nn.QuantizedEmbedding):
        return False
    group = module.group_size
    in_dims = module.weight.shape[1] * 32 // module.bits
    return (module.bits in (4, 8) and getattr(module, "mode", "affine") == "affine" and module.get("biases") is not None
            and group >= 32 and group & (group - 1) == 0 and in_dims % group == 0)


def pack(weight: mx.array, scales: mx.array, biases: mx.array, group: int, bits: int = 4
         ) -> tuple[mx.array, mx.array, mx.array]:
    """MLX affine (N, K * bits / 32) uint32 + (N, K / group) scales and biases -> the kernel's arrays:
    (G, K / 32, 8 * bits * 8) uint8 values, (G, K / group, 16) scales and minima, G = ceil(N / 16)."""
    n, k = weight.shape[0], weight.shape[1] * 32 // bits
    groups = -(-n // GROUP)
    raw = np.asarray(weight).view(np.uint8).reshape(n, k * bits // 8)  # little-endian: input order
    q = np.zeros((groups * GROUP, k), np.uint8)
    if bits == 4:  # byte c holds input 2c in its low nibble, 2c + 1 in its high one
        q[:n, 0::2], q[:n, 1::2] = raw & 15, raw >> 4
        # input 32b + 16h + 4i + t of row 16g + j -> byte (g, b, i, j, t), nibble h
        q = q.reshape(groups, GROUP, k // 32, 2, 4, 4).transpose(0, 2, 3, 4, 1, 5)  # (g, b, h, i, j, t)
        values = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(groups, k // 32, 256)
    else:  # input 32b + 4i + t of row 16g + j -> byte (g, b, i, j, t)
        q[:n] = raw
        values = q.reshape(groups, GROUP, k // 32, 8, 4).transpose(0, 2, 3, 1, 4).reshape(groups, k // 32, 512)
    parts = [np.asarray(part.astype(mx.float32)) for part in (scales, biases)]
    # float16 halves the scales' share of the stream (a GGUF's are float16, widened exactly to float32 at load)
    with np.errstate(over="ignore"):
        exact = all(np.array_equal(p.astype(np.float16).astype(np.float32), p) for p in parts)
    dtype = np.float16 if exact else np.float32
    out = []
    for part in parts:
        padded = np.zeros((groups * GROUP, k // group), dtype)
        padded[:n] = part.astype(dtype)
        out.append(mx.array(np.ascontiguousarray(padded.reshape(groups, GROUP, k // group).transpose(0, 2, 1))))
    return mx.array(np.ascontiguousarray(values)), out[0], out[1]


def product(kernel: Any, x: mx.array, packed: tuple[mx.array, mx.array, mx.array], n_out: int, group: int) -> mx.array:
    """x @ W^T by the kernel (float32 activations in and out), in x's dtype."""
    y = kernel.matmul(x.astype(mx.float32), *packed, n_out, group)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.QuantizedLinear, kernel: Any) -> None:
        super().__init__()
        self.out_dims = int(linear.weight.shape[0])
        self.group_size, self.bits = int(linear.group_size), int(linear.bits)
        self.qweight, self.qscales, self.qmins = pack(linear.weight, linear.scales, linear.biases, self.group_size,
                                                      self.bits)
        if "bias" in linear:
            self.bias = linear.bias
        object.__setattr__(self, "_kernel", kernel)  # not a child module or parameter
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = product(self._kernel, x, (self.qweight, self.qscales, self.qmins), self.out_dims, self.group_size)
        return y + self["bias"] if "bias" in self else y


class QuantEmbedding(nn.Module):
    """A 4- or 8-bit embedding: lookups dequantize the gathered rows; `as_linear` (a tied LM head) is the kernel's."""

    def __init__(self, embedding: nn.QuantizedEmbedding, kernel: Any, dtype: mx.Dtype) -> None:
        super().__init__()
        self.num_embeddings = int(embedding.weight.shape[0])
        self.group_size, self.bits = int(embedding.group_size), int(embedding.bits)
        self.weight, self.scales, self.biases = embedding.weight, embedding.scales, embedding.biases  # lookups
        self.qweight, self.qscales, self.qmins = pack(embedding.weight, embedding.scales, embedding.biases,
                                                      self.group_size, self.bits)
        for name, value in embedding.__dict__.items():  # e.g. gemma's embed_scale, kept as found
            if not name.startswith("_") and not isinstance(value, mx.array) and name not in self.__dict__:
                setattr(self, name, value)
        object.__setattr__(self, "_kernel", kernel)
        object.__setattr__(self, "_dtype", dtype)  # what the rest of the model computes in
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        rows = mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids], self.group_size, self.bits)
        return rows.astype(self._dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return product(self._kernel, x, (self.qweight, self.qscales, self.qmins), self.num_embeddings, self.group_size)

    def subset(self, ids: mx.array) -> Callable[[mx.array], mx.array]:
        """The LM-head product over these rows only, in their order (a draft's proposal head)."""
        packed = pack(self.weight[ids], self.scales[ids], self.biases[ids], self.group_size, self.bits)
        n, group, kernel = int(ids.shape[0]), self.group_size, self._kernel
        return lambda x: product(kernel, x, packed, n, group)

    def top_probability(self, logits: mx.array) -> mx.array:
        """(..., V) -> (...,) softmax probability of each row's largest logit, by the kernel."""
        return self._kernel.top_probability(logits.astype(mx.float32))


def use_quant_kernel(model: nn.Module, kernel: Any, dtype: mx.Dtype = mx.float32) -> int:
    """Swap the kernel-ready quantized layers of `model` for QuantLinear / QuantEmbedding; returns how many.

    `dtype`: what the rest of the model computes in (embedding lookups are cast to it)."""
    swapped = 0
    for _, module in model.named_modules():
        for key, child in list(module.items()):
            items = list(enumerate(child)) if isinstance(child, list) else [(None, child)]
            for index, item in items:
                if not supported(item):
                    continue
                twin = QuantLinear(item, kernel) if isinstance(item, nn.QuantizedLinear) else QuantEmbedding(item, kernel, dtype)
                if index is None:
                    module[key] = twin
                else:
                    child[index] = twin
                swapped += 1
    if swapped:
        mx.eval(model.parameters())
    return swapped


def kernel_of(model: nn.Module) -> Any | None:
    """The kernel a model's swapped layers run on, or None."""
    return next((m._kernel for _, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)), None)


def quantize_onto_kernel(draft: nn.Module, target: nn.Module, bits: int = 8) -> int:
    """A draft beside a target on the kernel: its float linear layers quantized (8 bits, groups of 32) and
    swapped onto the kernel too; returns how many. Proposals need not be exact (the target verifies
    every one), and at the 135M model's size a float32 draft forward cost about as much as a plain step."""
    from engine.model.transposed import TransposedLinear

    kernel = kernel_of(target)
    if kernel is None:
        return 0
    for _, module in draft.named_modules():  # float layers as nn.Linear again: nn.quantize converts those
        for key, child in list(module.items()):
            if isinstance(child, TransposedLinear):
                linear = nn.Linear(*child.weight_t.shape, bias="bias" in child)
                linear.update({"weight": child.weight_t.T, **({"bias": child.bias} if "bias" in child else {})})
                module[key] = linear
    nn.quantize(draft, group_size=32, bits=bits,
                class_predicate=lambda _, m: type(m) is nn.Linear and m.weight.shape[1] % 32 == 0)
    return use_quant_kernel(draft, kernel)
