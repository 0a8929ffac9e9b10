"""Plain greedy decode speed of the embedded model: quantized vs float32, our loop vs mlx_lm.

    python bench/decode_speed.py                      # whatever BLAS is loaded now
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python bench/decode_speed.py

Not a test: no re-exec here, so the BLAS is exactly what the command line preloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step, stream_generate  # noqa: E402

from engine.blas import blas_status  # noqa: E402
from engine.loader import LoadedModel, load_model  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def loop_speed(model: nn.Module, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill seconds, decode tok/s) of a bare generate_step loop that ignores EOS."""
    start = time.perf_counter()
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    next(steps)
    first = time.perf_counter()
    count = sum(1 for _ in steps)
    return first - start, count / (time.perf_counter() - first)


def stream_speed(loaded: LoadedModel, prompt: list[int], n: int) -> tuple[int, float]:
    """(tokens generated, mlx_lm's own generation tok/s); stream_generate stops at EOS."""
    last = None
    for last in stream_generate(loaded.model, loaded.tokenizer.hf, prompt, max_tokens=n):
        pass
    return last.generation_tokens, last.generation_tps


def run(dequantize: bool, tokens: int) -> None:
    loaded = load_model("smollm2", dequantize=dequantize)
    prompt = loaded.tokenizer.apply_chat_template(PROMPT)
    loop_speed(loaded.model, prompt, 4)  # warm-up
    prefill, tps = loop_speed(loaded.model, prompt, tokens)
    count, stream_tps = stream_speed(loaded, prompt, tokens)
    label = "float32 (dequantized)" if dequantize else "Q4_1 (MLX quantized)"
    print(f"{label:24s} generate_step loop: {tps:6.1f} tok/s (prefill {len(prompt)} tok in {prefill * 1e3:.0f} ms)"
          f" | mlx_lm.stream_generate: {stream_tps:6.1f} tok/s over {count} tok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"MLX {mx.__version__} on {mx.default_device()}; BLAS: {blas_status()}")
    for dequantize in (False, True):
        run(dequantize, args.tokens)


if __name__ == "__main__":
    main()
