"""Verify-width dense matmul: the kernel against MLX's bf16 matmul and MLX-only alternatives, by rows.

    python bench/verify_gemm.py [--rows 1 2 4 8 16 32] [--layers lm_head down ...] [--extra-tilings 16,1,8,4 ...]
                                [--out verify_gemm.json]

For the Qwen3-8B layer shapes (and the DFlash draft's fc) with random bf16 weights, at each row
count: MLX's `x @ w.T` (what nn.Linear runs), the MLX-only alternatives (weights pre-transposed to a
contiguous (K, N) `x @ wt`, `mx.addmm` with a zero bias, float16 instead of bfloat16, x padded to 32
and to 64 rows), and every kernel tiling of engine/backend/verify_gemm.py for the row bucket plus
the --extra-tilings (NC,WN,WK,KU; CUDA's default: a few not shipped, to learn from), with each one's
max relative error against a float32 matmul. All variants of one (layer, rows) are timed
interleaved in rounds in this process (the H200's timings vary ~25% between processes), after a
warm-up; each figure is the median over rounds of the mean over `--calls` calls evaluated together.
GB/s = weight bytes / time. Then the runtime check's decision per (layer, bucket), what apply() would
use. On the CPU there is no kernel: only the MLX columns are filled. Writes everything to --out.
For whole-model forwards with and without the kernels: `python bench/regime.py --verify-gemm`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backend import verify_gemm as vg  # noqa: E402

# (input dims K, output dims N): Qwen3-8B's projections (32 query / 8 KV heads of 128), the packed
# Q/K/V and gate/up projections engine/model/fused.py makes, the untied LM head, the draft's fc.
# The target's own (packed) shapes first: what a timeout cuts short matters least.
LAYERS: dict[str, tuple[int, int]] = {
    "qkv fused": (4096, 6144), "q/o": (4096, 4096), "gate_up fused": (4096, 24576), "down": (12288, 4096),
    "lm_head": (4096, 151936), "draft fc": (20480, 4096), "k/v": (4096, 1024), "gate/up": (4096, 12288),
}
DTYPE = mx.bfloat16
# CUDA tilings tried beside the shipped ones: deeper loads in flight, 2 weight tiles with 8 warps on K,
# 2 column warps, 16 warps on K
EXTRA_CUDA = ["16,1,8,4", "32,1,8,1", "16,2,4,2", "16,1,16,2"]


def timings(variants: dict[str, Callable[[], mx.array]], calls: int, rounds: int) -> dict[str, float]:
    """Median over `rounds` of ms per call, every variant timed once per round in turn."""
    for fn in variants.values():  # compile and warm up
        mx.eval([fn() for _ in range(2)])
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            mx.eval([fn() for _ in range(calls)])
            samples[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_layer(name: str, k: int, n: int, rows_list: list[int], gemm: vg.VerifyGemm, calls: int,
                rounds: int, extra: list[vg.GemmTiling]) -> list[dict[str, Any]]:
    spec = vg.GemmSpec(n, k, DTYPE)
    w = vg.random_weight(spec)
    wt = mx.contiguous(w.T)
    w16 = w.astype(mx.float16)
    zero_bias = mx.zeros((n,), DTYPE)
    mx.eval(wt, w16, zero_bias)
    gbytes = n * k * 2 / 1e9
    results = []
    for rows in rows_list:
        x = mx.random.normal((rows, k)).astype(DTYPE)
        x16 = x.astype(mx.float16)
        mx.eval(x, x16)
        variants: dict[str, Callable[[], mx.array]] = {
            "mlx x@w.T": lambda: x @ w.T,
            "mlx x@wt": lambda: x @ wt,
            "mlx addmm": lambda: mx.addmm(zero_bias, x, w.T),
            "mlx fp16": lambda: x16 @ w16.T,
        }
        for pad in (32, 64):
            if rows < pad:
                xp = mx.concatenate([x, mx.zeros((pad - rows, k), DTYPE)])
                mx.eval(xp)
                variants[f"mlx pad{pad}"] = lambda xp=xp: (xp @ w.T)[:rows]
        row: dict[str, Any] = {"layer": name, "k": k, "n": n, "rows": rows, "weight_gb": gbytes, "errors": {},
                               "max_rel_err": {}}
        bucket = vg.row_bucket(rows)
        if gemm.kernel is not None and bucket is not None:
            ref = vg.float32_reference(x, w)
            shipped = vg.TILINGS[gemm.backend][bucket]
            for tiling in [*shipped, *(t for t in extra if t not in shipped)]:
                label = f"kernel {tiling.nc}x{tiling.wn}x{tiling.wk}u{tiling.ku}" + ("" if tiling in shipped else "*")
                try:
                    y = gemm.kernel(x, w, spec, bucket, tiling).astype(mx.float32)
                    err = (mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))).item()
                    row["max_rel_err"][label] = err
                    variants[label] = lambda tiling=tiling: gemm.kernel(x, w, spec, bucket, tiling)
                except Exception as e:  # a variant that fails to compile or launch is a result too
                    row["errors"][label] = f"{type(e).__name__}: {e}"[:300]
        row["ms"] = timings(variants, calls, rounds)
        row["gb_s"] = {label: gbytes / (ms / 1e3) for label, ms in row["ms"].items()}
        results.append(row)
        print_row(row)
    return results  # the weights go with this frame; main clears MLX's cache


def print_row(row: dict[str, Any]) -> None:
    mlx = row["ms"]["mlx x@w.T"]
    cells = [f"{label.replace('kernel ', 'k')} {ms:7.4f} ({row['gb_s'][label]:5.0f})" for label, ms in row["ms"].items()]
    kernels = {label: ms for label, ms in row["ms"].items() if label.startswith("kernel")}
    best = f" | best kernel {mlx / min(kernels.values()):.2f}x MLX" if kernels else ""
    errs = " err " + " ".join(f"{e:.1e}" for e in row["max_rel_err"].values()) if row["max_rel_err"] else ""
    print(f"{row['layer']:>13} N={row['n']:<6} K={row['k']:<5} M={row['rows']:<2} ms (GB/s): " + " | ".join(cells)
          + best + errs + "".join(f" | {label}: {e[:100]}" for label, e in row["errors"].items()), flush=True)


def decisions(gemm: vg.VerifyGemm, layers: list[str]) -> list[dict[str, Any]]:
    """What apply() decides per (layer, bucket) on this device (its own timer and margin)."""
    out = []
    for name in layers:
        k, n = LAYERS[name]
        spec = vg.GemmSpec(n, k, DTYPE)
        w = vg.random_weight(spec)
        for bucket in vg.BUCKETS:
            d = gemm.decide(spec, bucket, w)
            out.append({"layer": name, "n": n, "k": k, "bucket": bucket, "tiling": str(d.tiling),
                        "kernel_ms": d.kernel_ms, "mlx_ms": d.reference_ms, "max_rel_error": d.max_rel_error,
                        "reason": d.reason})
            print(f"decision {name:>13} rows<={bucket:<2}: {'kernel' if d.tiling else 'MLX':6} {d.reason} "
                  f"(kernel {d.kernel_ms:.4f} ms, MLX {d.reference_ms:.4f} ms)", flush=True)
        del w
        mx.clear_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--calls", type=int, default=10, help="calls evaluated together per timing")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    parser.add_argument("--no-decisions", action="store_true", help="skip the runtime check's decisions")
    parser.add_argument("--extra-tilings", nargs="*", default=None,
                        help="NC,WN,WK,KU tilings timed beside the shipped ones (marked *)")
    parser.add_argument("--out", default="verify_gemm.json")
    args = parser.parse_args()

    gemm = vg.VerifyGemm(enabled=True)
    extra_specs = args.extra_tilings if args.extra_tilings is not None else (EXTRA_CUDA if gemm.backend == "cuda" else [])
    extra = [vg.GemmTiling(*(int(v) for v in spec.split(","))) for spec in extra_specs]
    info = {"mlx": mx.__version__, "backend": gemm.backend, "device": gemm.device_name,
            "default_device": str(mx.default_device()), "kernels": gemm.kernel is not None,
            "tilings": {str(b): [str(t) for t in ts] for b, ts in vg.TILINGS.get(gemm.backend, {}).items()},
            "extra_tilings": [str(t) for t in extra]}
    print(json.dumps(info), flush=True)
    report: dict[str, Any] = {"info": info, "layers": [], "decisions": []}
    start = time.perf_counter()
    for name in args.layers:
        k, n = LAYERS[name]
        report["layers"] += bench_layer(name, k, n, args.rows, gemm, args.calls, args.rounds, extra)
        mx.clear_cache()
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))  # what a timeout leaves
    print(f"sweep took {time.perf_counter() - start:.0f} s", flush=True)
    if gemm.kernel is not None and not args.no_decisions:
        report["decisions"] = decisions(gemm, args.layers)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
