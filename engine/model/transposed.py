"""Float linear layers stored transposed, (in, out), for MLX's CPU backend.

nn.Linear computes x @ W.T. With OpenBLAS on a 2-core x86 box (MLX 0.32.4) the same product
against a contiguous (in, out) copy is faster, most of all for decode rows: the SmolLM2-135M
target's forward took 68.8 -> 53.7 ms at 1 row and 155.6 -> 140.7 ms at 16 (fp32, packed Q/K/V).
The swap stores each float32 nn.Linear's weight transposed (no extra memory) and a tied float32
embedding transposed too: its LM-head product reads it directly, token lookups gather columns.
Like engine/model/fused.py, it is a swap of exact types at load time; quantized layers are left alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


class TransposedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)  # (in, out)
        if "bias" in linear:
            self.bias = linear.bias
        if not linear.trainable_parameters():
            self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight_t)
        if x.ndim == 3 and x.shape[0] == 1:
            # against a (1, in, out) view MLX runs the same GEMM as one node; a 2-D weight adds a
            # Flatten and an Unflatten around it, and each node costs ~5 us on the CPU backend
            return mx.matmul(x, self._batch_view())
        return x @ self.weight_t

    def _batch_view(self) -> mx.array:
        view = self.__dict__.get("_view")  # an object attribute: an array attribute would be a parameter
        if view is None or view[0] is not self.weight_t:  # rebuilt when new weights are loaded
            view = (self.weight_t, mx.expand_dims(self.weight_t, 0))
            object.__setattr__(self, "_view", view)
        return view[1]


class TransposedEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(embedding.weight.T)  # (dims, vocab)
        for name, value in embedding.__dict__.items():  # e.g. gemma's embed_scale, kept as found
            if not name.startswith("_") and not isinstance(value, mx.array) and name not in self.__dict__:
                setattr(self, name, value)
        if not embedding.trainable_parameters():
            self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)  # (..., dims)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t  # (..., vocab)


def transpose_linears(model: nn.Module) -> int:
    """Swap every float32 nn.Linear / nn.Embedding of `model` for its transposed twin; returns how many.

    Call it after engine/model/fused.fuse_projections (which packs plain nn.Linear layers) and before
    anything keeps a bound method of a swapped module (Target binds `embed_tokens.as_linear`).
    """
    swapped = 0
    for _, module in model.named_modules():
        for key, child in list(module.items()):
            if isinstance(child, list):
                for i, item in enumerate(child):
                    if (twin := _twin(item)) is not None:
                        child[i], swapped = twin, swapped + 1
            elif (twin := _twin(child)) is not None:
                module[key], swapped = twin, swapped + 1
    if swapped:
        mx.eval(model.parameters())  # the untransposed copies go now, not at the first forward
    return swapped


def _twin(module: object) -> nn.Module | None:
    if type(module) is nn.Linear and module.weight.dtype == mx.float32:
        return TransposedLinear(module)
    if type(module) is nn.Embedding and module.weight.dtype == mx.float32:
        return TransposedEmbedding(module)
    return None


def untransposed_parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """tree_flatten(model.parameters()) with every swapped matrix back under its original name and shape."""
    return [
        (name[: -len("_t")], value.T) if name.endswith(".weight_t") else (name, value)
        for name, value in tree_flatten(model.parameters())
    ]
