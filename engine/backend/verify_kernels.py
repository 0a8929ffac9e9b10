"""The verify-width kernels applied to a model: quantized layers (verify_matmul), float ones (verify_gemm),
and where a whole forward decides it, the block-attention kernel (attention_kernel).

Each layer shape's kernel is chosen at load by numerics and by its own speed. On MLX's CUDA backend a
forward is partly bound by host work, and a kernel that wins alone can lose inside a forward: on an
H200 the dense kernel was 1.1-1.9x faster per Qwen3-8B layer at 2-16 rows, but a 16-row forward with it
took 12.8 ms against 9.3 ms with MLX's matmul (bench/regime.py --verify-gemm; bench/launch_cost.py
times the host cost per call). So the dense kernels are kept only if a whole forward is faster with them.
The block-attention kernel meets the opposite case: on an H100 at the Qwen3-8B shape (32 query and 8 KV
heads of 128) it lost alone (0.150 ms against 0.095 for the explicit composition at 16 rows over 512
keys), while the composition launches ~6 kernels a layer where the kernel launches one, in a forward
whose device works ~8 of ~17 ms (bench/regime.py --profile). So where it lost alone, a whole forward
decides too.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from engine.backend import attention_kernel, verify_gemm, verify_matmul
from engine.backend.kernel_choice import SPEEDUP_MARGIN

log = logging.getLogger("dflash.verify_kernels")

CONFIRM_ROWS = 16  # a full verify block
CONFIRM_REPS = 5


def apply(model: nn.Module, *, confirm: bool = True, gemm: verify_gemm.VerifyGemm | None = None,
          verify: verify_matmul.VerifyMatmul | None = None,
          attention: attention_kernel.BlockAttentionKernel | None = None) -> int:
    """Swap the model's layers for the verify-width ones where a kernel exists; returns how many.

    With `confirm`, dense kernels stay on only if a CONFIRM_ROWS-row forward of `model` is faster with them,
    and the block-attention kernel runs where it lost alone (attention_kernel's `in_forward`) only if that
    forward is faster with it.
    """
    gemm = gemm or verify_gemm.default_verify_gemm()
    quantized = verify_matmul.apply(model, verify)
    dense = verify_gemm.apply_dense(model, gemm)
    if confirm:
        ids = mx.zeros((1, CONFIRM_ROWS), dtype=mx.int32)

        def forward() -> None:
            mx.eval(model(ids, cache=make_prompt_cache(model)))

        if dense:
            log.info("dense verify kernels: %s", confirm_end_to_end(forward, gemm))
        attention = attention or attention_kernel.default_kernel()
        if attention.kernel is not None:
            forward()  # the attention kernel's decisions for this model's shapes are made here
            if attention.lost_alone():
                log.info("block attention where it lost alone: %s", confirm_in_forward(forward, attention))
    return quantized + dense


def faster_inside(forward: Callable[[], None], use: Callable[[bool], None], reps: int = CONFIRM_REPS,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[bool, float, float]:
    """Time `forward` with `use(True)` and `use(False)`, interleaved; leave the faster set (ties: False).
    Returns (kept, ms with, ms without)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for rep in range(reps + 1):
            for active in (True, False):
                use(active)
                start = clock()
                forward()
                if rep:  # the first round warms both paths up
                    times[active].append(clock() - start)
    finally:
        use(True)
    on, off = statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3
    kept = on < off * SPEEDUP_MARGIN
    use(kept)
    return kept, on, off


def confirm_end_to_end(forward: Callable[[], None], gemm: verify_gemm.VerifyGemm,
                       reps: int = CONFIRM_REPS, clock: Callable[[], float] = time.perf_counter) -> str:
    """Time `forward` with the dense kernels on and off, interleaved; leave them on only if it is faster."""
    kept, on, off = faster_inside(forward, lambda active: setattr(gemm, "active", active), reps, clock)
    verdict = "kept" if kept else "off (MLX's matmul is as fast inside a forward)"
    return f"{verdict}: {CONFIRM_ROWS}-row forward {on:.2f} ms with them, {off:.2f} ms without"


def confirm_in_forward(forward: Callable[[], None], attention: attention_kernel.BlockAttentionKernel,
                       reps: int = CONFIRM_REPS, clock: Callable[[], float] = time.perf_counter) -> str:
    """Time `forward` with the attention kernel run where it lost alone and without; keep the faster."""
    kept, on, off = faster_inside(forward, lambda active: setattr(attention, "in_forward", active), reps, clock)
    verdict = "run" if kept else "explicit composition (as fast inside a forward)"
    return f"{verdict}: {CONFIRM_ROWS}-row forward {on:.2f} ms with the kernel, {off:.2f} ms without"
