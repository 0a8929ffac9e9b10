"""A 4-bit matmul for MLX's CPU backend (kernels/cpu_q4, an MLX C++ extension) against MLX's float32 product.

    pip install nanobind==3.1.0            # the version MLX 0.32.4's bindings use (cmake and g++ from the system)
    python bench/cpu_q4_matmul.py [--rows 1,4,16] [--decode] [--build-dir DIR]

Builds kernels/cpu_q4 with CMake against the installed mlx wheel (its headers and CMake config), then:
checks the kernel (exact where the activations are exactly int8 per block; each row equal, bit for
bit, to the same row computed alone; the int8 rounding's error on normal activations), and times the
121 products of a SmolLM2-135M decode step (q/k/v as one, o, gate/up as one, down, x30, and the LM
head) through the extension and through MLX's float32 matmul, in one process, interleaved. With
--decode it also decodes bench.py's code, chat and math prompts plainly with the embedded model's
linear layers run by the kernel (as loaded; as the server prepares them; and with the tied LM head
too) beside the float32 model as loaded and as the server prepares it. x86-64 with AVX-512 VNNI
only. Not used by the server: a measurement of what a 4-bit CPU path would buy (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backend.blas import maybe_reexec_with_blas  # noqa: E402
from regime import median_ms  # noqa: E402  bench/regime.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = np.dtype([("d", "<f4"), ("m", "<f4"), ("qs", "u1", (16,))])  # kernels/cpu_q4/q4_matmul.cpp's BlockQ4
# (N, K) of the 135M decode step's products: packed q/k/v, o, packed gate/up, down (x30), the LM head
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def build(build_dir: Path) -> Any:
    """Configure and build the extension (once per build dir), then import it."""
    build_dir.mkdir(parents=True, exist_ok=True)
    if not list(build_dir.glob("_cpu_q4*.so")):
        for cmd in (["cmake", "-S", str(ROOT / "kernels" / "cpu_q4"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython_EXECUTABLE={sys.executable}"], ["cmake", "--build", str(build_dir), "-j2"]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    sys.path.insert(0, str(build_dir))
    return importlib.import_module("_cpu_q4")


def q4_blocks(w: np.ndarray) -> np.ndarray:
    """(N, K) float32 -> (N, K / 32 * 24) uint8 Q4_1 blocks: min and step per 32, exact for weights that were Q4_1."""
    n, k = w.shape
    groups = w.reshape(n, k // 32, 32)
    low, high = groups.min(-1), groups.max(-1)
    step = (high - low) / 15.0
    safe = np.where(step > 0, step, 1.0)
    q = np.clip(np.rint((groups - low[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    blocks = np.zeros((n, k // 32), dtype=BLOCK)
    blocks["d"], blocks["m"], blocks["qs"] = step, low, q[..., :16] | (q[..., 16:] << 4)
    return blocks.view(np.uint8).reshape(n, k // 32 * 24)


def check(ext: Any, mx: Any) -> None:
    rng = np.random.default_rng(0)
    n, k = 256, 576
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # every block spans 0..15, so q4_blocks gives back these steps and minima
    w = (q * (rng.random((n, k // 32)) * 0.02 + 0.001)[..., None] - (rng.random((n, k // 32)) * 0.1)[..., None])
    w = w.reshape(n, k).astype(np.float32)
    blocks = mx.array(q4_blocks(w))
    xi = rng.integers(-127, 128, (4, k))
    xi[:, ::32] = 127  # each block's largest magnitude: its int8 scale is exactly 0.01
    x = (xi * 0.01).astype(np.float32)
    exact = np.abs(np.array(ext.q4_matmul(mx.array(x), blocks)) - x.astype(np.float64) @ w.T.astype(np.float64))
    normal = rng.standard_normal((16, k)).astype(np.float32)
    many = np.array(ext.q4_matmul(mx.array(normal), blocks))
    alone = np.stack([np.array(ext.q4_matmul(mx.array(normal[i : i + 1]), blocks))[0] for i in range(16)])
    ref = normal.astype(np.float64) @ w.T.astype(np.float64)
    print(f"[cpu_q4] exact int8 activations: max error {exact.max():.2e}; 16 rows equal each row alone: "
          f"{np.array_equal(many, alone)}; normal activations: mean relative error "
          f"{np.abs(many - ref).mean() / np.abs(ref).mean():.2%} (the int8 rounding)", flush=True)


def products(ext: Any, mx: Any, rows: list[int]) -> None:
    rng = np.random.default_rng(1)
    blocks = [mx.array(q4_blocks(rng.standard_normal((n, k), dtype=np.float32))) for n, k in SHAPES]
    dense = [mx.random.normal((k, n)) for n, k in SHAPES]
    mx.eval(blocks, dense)
    for m in rows:
        xs = {k: mx.random.normal((m, k)) for k in {k for _, k in SHAPES}}
        mx.eval(xs)
        q4, f32 = [], []
        for _ in range(3):  # interleaved: a slow moment of the machine hits both
            q4.append(median_ms(lambda: mx.eval([ext.q4_matmul(xs[b.shape[1] // 24 * 32], b) for b in blocks]), 10))
            f32.append(median_ms(lambda: mx.eval([xs[d.shape[0]] @ d for d in dense]), 10))
        print(f"[cpu_q4] {m:2d} rows, the 121 products of a 135M step: q4 extension {min(q4):6.2f} ms, "
              f"MLX float32 {min(f32):6.2f} ms ({min(f32) / min(q4):.2f}x)", flush=True)


def decode(ext: Any, mx: Any) -> None:
    import mlx.nn as nn

    from bench import GREEDY, PROMPTS  # bench/bench.py
    from engine.decode.plain_decoder import PlainDecoder
    from engine.decode.sampling import TokenRng
    from engine.model.loader import load_model
    from engine.model.transposed import TransposedLinear
    from engine.runtime.serving_model import prepare_model

    class Q4Linear(nn.Module):
        def __init__(self, linear: nn.Linear | TransposedLinear) -> None:
            super().__init__()
            weight = linear.weight_t.T if isinstance(linear, TransposedLinear) else linear.weight  # (out, in)
            self.blocks = mx.array(q4_blocks(np.array(weight, dtype=np.float32)))
            self.bias = linear.get("bias")
            self.freeze()

        def __call__(self, x: Any) -> Any:
            y = ext.q4_matmul(x.astype(mx.float32), self.blocks)
            return y if self.bias is None else y + self.bias

    def served(swap: bool, head: bool = False) -> nn.Module:
        """The embedded model as the server prepares it, its layers' products (and the tied LM head) by the kernel."""
        model = load_model("embedded", dequantize=True).model
        prepare_model(model, fuse=True)
        if swap:
            swap_layers(model)
        if head:  # tied: the LM head multiplies by the embedding's (dims, vocab) transpose
            embedding = model.model.embed_tokens
            blocks = mx.array(q4_blocks(np.array(embedding.weight_t.T, dtype=np.float32)))
            object.__setattr__(embedding, "as_linear", lambda x: ext.q4_matmul(x.astype(mx.float32), blocks))
        return model

    def swap_layers(model: nn.Module) -> nn.Module:
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.children().items()):
                    if isinstance(child, (nn.Linear, TransposedLinear)):
                        setattr(parent, name, Q4Linear(child))
        return model

    loaded = load_model("embedded", dequantize=True)
    models = {"float32 as loaded": loaded.model, "float32 as served": served(False),
              "q4 extension, unprepared": swap_layers(load_model("embedded", dequantize=True).model),
              "q4 extension, as served": served(True), "q4 extension, as served, LM head too": served(True, head=True)}
    rates: dict[str, list[float]] = {label: [] for label in models}
    outputs: dict[tuple[str, str], list[int]] = {}
    for round_ in range(3):
        for prompt in ("code", "chat", "math"):
            ids = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[prompt]}]))
            for label, model in models.items():
                tokens: list[int] = []
                first = 0.0
                for step in PlainDecoder(model).generate(ids, GREEDY, 128, TokenRng(0)):
                    tokens += step.tokens
                    first = first or time.perf_counter()
                if round_:  # the first round warms up
                    rates[label].append((len(tokens) - 1) / (time.perf_counter() - first))
                outputs[(label, prompt)] = tokens
    for label, values in rates.items():
        print(f"[cpu_q4] plain decoding, {label}: {statistics.median(values):.2f} tok/s", flush=True)
    for label in ("q4 extension, as served", "q4 extension, as served, LM head too"):
        for prompt in ("code", "chat", "math"):
            a, b = outputs[("float32 as served", prompt)], outputs[(label, prompt)]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            print(f"[cpu_q4] {label}, {prompt}: greedy tokens equal float32's for {same} of {len(a)}: "
                  f"{loaded.tokenizer.decode(b)[:60]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16", help="comma list of activation rows")
    parser.add_argument("--decode", action="store_true", help="also decode with the embedded model's layers swapped")
    parser.add_argument("--build-dir", type=Path, default=Path.home() / ".cache" / "dflash-server" / "cpu_q4-build")
    args = parser.parse_args()
    maybe_reexec_with_blas()
    import mlx.core as mx

    ext = build(args.build_dir)
    check(ext, mx)
    products(ext, mx, [int(r) for r in args.rows.split(",")])
    if args.decode:
        decode(ext, mx)


if __name__ == "__main__":
    main()
