"""Block forwards at key lengths never seen before vs repeated ones, per attention path.

    python bench/attention_shapes.py [--dtype bfloat16] [--iters 30] [--out FILE.json]

A speculative cycle runs the target on a 16-row block and the draft on its block, and the key
length grows by the accepted count every cycle. Where a backend plans its attention kernel per
exact shape, every cycle pays a new plan. For each attention path (mx.fast fused; the explicit
composition in engine/model/attention.py; fused with the keys padded to a multiple of --pad; auto, which on
CUDA takes engine/backend/attention_kernel.py's kernel where its runtime check passes) this
times, on a random SmolLM2-135M-shaped target with packed projections and a 3-layer draft:
  verify_fresh   16-row target forward, then keep 3 rows (the next forward sees a new key length)
  verify_same    16-row target forward, then keep none (the same key length every time)
  decode         1-row target forward, kept
  draft_fresh    draft forward over 3 new context rows plus its 16-row block
Median and max ms per forward, each synced on its own.
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

from spec_cycle import random_draft  # noqa: E402

from engine.backend import attention_kernel
from engine.decode.drafters import DFlashDrafter  # noqa: E402
from engine.decode.sampling import SamplingParams, TokenRng  # noqa: E402
from engine.model import (
    attention,
    fused,  # noqa: E402
)
from engine.model import draft as draft_module  # noqa: E402
from engine.model.draft import build_target_layer_ids  # noqa: E402
from engine.model.target import Target  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def padded_attention(pad: int) -> Callable[..., mx.array]:
    """mx.fast attention with keys zero-padded to a multiple of `pad` and the padding masked out."""

    def attend(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: Any) -> mx.array:
        rows, length = queries.shape[2], keys.shape[2]
        if rows == 1:
            return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
        padded = -(-length // pad) * pad
        widths = [(0, 0), (0, 0), (0, padded - length), (0, 0)]
        keys, values = mx.pad(keys, widths), mx.pad(values, widths)
        positions = mx.arange(padded)[None]
        if isinstance(mask, str):  # causal: row i sees keys up to length - rows + i
            keep = positions <= mx.arange(length - rows, length)[:, None]
        elif mask is None:
            keep = mx.broadcast_to(positions < length, (rows, padded))
        else:
            keep = mx.pad(mask if mask.dtype == mx.bool_ else mask > -1e30,
                          [(0, 0)] * (mask.ndim - 1) + [(0, padded - length)], constant_values=False)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=keep)

    return attend


def random_target(dtype: mx.Dtype) -> Any:
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    args = ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                     num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                     rope_theta=1e5, tie_word_embeddings=True)
    model = Model(args)
    model.set_dtype(dtype)
    fused.fuse_projections(model)
    mx.eval(model.parameters())
    return model


def timed(fn: Callable[[], Any], iters: int) -> dict[str, float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "max_ms": max(times), "mean_ms": statistics.fmean(times)}


def measure(model: Any, draft: Any, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    target = Target(model, draft.config.target_layer_ids)
    prompt = mx.random.randint(0, 49152, (1, args.context), key=mx.random.key(1)).astype(mx.int32)
    block = mx.random.randint(0, 49152, (1, 16), key=mx.random.key(2)).astype(mx.int32)
    results: dict[str, dict[str, float]] = {}

    cache = target.make_cache()
    _, taps = target(prompt, cache, taps=True)
    mx.eval(taps, [c.state for c in cache])

    def verify(keep: int) -> Callable[[], Any]:
        def run() -> Any:
            logits, t = target(block, cache, taps=True)
            mx.eval(logits, t)
            target.trim(cache, 16 - keep)
            return logits
        return run

    mx.eval(verify(3)())  # warm-up
    results["verify_fresh"] = timed(verify(3), args.iters)
    results["verify_same"] = timed(verify(0), args.iters)
    results["decode"] = timed(lambda: target(block[:, :1], cache, taps=False)[0], args.iters)

    drafter = DFlashDrafter(draft, target)
    drafter.begin([0] * args.context, taps)
    new_taps = taps[:, :3]

    def propose() -> Any:
        return drafter.propose([1, 2, 3], new_taps, 15, GREEDY, TokenRng(0)).tokens

    mx.eval(propose())
    results["draft_fresh"] = timed(propose, args.iters)
    drafter.end()
    target.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--context", type=int, default=300, help="prompt tokens before the timed forwards")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--pad", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    model = random_target(dtype)
    with Target(model) as bare:
        draft = random_draft(bare, model, 16)
    draft.set_dtype(dtype)
    assert draft.config.target_layer_ids == build_target_layer_ids(30, 3)
    print(f"[attention] MLX {mx.__version__} {mx.default_device()} {mx.device_info().get('device_name', '')}, "
          f"{args.dtype}, context {args.context}")
    report: dict[str, Any] = {"mlx": mx.__version__, "device": str(mx.device_info().get("device_name", "")),
                              "dtype": args.dtype, "context": args.context, "paths": {}}
    paths: dict[str, Callable[[], None]] = {
        "fused": lambda: attention.set_mode("fused"),
        "unfused": lambda: attention.set_mode("unfused"),
        "auto": lambda: attention.set_mode("auto"),
        f"padded{args.pad}": lambda: setattr(fused, "block_attention", padded_attention(args.pad))
        or setattr(draft_module, "block_attention", padded_attention(args.pad)),
    }
    original = fused.block_attention
    for name, select in paths.items():
        attention.set_mode(None)
        fused.block_attention = draft_module.block_attention = original
        select()
        rows = measure(model, draft, args)
        report["paths"][name] = rows
        print(f"{name:<10} " + "  ".join(f"{k} {v['median_ms']:.2f} (max {v['max_ms']:.1f})" for k, v in rows.items()),
              flush=True)
    fused.block_attention = draft_module.block_attention = original
    report["kernel_decisions"] = attention_kernel.default_kernel().summary()
    for name, d in report["kernel_decisions"].items():
        print(f"[attention] kernel decision {name}: {d}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
