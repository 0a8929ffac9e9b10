"""Plain greedy decode speed of the embedded model: quantized vs float32, unfused vs packed
projections (engine/model/fused.py), our PlainDecoder vs mlx_lm's generate_step loop.

    python bench/decode_speed.py                      # whatever BLAS is loaded now
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python bench/decode_speed.py

Not a test: no re-exec here, so the BLAS is exactly what the command line preloaded.
The settings of one weight format run interleaved, round after round, and the fastest round
of each is kept: the CPU is shared, and the minimum time is the stable estimate.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from engine.backend.blas import blas_status  # noqa: E402
from engine.decode.plain_decoder import PlainDecoder  # noqa: E402
from engine.decode.sampling import SamplingParams, TokenRng  # noqa: E402
from engine.model.fused import fuse_projections  # noqa: E402
from engine.model.loader import load_model  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
GREEDY = SamplingParams(temperature=0.0)


def mlx_lm_speed(model: nn.Module, prompt: list[int], n: int) -> float:
    """Decode tok/s of mlx_lm's bare generate_step loop (ignores EOS), first token excluded."""
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    next(steps)
    first = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - first)


def ours_speed(model: nn.Module, prompt: list[int], n: int) -> float:
    """Decode tok/s of our PlainDecoder (what the server runs without a draft), first token excluded."""
    count, first = 0, 0.0
    for step in PlainDecoder(model).generate(prompt, GREEDY, n, TokenRng(0)):
        if step.tokens and not count:
            first = time.perf_counter()
        count += len(step.tokens)
    return (count - 1) / (time.perf_counter() - first)


def run(dequantize: bool, tokens: int, rounds: int) -> None:
    unfused = load_model("smollm2", dequantize=dequantize)
    fused = load_model("smollm2", dequantize=dequantize).model
    num_fused = fuse_projections(fused)
    prompt = unfused.tokenizer.apply_chat_template(PROMPT)
    loops: dict[str, Callable[[nn.Module, list[int], int], float]] = {"mlx_lm": mlx_lm_speed, "ours": ours_speed}
    models = {"unfused": unfused.model, f"fused ({num_fused} layers)": fused}
    best: dict[tuple[str, str], float] = {}
    for speed in loops.values():
        for model in models.values():
            speed(model, prompt, 4)  # warm-up
    for _ in range(rounds):
        for loop, speed in loops.items():
            for name, model in models.items():
                best[loop, name] = max(best.get((loop, name), 0.0), speed(model, prompt, tokens))
    label = "float32 (dequantized)" if dequantize else "Q4_1 (MLX quantized)"
    for (loop, name), tps in best.items():
        print(f"{label:22s} {loop:7s} {name:19s} {tps:6.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest is kept")
    parser.add_argument("--float32-only", action="store_true", help="skip the (slow) quantized rows")
    args = parser.parse_args()
    print(f"MLX {mx.__version__} on {mx.default_device()}; BLAS: {blas_status()}; "
          f"{args.tokens} tokens greedy, best of {args.rounds} interleaved rounds")
    for dequantize in (True,) if args.float32_only else (False, True):
        run(dequantize, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
