"""What rolling back a hybrid (Gated DeltaNet + attention) target costs, against one verify.

    python bench/rollback_cost.py [--shapes tiny 0.8b] [--block 16] [--context 256] [--repeats 10]

For a qwen3_5-shaped target with random weights, times one verify forward of B rows (the
Target records its GDN inputs), then `Target.trim` back to a = 0, B/2, B-2, B-1 accepted
drafts (a+1 rows kept; a = B-1 keeps everything, so it is skipped), each finished with
mx.eval of every cache array. Next to it, for the GDN states only: two "innovation tape"
replays (dflash-mlx, spec §2.4) from a tape computed outside the timing, per step
(S <- g S + delta k^T, as the dflash-mlx kernel does) and in closed form (one batched
matmul); the tape itself would have to come out of the verify forward's recurrence, whose
cost is not counted. And a loop-free recompute that needs no tape (the innovations solve a
small triangular system). Each alternative is checked against the shipped recompute first.
Runs on whatever device MLX defaults to (CPU here, with MKL or OpenBLAS as the server; Metal or CUDA elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backend.blas import blas_status, maybe_reexec_with_blas  # noqa: E402
from engine.model.recurrent_rollback import RecurrentCache, StepRecord  # noqa: E402
from engine.model.target import Target  # noqa: E402

# Dims of the published Qwen3.5 text configs as we recall them (random weights; unverified
# against the hub here); "tiny" is the test model's shape.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 96, "linear_num_value_heads": 4,
             "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
             "full_attention_interval": 2},
    "0.8b": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 3584, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 248320, "linear_num_value_heads": 16,
             "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
             "full_attention_interval": 4},
    "4b": {"hidden_size": 2560, "num_hidden_layers": 32, "intermediate_size": 9216, "num_attention_heads": 16,
           "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 248320, "linear_num_value_heads": 32,
           "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
           "full_attention_interval": 4},
}


def build_model(shape: str, dtype: mx.Dtype) -> nn.Module:
    from mlx_lm.models.qwen3_5 import Model, ModelArgs

    config = {"model_type": "qwen3_5", "rms_norm_eps": 1e-6, "linear_conv_kernel_dim": 4,
              "tie_word_embeddings": True, "max_position_embeddings": 32768, **SHAPES[shape]}
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    # mlx-lm keeps A_log in float32 (its cast_predicate)
    model.update(tree_map_with_path(lambda path, w: w if path.endswith("A_log") else w.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def _evaluate(cache: list[Any]) -> None:
    mx.eval([c.state for c in cache])


def _median_ms(run: Callable[[], None], setup: Callable[[], None], repeats: int) -> float:
    times = []
    for i in range(repeats + 1):  # the first run warms up
        setup()
        start = time.perf_counter()
        run()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_tape(record: StepRecord) -> tuple[mx.array, mx.array, mx.array]:
    """(delta (B, S, Hv, Dv), k (B, S, Hv, Dk), g (B, S, Hv)) float32, from the recorded inputs."""
    from mlx_lm.models.gated_delta import compute_g

    args = record.update_args
    k, v, beta = args["k"], args["v"], mx.sigmoid(args["b"])
    g = compute_g(args["A_log"], args["a"], args["dt_bias"]).astype(mx.float32)  # (B, S, Hv)
    k = mx.repeat(k, v.shape[2] // k.shape[2], axis=2).astype(mx.float32)  # (B, S, Hv, Dk)
    state = args["state"].astype(mx.float32)  # (B, Hv, Dv, Dk)
    deltas = []
    for t in range(k.shape[1]):
        state = state * g[:, t, :, None, None]
        delta = (v[:, t] - (state * k[:, t, :, None, :]).sum(-1)) * beta[:, t, :, None]  # (B, Hv, Dv)
        state = state + delta[..., None] * k[:, t, :, None, :]
        deltas.append(delta)
    return mx.stack(deltas, axis=1), k, g


def replay_steps(state: mx.array, tape: tuple[mx.array, mx.array, mx.array], steps: int) -> mx.array:
    delta, k, g = tape
    for t in range(steps):
        state = state * g[:, t, :, None, None] + delta[:, t, :, :, None] * k[:, t, :, None, :]
    return state


def replay_closed_form(state: mx.array, tape: tuple[mx.array, mx.array, mx.array], steps: int) -> mx.array:
    """S_n = (prod g) S_0 + sum_t (prod_{s>t} g_s) delta_t k_t^T, as one batched matmul."""
    delta, k, g = (x[:, :steps] for x in tape)
    later = mx.cumprod(g, axis=1, reverse=True, inclusive=False)  # (B, n, Hv)
    total = mx.prod(g, axis=1)[..., None, None]  # (B, Hv, 1, 1)
    weighted = (k * later[..., None]).transpose(0, 2, 1, 3)  # (B, Hv, n, Dk)
    return total * state + delta.transpose(0, 2, 3, 1) @ weighted  # (B, Hv, Dv, Dk)


def recompute_parallel(record: StepRecord, steps: int) -> mx.array:
    """The recompute without a step loop (no tape): the innovations solve a unit lower-triangular
    system, delta_t + beta_t sum_{s<t} (gamma_t/gamma_s) (k_t.k_s) delta_s = beta_t (v_t - gamma_t S_0 k_t),
    inverted as a product of (I + N^(2^i)) since N is nilpotent; then the closed-form replay."""
    from mlx_lm.models.gated_delta import compute_g

    args = record.update_args
    k, v, state = args["k"][:, :steps], args["v"][:, :steps], args["state"].astype(mx.float32)
    k = mx.repeat(k, v.shape[2] // k.shape[2], axis=2).astype(mx.float32).transpose(0, 2, 1, 3)  # (B, Hv, n, Dk)
    v = v.astype(mx.float32).transpose(0, 2, 1, 3)  # (B, Hv, n, Dv)
    beta = mx.sigmoid(args["b"][:, :steps]).astype(mx.float32).transpose(0, 2, 1)[..., None]  # (B, Hv, n, 1)
    log_g = mx.log(compute_g(args["A_log"], args["a"][:, :steps], args["dt_bias"])).transpose(0, 2, 1)  # (B, Hv, n)
    cum = mx.cumsum(log_g, axis=-1)  # log gamma_t
    below = mx.tril(mx.ones((steps, steps), dtype=mx.bool_), k=-1)
    ratio = mx.exp(mx.where(below, cum[..., :, None] - cum[..., None, :], -mx.inf))  # (B, Hv, n, n)
    nilpotent = beta * ratio * (k @ k.swapaxes(-1, -2))  # strictly lower
    rhs = beta * (v - mx.exp(cum)[..., None] * (k @ state.swapaxes(-1, -2)))  # (B, Hv, n, Dv)
    power = -nilpotent
    delta = rhs + power @ rhs
    for _ in range(max(steps - 1, 1).bit_length() - 1):
        power = power @ power
        delta = delta + power @ delta
    later = mx.exp(cum[..., -1:] - cum)[..., None]  # (B, Hv, n, 1): gamma_n / gamma_t
    return mx.exp(cum[..., -1])[..., None, None] * state + delta.swapaxes(-1, -2) @ (later * k)


def bench_shape(shape: str, block: int, context: int, repeats: int, dtype: mx.Dtype) -> None:
    model = build_model(shape, dtype)
    target = Target(model)
    cache = target.make_cache()
    vocab = SHAPES[shape]["vocab_size"]
    prompt = mx.random.randint(0, vocab, (1, context))
    target(prompt, cache, taps=False)
    _evaluate(cache)
    rows = mx.random.randint(0, vocab, (1, block))

    def verify() -> None:
        logits, _ = target(rows, cache, taps=False)
        mx.eval(logits)
        _evaluate(cache)

    def back_to_context() -> None:  # the rows left by the last verify all come from its record
        target.trim(cache, target.cache_length(cache) - context)
        _evaluate(cache)

    def verify_again() -> None:
        back_to_context()
        verify()

    verify_ms = _median_ms(verify, back_to_context, repeats)
    plain_ms = _plain_verify_ms(model, prompt, rows, repeats)
    gdn = [c for c in cache if isinstance(c, RecurrentCache)]
    print(f"\n[{shape}] {mx.default_device()} {dtype}, {len(gdn)} GDN + {len(cache) - len(gdn)} attention layers, "
          f"context {context}, verify B={block}: {verify_ms:.2f} ms (mlx-lm's own forward, no recording: {plain_ms:.2f} ms)")
    columns = ("recompute (shipped)", "tape, per step", "tape, closed form", "recompute, loop-free")
    print(f"{'a':>3} {'kept':>4} " + " ".join(f"{c:>26}" for c in columns) + "   (ms, share of one verify)")
    for accepted in sorted({0, block // 2, block - 2, block - 1}):
        kept = accepted + 1
        shipped = _median_ms(lambda n=block - kept: (target.trim(cache, n), _evaluate(cache)), verify_again, repeats)
        others = _alternatives_ms(gdn, kept, repeats) if kept < block else [0.0] * 3  # a = B-1: nothing to undo
        cells = " ".join(f"{ms:>17.3f} {ms / verify_ms:>8.1%}" for ms in [shipped, *others])
        print(f"{accepted:>3} {kept:>4} {cells}")
    target.close()


def _plain_verify_ms(model: nn.Module, prompt: mx.array, rows: mx.array, repeats: int) -> float:
    from mlx_lm.models.cache import ArraysCache, make_prompt_cache

    cache = make_prompt_cache(model)
    model(prompt, cache=cache)
    _evaluate(cache)
    snapshot = [list(c.cache) if isinstance(c, ArraysCache) else c.offset for c in cache]

    def restore() -> None:  # a KVCache keeps its buffer (rows get overwritten); an ArraysCache takes back its arrays
        for c, saved in zip(cache, snapshot):
            if isinstance(c, ArraysCache):
                c.cache = list(saved)
            else:
                c.offset = saved

    def run() -> None:
        mx.eval(model(rows, cache=cache))
        _evaluate(cache)

    return _median_ms(run, restore, repeats)


def _alternatives_ms(gdn: list[RecurrentCache], kept: int, repeats: int) -> list[float]:
    """Tape replays (per step, closed form) and the loop-free recompute of `kept` steps over
    every GDN layer, each checked against the shipped recompute first."""
    records = [c.record for c in gdn]
    tapes = [make_tape(r) for r in records]
    starts = [r.update_args["state"].astype(mx.float32) for r in records]
    mx.eval(tapes, starts)
    runs = {
        "tape steps": lambda i: replay_steps(starts[i], tapes[i], kept),
        "tape closed": lambda i: replay_closed_form(starts[i], tapes[i], kept),
        "parallel": lambda i: recompute_parallel(records[i], kept),
    }
    for i, record in enumerate(records):
        want = record.state_after(kept)[1].astype(mx.float32)
        for name, run in runs.items():
            assert mx.allclose(run(i), want, rtol=2e-2, atol=2e-2).item(), f"{name} disagrees with the recompute"
    return [_median_ms(lambda run=run: mx.eval([run(i) for i in range(len(records))]), lambda: None, repeats)
            for run in runs.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "0.8b"], choices=sorted(SHAPES))
    parser.add_argument("--block", type=int, default=16, help="verify rows B (the anchor plus B-1 drafts)")
    parser.add_argument("--context", type=int, default=256, help="tokens in the cache before the verify")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on the CPU, bfloat16 on a GPU")
    args = parser.parse_args()
    maybe_reexec_with_blas()  # as the server runs on Linux CPUs; a no-op elsewhere
    print(f"[bench] MLX {mx.__version__} {mx.default_device()}, {blas_status()}")
    dtype = getattr(mx, args.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16"))
    for shape in args.shapes:
        bench_shape(shape, args.block, args.context, args.repeats, dtype)


if __name__ == "__main__":
    main()
