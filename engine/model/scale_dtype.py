"""Quantized layers' scales and biases stored in the activations' dtype, at load time, on CUDA.

A GGUF loaded as MLX 4-bit keeps its scales and biases in float16 while its norms are float32, so the
activations are float32, and `mx.quantized_matmul` casts the scales and the biases to float32 on every
call: two copy kernels per product. On an H200 (MLX 0.32.4) they were 244 of the 640 kernels of a
SmolLM2-135M decode step, and CUDA steps of a small model cost what their kernels cost to launch
(bench/kernel_profile.py lists the most launched kernels). Casting once at load is exact (float16 and
bfloat16 values are float32 values), so every product is bit for bit what it was.

Only where every float parameter outside the quantized layers is float32 (then every quantized layer's
input is float32: each follows a float32 norm or a float32 product), and only quantized linear layers:
a quantized embedding's lookup returns its scales' dtype, which the first norm then widens, so casting
its scales would round its rows differently. The price is memory: float32 scales and biases take twice
the float16 ones, for 4-bit/g32 weights a quarter more than the weights themselves. Metal launches
kernels far more cheaply and Macs have less memory to spare: the swap is CUDA's only.

A draft stored in bfloat16 beside such a target reads float32 taps, so MLX widened each of its weights
on every call as well: 45 copy kernels of a 162-kernel draft forward on the H200, 0.43 of its 1.18 ms of
device time. `widen_draft` stores the draft's float parameters in float32 once instead, exact for the same
reason; a draft's memory doubles (SmolLM2's: 23 to 46 MB).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def activations_dtype(model: nn.Module) -> mx.Dtype | None:
    """float32 when every float parameter outside quantized layers is float32, else None (mixed or narrower)."""
    dtypes = set()
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        for value in module.values():
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
                dtypes.add(value.dtype)
    return mx.float32 if dtypes == {mx.float32} else None


def widen_scales(model: nn.Module) -> int:
    """Cast every quantized linear layer's scales and biases to float32 where the activations are float32;
    returns how many layers changed. Call it after engine/model/fused.py has packed the projections."""
    if activations_dtype(model) is None:
        return 0
    changed = 0
    for _, module in model.named_modules():
        if not isinstance(module, nn.QuantizedLinear):
            continue
        params = {n: module[n] for n in ("scales", "biases") if isinstance(module.get(n), mx.array)}
        narrow = {n: v.astype(mx.float32) for n, v in params.items() if v.dtype != mx.float32}
        if narrow:
            module.update(narrow)
            changed += 1
    if changed:
        mx.eval([v for _, v in tree_flatten(model.parameters())])
    return changed


def widen_draft(draft: nn.Module, target: nn.Module) -> int:
    """Cast a draft's narrower float parameters to float32 where the target's activations are float32;
    returns how many arrays changed. The draft's own quantized layers widen their scales the same way."""
    if activations_dtype(target) is None:
        return 0
    narrow = [v for _, v in tree_flatten(draft.parameters()) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.float32]
    if narrow:
        draft.set_dtype(mx.float32)
        mx.eval([v for _, v in tree_flatten(draft.parameters())])
    return len(narrow)
