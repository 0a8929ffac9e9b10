"""Host cost per op on this MLX backend: a chain of matmuls, verify-width kernel calls or adds.

    python bench/launch_cost.py [--ops 144] [--rows 1,2,4,8,16] [--dim 576] [--out FILE]

On MLX's CUDA backend a forward of an 8B-shaped model is partly bound by host work (building the graph
in Python, then `mx.async_eval` encoding every op). A custom kernel that is faster on the device can
still slow a forward down if each call costs more host time than the matmul it replaces. This times
chains of `--ops` ops on small operands (so the device finishes first and the host cost shows):
build (Python), launch (async_eval returning), wait (the sync), per op, for MLX's matmul, the
verify-width dense kernel (engine/backend/verify_gemm.py) where it exists, MLX's 1-row GEMV run once
per row (`gemv_rows`, below), and an elementwise add.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from engine.backend.verify_gemm import TILINGS, GemmSpec, default_verify_gemm  # noqa: E402


def time_chain(step: Callable[[mx.array], mx.array], x: mx.array, ops: int, reps: int) -> dict[str, float]:
    """Median microseconds per op of building, launching and waiting for `ops` chained steps."""
    build, launch, wait = [], [], []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        y = x
        for _ in range(ops):
            y = step(y)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        if i >= 2:  # two warm-ups: compiles and plans
            build.append(t1 - t0)
            launch.append(t2 - t1)
            wait.append(t3 - t2)
    per_op = 1e6 / ops
    return {"build_us": statistics.median(build) * per_op, "launch_us": statistics.median(launch) * per_op,
            "wait_us": statistics.median(wait) * per_op}


def gemv_rows(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T as MLX's 1-row GEMV once per row. MLX-CUDA 0.32.4 sends products of 2+ rows to cuBLASLt
    (a descriptor, a heuristic query and a stream capture per call); a (rows, 1, K) view whose row stride
    sits on the size-1 axis, against a 3-D weight, is not folded back into one (rows, K) GEMM."""
    k = x.shape[-1]
    rows = x.size // k
    view = mx.as_strided(x, (rows, 1, k), (k, 1, 1))
    return (view @ mx.expand_dims(w.T, 0)).reshape(*x.shape[:-1], w.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=144, help="ops per chain (an 8B forward has ~144 matmuls)")
    parser.add_argument("--rows", default="16", help="comma list of row counts")
    parser.add_argument("--dim", type=int, default=256, help="square weight size: small, so the host cost shows")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    w = (mx.random.normal((args.dim, args.dim)) * args.dim**-0.5).astype(dtype)
    mx.eval(w)
    gemm = default_verify_gemm()
    report: dict[str, Any] = {"device": str(mx.default_device()), "ops": args.ops, "dim": args.dim, "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        x = mx.random.normal((rows, args.dim)).astype(dtype)
        mx.eval(x)
        steps: dict[str, Callable[[mx.array], mx.array]] = {"matmul": lambda y: y @ w.T, "add": lambda y: y + 1}
        if rows > 1:
            steps["gemv_rows"] = lambda y: gemv_rows(y, w)
            one = mx.concatenate([x[i : i + 1] @ w.T for i in range(rows)])
            report.setdefault("gemv_rows_bitwise_1_row", {})[rows] = bool(mx.array_equal(gemv_rows(x, w), one).item())
        if gemm.covers(dtype, w) and gemm.kernel is not None and 2 <= rows <= 32:
            bucket = next(b for b in (8, 16, 32) if b >= rows)
            spec, tiling = GemmSpec(args.dim, args.dim, dtype), TILINGS[gemm.backend][bucket][0]
            steps["verify_gemm"] = lambda y: gemm.kernel(y, w, spec, bucket, tiling)
        for name, step in steps.items():
            r = report["rows"].setdefault(rows, {})[name] = time_chain(step, x, args.ops, args.reps)
            print(f"{rows:>3} rows {name:<12} build {r['build_us']:6.1f} us/op  launch {r['launch_us']:6.1f} us/op  "
                  f"wait {r['wait_us']:6.1f} us/op", flush=True)
    if "gemv_rows_bitwise_1_row" in report:
        print("gemv_rows equals the 1-row products bit for bit:", report["gemv_rows_bitwise_1_row"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
