"""llama.cpp on the same GGUF: greedy decode tok/s of bench.py's prompts, the CPU user's alternative.

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
        pip install llama-cpp-python==0.3.36          # a source build, ~8 minutes on 2 cores
    python bench/llama_cpp_speed.py [--model PATH.gguf] [--threads 2] [--max-tokens 128] [--rounds 2]

Each prompt goes through llama-cpp-python's chat completion (the GGUF's own chat template), greedy,
with EOS banned so every answer has --max-tokens tokens, streamed; tok/s counts from the first token
to the last, as bench.py does, over the rounds after a warm-up round. No MLX here: run it beside
bench.py's plain and speculative rows on an otherwise idle machine. (With GGML_NATIVE=ON the build
on a Sapphire Rapids container crashed at the first decode, so the flags above name the ISA.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import PROMPTS  # bench/bench.py: this script's folder is on sys.path
from engine.model.loader import embedded_model_path  # noqa: E402


def decode_rate(chunks: Iterator[dict[str, Any]]) -> tuple[float, int, float]:
    """(tok/s from the first content chunk to the last, content chunks, seconds to the first one)."""
    start = time.perf_counter()
    first = last = None
    count = 0
    for chunk in chunks:
        if chunk["choices"][0]["delta"].get("content") is None:
            continue
        last = time.perf_counter()
        first = first or last
        count += 1
    if first is None or count < 2:
        raise RuntimeError("fewer than two tokens came back")
    return (count - 1) / (last - first), count, first - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after a warm-up round")
    parser.add_argument("--prompts", default=",".join(PROMPTS), help=f"comma list of {', '.join(PROMPTS)}")
    args = parser.parse_args()
    from llama_cpp import Llama  # not a dependency: see the docstring

    path = args.model or embedded_model_path()
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    print(f"[llama.cpp] llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, {path.name}, "
          f"{args.threads} threads", flush=True)
    rates: list[float] = []
    for round_ in range(args.rounds + 1):
        for name in args.prompts.split(","):
            llm.reset()
            chunks = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPTS[name]}],
                                                max_tokens=args.max_tokens, temperature=0.0,
                                                logit_bias={llm.token_eos(): -1e9}, stream=True)
            rate, count, ttft = decode_rate(chunks)
            if round_:
                rates.append(rate)
            print(f"[llama.cpp] round {round_} {name}: {rate:.1f} tok/s, {count} tokens, TTFT {ttft * 1e3:.0f} ms"
                  f"{'' if round_ else ' (warm-up)'}", flush=True)
    print(f"[llama.cpp] median {statistics.median(rates):.2f} tok/s over {len(rates)} runs")


if __name__ == "__main__":
    main()
