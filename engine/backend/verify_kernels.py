"""The verify-width kernels applied to a model: quantized layers (verify_matmul), float ones (verify_gemm).

Each layer shape's kernel is chosen at load by numerics and by its own speed. On MLX's CUDA backend a
forward is partly bound by host work, and a kernel that wins alone can lose inside a forward: on an
H200 the dense kernel was 1.1-1.9x faster per Qwen3-8B layer at 2-16 rows, but a 16-row forward with it
took 12.8 ms against 9.3 ms with MLX's matmul (bench/regime.py --verify-gemm; bench/launch_cost.py
times the host cost per call). So the dense kernels are kept only if a whole forward is faster with them.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from engine.backend import verify_gemm, verify_matmul
from engine.backend.kernel_choice import SPEEDUP_MARGIN

log = logging.getLogger("dflash.verify_kernels")

CONFIRM_ROWS = 16  # a full verify block
CONFIRM_REPS = 5


def apply(model: nn.Module, *, confirm: bool = True, gemm: verify_gemm.VerifyGemm | None = None,
          verify: verify_matmul.VerifyMatmul | None = None) -> int:
    """Swap the model's layers for the verify-width ones where a kernel exists; returns how many.

    With `confirm`, dense kernels stay on only if a CONFIRM_ROWS-row forward of `model` is faster with them.
    """
    gemm = gemm or verify_gemm.default_verify_gemm()
    quantized = verify_matmul.apply(model, verify)
    dense = verify_gemm.apply_dense(model, gemm)
    if dense and confirm:
        ids = mx.zeros((1, CONFIRM_ROWS), dtype=mx.int32)

        def forward() -> None:
            mx.eval(model(ids, cache=make_prompt_cache(model)))

        log.info("dense verify kernels: %s", confirm_end_to_end(forward, gemm))
    return quantized + dense


def confirm_end_to_end(forward: Callable[[], None], gemm: verify_gemm.VerifyGemm,
                       reps: int = CONFIRM_REPS, clock: Callable[[], float] = time.perf_counter) -> str:
    """Time `forward` with the dense kernels on and off, interleaved; leave them on only if it is faster."""
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for rep in range(reps + 1):
            for active in (True, False):
                gemm.active = active
                start = clock()
                forward()
                if rep:  # the first round warms both paths up
                    times[active].append(clock() - start)
    finally:
        gemm.active = True
    on, off = statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3
    gemm.active = on < off * SPEEDUP_MARGIN
    verdict = "kept" if gemm.active else "off (MLX's matmul is as fast inside a forward)"
    return f"{verdict}: {CONFIRM_ROWS}-row forward {on:.2f} ms with them, {off:.2f} ms without"
