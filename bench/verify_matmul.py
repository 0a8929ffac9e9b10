"""Verify-width quantized matmul: kernel vs mx.quantized_matmul, per layer shape and whole model.

    python bench/verify_matmul.py [--shapes 135m 8b] [--rows 1 4 8 16 32] [--out verify_matmul.json]

For SmolLM2-135M and Qwen3-8B layer shapes (4-bit, group 64, bfloat16 activations, random
weights), prints per (shape, rows): mx.quantized_matmul ms, each kernel tiling's ms and max
relative error against a float32 dequantize+matmul, and whether the runtime check
(engine/backend/verify_matmul.py) accepted the kernel for that row bucket. Then whole-model forward
times of random 4-bit models of both shapes at 1 and 16 rows, without and with
verify_matmul.apply. Runs on whatever device MLX defaults to; on the CPU there is no kernel and
only the reference columns are filled. Writes everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backend import verify_matmul as vm  # noqa: E402

# (input dims K, output dims N) of each distinct projection, the (tied) lm_head, and the packed
# Q/K/V and gate/up projections engine/model/fused.py makes at load.
LAYERS: dict[str, dict[str, tuple[int, int]]] = {
    "135m": {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576),
             "lm_head": (576, 49152), "qkv fused": (576, 960), "gate_up fused": (576, 3072)},
    "8b": {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 12288), "down": (12288, 4096),
           "lm_head": (4096, 151936), "qkv fused": (4096, 6144), "gate_up fused": (4096, 24576)},
}
MODELS: dict[str, dict[str, Any]] = {
    "135m": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
             "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "vocab_size": 49152,
             "tie_word_embeddings": True, "rope_theta": 100000.0},
    "8b": {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
           "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 1000000.0,
           "max_position_embeddings": 40960},
}
GROUP_SIZE, BITS, DTYPE = 64, 4, mx.bfloat16


def bench_layers(name: str, rows_list: list[int], verify: vm.VerifyMatmul) -> list[dict[str, Any]]:
    results = []
    for layer, (k, n) in LAYERS[name].items():
        spec = vm.QuantSpec(n, k, GROUP_SIZE, BITS, DTYPE, DTYPE)
        w, s, b = vm.random_quantized(spec)
        for rows in rows_list:
            x = mx.random.normal((rows, k)).astype(DTYPE)
            row: dict[str, Any] = {"shapes": name, "layer": layer, "k": k, "n": n, "rows": rows,
                                   "reference_ms": vm.time_ms(lambda: vm.reference_qmm(x, w, s, b, GROUP_SIZE, BITS))}
            bucket = vm.row_bucket(max(rows, vm.MIN_ROWS))
            if verify.kernel is not None and bucket is not None:
                ref = vm.dequant_reference(x, w, s, b, GROUP_SIZE, BITS)
                row["tilings"] = [bench_tiling(verify, x, w, s, b, spec, bucket, tiling, ref)
                                  for tiling in vm.TILINGS[bucket]]
                decision = verify.decide(spec, bucket)
                row["accepted"] = decision.tiling is not None and rows >= vm.MIN_ROWS
                row["chosen"] = str(decision.tiling)
                row["reason"] = decision.reason
            results.append(row)
            print_layer_row(row)
    return results


def bench_tiling(verify: vm.VerifyMatmul, x: mx.array, w: mx.array, s: mx.array, b: mx.array,
                 spec: vm.QuantSpec, bucket: int, tiling: vm.Tiling, ref: mx.array) -> dict[str, Any]:
    out: dict[str, Any] = {"tiling": str(tiling)}
    try:
        y = verify.kernel(x, w, s, b, spec, bucket, tiling).astype(mx.float32)
        out["max_abs_err"] = mx.max(mx.abs(y - ref)).item()
        out["max_rel_err"] = out["max_abs_err"] / max(mx.max(mx.abs(ref)).item(), 1e-6)
        out["kernel_ms"] = vm.time_ms(lambda: verify.kernel(x, w, s, b, spec, bucket, tiling))
    except Exception as e:  # a kernel that fails to compile is a result worth printing
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def print_layer_row(row: dict[str, Any]) -> None:
    line = f"{row['shapes']:>5} {row['layer']:>8} K={row['k']:<6} N={row['n']:<7} M={row['rows']:<3}" \
           f" ref {row['reference_ms']:8.4f} ms"
    for t in row.get("tilings", []):
        if "error" in t:
            line += f" | {t['tiling']}: ERROR {t['error'][:120]}"
        else:
            line += f" | {t['tiling']}: {t['kernel_ms']:8.4f} ms err {t['max_abs_err']:.2e} (rel {t['max_rel_err']:.1e})"
    if "accepted" in row:
        line += f" | accepted={row['accepted']} {row['chosen']} {row['reason']}"
    print(line, flush=True)


def random_model(name: str) -> nn.Module:
    config = MODELS[name]
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(DTYPE)
    nn.quantize(model, group_size=GROUP_SIZE, bits=BITS)
    mx.eval(model.parameters())
    return model


def bench_model(name: str, verify: vm.VerifyMatmul, rows_list: tuple[int, ...] = (1, 16)) -> list[dict[str, Any]]:
    start = time.perf_counter()
    model = random_model(name)
    print(f"{name}: random 4-bit model built in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for swapped in (False, True):
        if swapped:
            start = time.perf_counter()
            count = vm.apply(model, verify)
            print(f"{name}: apply swapped {count} layers in {time.perf_counter() - start:.1f} s "
                  f"(checks included)", flush=True)
        for rows in rows_list:
            tokens = mx.random.randint(0, MODELS[name]["vocab_size"], (1, rows))
            ms = vm.time_ms(lambda: model(tokens), calls=5, rounds=3)
            results.append({"shapes": name, "rows": rows, "swapped": swapped, "forward_ms": ms})
            print(f"{name}: forward of {rows:>2} rows, {'with' if swapped else 'without'} swap: {ms:8.3f} ms",
                  flush=True)
    del model
    mx.clear_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["135m", "8b"], choices=sorted(LAYERS))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--no-models", action="store_true", help="skip the whole-model forwards")
    parser.add_argument("--out", default="verify_matmul.json")
    args = parser.parse_args()

    verify = vm.VerifyMatmul(enabled=True)
    info = {"mlx": mx.__version__, "backend": verify.backend, "device": verify.device_name,
            "default_device": str(mx.default_device()), "kernels": verify.kernel is not None}
    print(json.dumps(info), flush=True)
    report: dict[str, Any] = {"info": info, "layers": [], "models": []}
    for name in args.shapes:
        report["layers"] += bench_layers(name, args.rows, verify)
    if not args.no_models:
        for name in args.shapes:
            report["models"] += bench_model(name, verify)
    report["decisions"] = [
        {"n": spec.n, "k": spec.k, "bits": spec.bits, "group_size": spec.group_size, "dtype": str(spec.x_dtype),
         "bucket": bucket, "tiling": str(d.tiling), "kernel_ms": d.kernel_ms, "reference_ms": d.reference_ms,
         "max_rel_error": d.max_rel_error, "reason": d.reason}
        for (spec, bucket), d in verify.decisions.items()]
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
