"""Where a step of batched training-data generation goes: forward, sampling, cache upkeep, host.

    python bench/generation.py [--model embedded] [--batch 1024] [--context 320] [--steps 20] [--out FILE]

`python -m engine.train generate` decodes a batch of prompts in lock-step (engine/train/generator.py).
This times, on a batched KV cache holding `--batch` rows of `--context` tokens, each part of one
decoding step on its own, every part synchronised (`mx.eval`) so that the times add up:
- the target's forward of one new token per row, split into the model body and the LM head;
- the greedy pick (log-softmax + argmax) and mlx-lm's top-p sampler (a full sort of the vocabulary);
- the host reading the tokens back (`tolist`) and the cache compaction (`filter`) of half the rows;
then a pipelined step (forward + sampling launched with `mx.async_eval`, as the generator runs) at
each batch size in `--sweep`, which gives the tok/s ceiling of a wave at that occupancy, with the
generator's padded decode hook (engine/train/generator.py) off and on.
On CUDA, one layer's attention through the padded kernel (kernels/block_attention.cu, each warp count)
is timed against mx.fast's with the bool mask (`sdpa_bool_mask_ms`), with its max relative difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median wall milliseconds of `fn` with its result evaluated, after two warm-ups."""
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def filled_cache(model: Any, batch: int, context: int, vocab: int) -> list[BatchKVCache]:
    """A batched cache of `batch` rows with `context` random tokens each (left padding varied as in a wave)."""
    padding = [(7 * i) % 64 for i in range(batch)]
    cache = [BatchKVCache(padding) for _ in make_prompt_cache(model)]
    tokens = mx.random.randint(0, vocab, (batch, context), dtype=mx.int32)
    for start in range(0, context, 256):
        model(tokens[:, start : start + 256], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def profile(model: Any, batch: int, context: int, reps: int, vocab: int) -> dict[str, float]:
    cache = filled_cache(model, batch, context, vocab)
    saved = [c.state for c in cache]
    tokens = mx.random.randint(0, vocab, (batch, 1), dtype=mx.int32)
    topp = make_sampler(temp=0.8, top_p=0.95)

    def rewind() -> None:
        for c, s in zip(cache, saved):
            c.state = s

    def forward() -> mx.array:
        rewind()
        return model(tokens, cache=cache)

    def body() -> mx.array:
        rewind()
        return model.model(tokens, cache=cache)

    hidden = body()
    mx.eval(hidden)
    logits = forward()[:, -1].astype(mx.float32)
    mx.eval(logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(logprobs)
    head = (lambda h: model.lm_head(h)) if hasattr(model, "lm_head") else (lambda h: model.model.embed_tokens.as_linear(h))
    picked = mx.argmax(logprobs, axis=-1)
    mx.eval(picked)
    keep = mx.array(list(range(0, batch, 2)), dtype=mx.int32)

    def compact() -> list[mx.array]:
        parts = []
        for c, s in zip(cache, saved):
            c.state = s
            c.filter(keep)
            parts.append(c.keys)
        rewind()
        return parts

    return {
        "forward_ms": median_ms(forward, reps),
        "body_ms": median_ms(body, reps),
        "lm_head_ms": median_ms(lambda: head(hidden), reps),
        "log_softmax_ms": median_ms(lambda: logits - mx.logsumexp(logits, axis=-1, keepdims=True), reps),
        "argmax_ms": median_ms(lambda: mx.argmax(logprobs, axis=-1), reps),
        "top_p_sample_ms": median_ms(lambda: topp(logprobs), reps),
        "tolist_ms": median_ms(lambda: picked.tolist() and picked, reps),
        "compact_half_ms": median_ms(compact, max(3, reps // 4)),
    }


def attention_parts(model: Any, batch: int, context: int, reps: int, vocab: int) -> dict[str, float]:
    """The model body with a plain (unpadded, unmasked) cache against the batched one, and one layer's
    attention and cache write on their own: which part of the body grows with the rows."""
    from mlx_lm.models.cache import KVCache

    plain = make_prompt_cache(model)
    tokens = mx.random.randint(0, vocab, (batch, context), dtype=mx.int32)
    for start in range(0, context, 256):
        model.model(tokens[:, start : start + 256], cache=plain)
        mx.eval([c.state for c in plain])
    saved = [c.state for c in plain]
    one = tokens[:, :1]

    def plain_body() -> mx.array:
        for c, s in zip(plain, saved):
            c.state = s
        return model.model(one, cache=plain)

    args = model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    dim = args.hidden_size // heads
    dtype = saved[0][0].dtype
    q = mx.random.normal((batch, heads, 1, dim)).astype(dtype)
    k = mx.random.normal((batch, kv_heads, context, dim)).astype(dtype)
    v = mx.random.normal((batch, kv_heads, context, dim)).astype(dtype)
    mask = mx.arange(context)[None, None, None, :] >= (mx.arange(batch) % 64)[:, None, None, None]
    buffer = mx.zeros((batch, kv_heads, context + 256, dim), dtype=dtype)
    new = mx.random.normal((batch, kv_heads, 1, dim)).astype(dtype)
    mx.eval(q, k, v, mask, buffer, new)
    sdpa = mx.fast.scaled_dot_product_attention

    def write() -> mx.array:
        nonlocal buffer
        buffer[..., context : context + 1, :] = new
        return buffer

    parts = {
        "plain_cache_body_ms": median_ms(plain_body, reps),
        "sdpa_no_mask_ms": median_ms(lambda: sdpa(q, k, v, scale=dim**-0.5), reps),
        "sdpa_bool_mask_ms": median_ms(lambda: sdpa(q, k, v, scale=dim**-0.5, mask=mask), reps),
        "cache_write_ms": median_ms(write, reps),
        "layers": len(model.model.layers),
    }
    from engine.backend.verify_matmul import detect_backend

    if detect_backend() == "cuda":
        start = (mx.arange(batch) % 64).astype(mx.int32)  # the mask's starts
        parts |= padded_kernel_parts(q, k, v, start, sdpa(q, k, v, scale=dim**-0.5, mask=mask), reps)
    return parts


def padded_kernel_parts(q: mx.array, k: mx.array, v: mx.array, start: mx.array, reference: mx.array,
                        reps: int) -> dict[str, float]:
    """One layer's padded decode attention through the CUDA kernel, per warp count, and its max relative
    difference from mx.fast's masked attention (`reference`)."""
    from engine.backend import attention_kernel as ak

    kernel = ak.BlockAttentionKernel()
    scale = q.shape[-1] ** -0.5
    parts = {}
    for warps in ak.DECODE_WARPS[q.shape[-1]]:
        out = kernel(q, k, v, scale, False, warps, start=start).astype(mx.float32)
        ref = reference.astype(mx.float32)
        parts[f"padded_kernel_w{warps}_max_rel_diff"] = (mx.max(mx.abs(out - ref)) / mx.max(mx.abs(ref))).item()
        parts[f"padded_kernel_w{warps}_ms"] = median_ms(lambda: kernel(q, k, v, scale, False, warps, start=start),
                                                        reps)
    return parts


WARMUP_STEPS = 3


def pipelined(model: Any, batch: int, context: int, steps: int, vocab: int, sampled: bool,
              hook: bool = False) -> float:
    """Milliseconds per step of forward + sampling launched ahead of the host, as the generator runs,
    after WARMUP_STEPS untimed steps; with `hook`, inside the generator's padded decode hook (a no-op off
    CUDA), so the warm-up runs under the same hook state as the timed steps."""
    from engine.train.generator import padded_decode_attention

    with padded_decode_attention(model) if hook else nullcontext():
        return _pipelined(model, batch, context, steps, vocab, sampled)


def _pipelined(model: Any, batch: int, context: int, steps: int, vocab: int, sampled: bool) -> float:
    cache = filled_cache(model, batch, context, vocab)
    sampler = make_sampler(temp=0.8, top_p=0.95) if sampled else (lambda lp: mx.argmax(lp, axis=-1))

    def step(y: mx.array) -> mx.array:
        logits = model(y[:, None], cache=cache)[:, -1].astype(mx.float32)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    def run(y: mx.array, n: int) -> mx.array:
        for _ in range(n):
            nxt = step(y)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        mx.eval(y)
        return y

    # untimed steps on the same path first: the first timed case of a run paid one-off compilation and
    # allocation (188-234 ms/step against 22-31 ms for the next cases on an H200)
    y = run(mx.zeros((batch,), dtype=mx.int32), WARMUP_STEPS)
    t0 = time.perf_counter()
    run(y, steps)
    return 1e3 * (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--context", type=int, default=320, help="tokens already in each row's cache")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="pipelined steps per batch size")
    parser.add_argument("--sweep", default="1,16,64,256,512,1024", help="batch sizes for the pipelined step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from engine.model.loader import load_model

    loaded = load_model(args.model, dequantize=mx.default_device() != mx.cpu)
    if mx.default_device() != mx.cpu:
        loaded.model.set_dtype(mx.bfloat16)
        mx.eval(loaded.model.parameters())
    model, vocab = loaded.model, loaded.tokenizer.vocab_size
    print(f"{loaded.description} on {mx.default_device()}, batch {args.batch}, context {args.context}")
    parts = profile(model, args.batch, args.context, args.reps, vocab)
    for name, ms in parts.items():
        print(f"  {name:>16}: {ms:8.2f} ms")
    if mx.default_device() != mx.cpu or args.batch <= 64:
        for name, value in attention_parts(model, args.batch, args.context, args.reps, vocab).items():
            parts[name] = value
            print(f"  {name:>20}: {value:8.2f}")
    sweep = []
    for b in [int(x) for x in args.sweep.split(",")]:
        for hook in (False, True):  # interleaved per batch size: same load for both
            greedy = pipelined(model, b, args.context, args.steps, vocab, sampled=False, hook=hook)
            sampled = pipelined(model, b, args.context, args.steps, vocab, sampled=True, hook=hook)
            sweep.append({"batch": b, "padded_kernel_hook": hook, "greedy_ms": greedy, "sampled_ms": sampled,
                          "greedy_tok_s": b / greedy * 1e3, "sampled_tok_s": b / sampled * 1e3})
            print(f"  pipelined batch {b:5d}, hook {'on ' if hook else 'off'}: greedy {greedy:7.2f} ms/step "
                  f"({b / greedy * 1e3:8.0f} tok/s), top-p {sampled:7.2f} ms/step ({b / sampled * 1e3:8.0f} tok/s)")
    from engine.backend.attention_kernel import default_kernel

    if decisions := default_kernel().summary():
        parts["kernel_decisions"] = decisions
        for name, decision in decisions.items():
            print(f"  kernel decision {name}: {decision}")
    if args.out:
        args.out.write_text(json.dumps({"device": str(mx.default_device()), "batch": args.batch,
                                        "context": args.context, "parts_ms": parts, "sweep": sweep}, indent=1))


if __name__ == "__main__":
    main()
