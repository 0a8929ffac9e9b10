"""DFlash 2's selector walk: on the device (engine.model.draft.walk_lattice, lazy, no sync) against one host walk.

Times what a cycle adds for the walk after the draft's LM-head rows exist: the top-K, the K x K lattice and
the walk, with random weights at a target's sizes. `device`: the whole walk is in the graph and evaluated
with the tokens; `host`: the lattice is evaluated (the sync a host walk needs) and walked in NumPy; `argmax`:
DFlash 1's per-slot argmax over the same logits, for scale.

  python bench/selector_walk.py                   # the embedded SmolLM2 shape and Qwen3.8-27B's (CPU here)
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from engine.model.draft import CandidateSelector, walk_lattice
from engine.model.transposed import transpose_linears

SHAPES = {"smollm2-135m": (576, 49152), "qwen3.8-27b": (5120, 248320)}


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--slots", type=int, default=15, help="drafted slots per block (block size - 1)")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    from engine.backend.blas import blas_status, maybe_reexec_with_blas

    maybe_reexec_with_blas()  # as the server: may replace the process; no-op on a GPU
    print(blas_status() if mx.default_device() == mx.cpu else "", end=", ")
    print(f"MLX {mx.__version__} {mx.default_device()}, {args.slots} slots, rank {args.rank}, top-{args.top_k}")
    for name in args.shapes.split(","):
        hidden_size, vocab = SHAPES[name]
        mx.random.seed(0)
        selector = CandidateSelector(hidden_size, vocab, args.rank, args.top_k)
        selector.successor_codebook = 0.02 * mx.random.normal(selector.successor_codebook.shape)
        if mx.default_device() == mx.cpu:  # as a loaded draft: its float32 matrices stored transposed
            transpose_linears(selector)
        hidden = mx.random.normal((args.slots, hidden_size))
        logits = mx.random.normal((args.slots, vocab))
        mx.eval(selector.parameters(), hidden, logits)

        def device() -> None:
            ids, scores = selector.lattice(hidden, logits, 7)
            picked, _ = walk_lattice(scores)
            mx.eval(mx.take_along_axis(ids, picked[:, None], axis=-1))

        def host() -> None:
            ids, scores = selector.lattice(hidden, logits, 7)
            mx.eval(ids, scores)
            ids_np, s = np.array(ids), np.array(scores)
            i, tokens = 0, []
            for t in range(args.slots):
                i = int(np.argmax(s[t, i]))
                tokens.append(int(ids_np[t, i]))

        def argmax() -> None:
            mx.eval(mx.argmax(logits, axis=-1))

        row = {k: median_ms(f, args.repeat) for k, f in (("device", device), ("host", host), ("argmax", argmax))}
        print(f"{name:>14} (H {hidden_size}, V {vocab}): walk on the device {row['device']:.3f} ms, "
              f"host walk {row['host']:.3f} ms (one extra sync in the cycle), DFlash 1 argmax {row['argmax']:.3f} ms")


if __name__ == "__main__":
    main()
