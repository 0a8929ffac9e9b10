"""The quantized CPU kernel (kernels/cpu_quant, engine/backend/cpu_quant.py) against MLX's float32 matmul.

    python bench/cpu_quant_matmul.py [--rows 1,2,4,8,16,32] [--decode] [--ops]

Builds the kernel as the server does (or finds it built), checks it, then times the 121 products of a
SmolLM2-135M decode step (q/k/v as one, o, gate/up as one, down, x30, and the LM head; 4-bit, the head
8-bit as in the embedded GGUF) through the kernel and through MLX's float32 matmul, in one process,
interleaved, at each row count. With --decode it also decodes bench.py's code, chat and math prompts
plainly with the embedded model as the server loads it (on the kernel) and as `--dequantize yes` loads it
(float32), interleaved, and says how far each greedy text agrees with float32's. With --ops it times the
served model's decode step, 16-row verify (300 tokens of context) and draft block with the kernel's
SwiGLU and RMSNorm on and off (fast_exp's and compiled_norm's formulas), interleaved in one process.
x86-64 with AVX-512 VNNI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backend.blas import maybe_reexec_with_blas  # noqa: E402
from regime import draft_call, forward_call, median_ms  # noqa: E402  bench/regime.py: this script's folder is on sys.path

# (N, K, bits) of the 135M decode step's products: packed q/k/v, o, packed gate/up, down (x30), the LM head
SHAPES = [(960, 576, 4), (576, 576, 4), (3072, 576, 4), (576, 1536, 4)] * 30 + [(49152, 576, 8)]


def products(ext: Any, mx: Any, rows: list[int]) -> None:
    from engine.backend.cpu_quant import random_layers

    layers = random_layers(SHAPES, np.random.default_rng(1))
    for m in rows:
        xs = {k: mx.random.normal((m, k)) for k in {k for _, k, _ in SHAPES}}
        mx.eval(xs)
        kernel, f32 = [], []
        for _ in range(3):  # interleaved: a slow moment of the machine hits both
            kernel.append(median_ms(lambda: mx.eval([ext.quant_matmul(xs[d.shape[0]], *p, n, 32) for p, n, d in layers]), 10))
            f32.append(median_ms(lambda: mx.eval([xs[d.shape[0]] @ d for _, _, d in layers]), 10))
        print(f"[cpu_quant] {m:2d} rows, the 121 products of a 135M step: kernel {min(kernel):6.2f} ms, "
              f"MLX float32 {min(f32):6.2f} ms ({min(f32) / min(kernel):.2f}x)", flush=True)


def decode(mx: Any) -> None:
    from bench import GREEDY, PROMPTS  # bench/bench.py
    from engine.decode.plain_decoder import PlainDecoder
    from engine.decode.sampling import TokenRng
    from engine.runtime.config import EngineConfig
    from engine.runtime.serving_model import load_target

    models = {}
    for label, dequantize in (("quantized CPU kernel", "auto"), ("float32", "yes")):
        loaded, prepared = load_target(EngineConfig(dequantize=dequantize))
        print(f"[cpu_quant] {label}: {prepared}", flush=True)
        models[label] = loaded
    tokenizer = models["float32"].tokenizer
    rates: dict[str, list[float]] = {label: [] for label in models}
    outputs: dict[tuple[str, str], list[int]] = {}
    for round_ in range(3):
        for prompt in ("code", "chat", "math"):
            ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[prompt]}]))
            for label, loaded in models.items():
                tokens: list[int] = []
                first = 0.0
                for step in PlainDecoder(loaded.model).generate(ids, GREEDY, 128, TokenRng(0)):
                    tokens += step.tokens
                    first = first or time.perf_counter()
                if round_:  # the first round warms up
                    rates[label].append((len(tokens) - 1) / (time.perf_counter() - first))
                outputs[(label, prompt)] = tokens
    for label, values in rates.items():
        print(f"[cpu_quant] plain decoding, {label}: {statistics.median(values):.2f} tok/s", flush=True)
    for prompt in ("code", "chat", "math"):
        a, b = outputs[("float32", prompt)], outputs[("quantized CPU kernel", prompt)]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"[cpu_quant] {prompt}: the kernel's greedy tokens equal float32's for {same} of {len(a)}: "
              f"{tokenizer.decode(b)[:60]!r}")


def ops(mx: Any) -> None:
    """--ops: the served model's forwards with the kernel's SwiGLU and norms, each on and off, interleaved."""
    from argparse import Namespace

    from bench import PROMPTS  # bench/bench.py
    from width_replay import load_target_and_draft

    from engine.backend import fast_exp
    from engine.decode.drafters import DFlashDrafter
    from engine.model import compiled_norm
    from engine.model.target import Target

    loaded, model, draft, prepared = load_target_and_draft(
        Namespace(model="embedded", draft=Path(__file__).resolve().parents[1] / "engine/drafts/smollm2-135m-instruct-dflash",
                  target_dtype="native"))
    print(f"[cpu_quant] {prepared}", flush=True)
    ext = fast_exp._cpu_kernel
    if ext is None:
        sys.exit("--ops: the served model does not run on the kernel here")
    target = Target(model, draft.config.target_layer_ids)
    ids = (list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS["code"]}])) * 8)[:300]
    cache = target.make_cache()
    _, taps = target(mx.array([ids]), cache, taps=True)
    mx.eval(taps)
    drafter = DFlashDrafter(draft, target)
    drafter.begin(ids, taps)

    settings = {"kernel SwiGLU and norms": (ext, ext), "kernel norms only": (None, ext),
                "kernel SwiGLU only": (ext, None), "neither": (None, None)}
    cases = {"decode step": forward_call(target, cache, 1), "16-row verify": forward_call(target, cache, 16),
             "draft block": draft_call(drafter, ids, taps, 1)}
    ms: dict[tuple[str, str], list[float]] = {}
    for _ in range(3):  # interleaved: a slow moment of the machine hits every setting
        for setting, (swiglu, norm) in settings.items():
            fast_exp.use_cpu_kernel(swiglu)
            compiled_norm.use_cpu_kernel(norm)
            for case, fn in cases.items():
                ms.setdefault((setting, case), []).append(median_ms(fn, 20))
    fast_exp.use_cpu_kernel(ext)
    compiled_norm.use_cpu_kernel(ext)
    for setting in settings:
        print(f"[cpu_quant] {setting:<24} " + ", ".join(f"{case} {min(ms[(setting, case)]):6.2f} ms" for case in cases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32", help="comma list of activation rows")
    parser.add_argument("--decode", action="store_true", help="also decode with the embedded model, kernel vs float32")
    parser.add_argument("--ops", action="store_true", help="also time the served model's forwards with the kernel's "
                        "SwiGLU and norms on and off")
    args = parser.parse_args()
    maybe_reexec_with_blas()
    import mlx.core as mx

    from engine.backend import cpu_quant

    cpu_quant.unsupported_here()
    ext = cpu_quant.load_extension()
    print(f"[cpu_quant] numerics: max relative error {cpu_quant.max_rel_error(ext):.2e} on int8-exact activations "
          f"(limit {cpu_quant.MAX_REL_ERROR:g}; inf would mean a row differs from the same row alone)", flush=True)
    products(ext, mx, [int(r) for r in args.rows.split(",")])
    if args.decode:
        decode(mx)
    if args.ops:
        ops(mx)


if __name__ == "__main__":
    main()
