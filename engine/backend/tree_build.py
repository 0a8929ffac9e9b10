"""The CUDA launcher of kernels/tree_build.cu: a draft tree's rows built on the device, in one thread.

engine/decode/tree.py decides at first use whether trees are built with it (its rows must equal
build_tree's); elsewhere the host reads the candidates and pops the heap itself.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from engine.backend.verify_matmul import read_kernel_source

MAX_SCORED = 127  # pops scored at most (the kernel's arrays; a tree's rows stay under MAX_TREE_ROWS)
MAX_DEPTH = 32
MAX_CANDIDATES = 255  # ranks are stored as bytes

# (ids (L, K) int32, log-probs (L, K), budget, scored, spine) -> tokens, parents, depths, pops, bits, ancestors,
# scores, spine count
TreeKernel = Callable[[mx.array, mx.array, int, int, bool], tuple[mx.array, ...]]


def make_cuda_kernel() -> TreeKernel:
    header, body = read_kernel_source("tree_build.cu")
    kernel = mx.fast.cuda_kernel(
        name="dflash_tree_build", input_names=["ids", "lp", "dims"],
        output_names=["tokens", "parents", "depths", "pops", "bits", "ancestors", "scores", "spine"],
        source=body, header=header)

    def launch(ids: mx.array, logprobs: mx.array, budget: int, scored: int, spine: bool) -> tuple[mx.array, ...]:
        depth, k = ids.shape
        assert budget <= scored <= MAX_SCORED and depth <= MAX_DEPTH and k <= MAX_CANDIDATES, (ids.shape, budget, scored)
        dims = mx.array([depth, k, budget, scored], dtype=mx.int32)
        return tuple(kernel(
            inputs=[ids.astype(mx.int32), logprobs.astype(mx.float32), dims], template=[("SPINE", spine)],
            grid=(1, 1, 1), threadgroup=(1, 1, 1),
            output_shapes=[(budget,), (budget,), (budget,), (budget,), (budget + 1, 4), (budget + 1, budget + 1),
                           (scored,), (1,)],
            output_dtypes=[mx.int32, mx.int32, mx.int32, mx.int32, mx.uint32, mx.uint8, mx.float32, mx.int32]))

    return launch
