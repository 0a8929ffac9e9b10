"""Device time per kernel of a served model's forwards on a CUDA GPU, against their wall time.

    python bench/kernel_profile.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --draft engine/drafts/smollm2-135m-instruct-dflash --target-dtype bfloat16 [--calls 20] [--batch 2,4] \
        [--tree 8,32] [--out FILE]

Needs PyTorch with CUDA beside MLX: torch.profiler's CUPTI tracing records every kernel launched in the
process, MLX's included. For a 1-row decode step (without and with the draft's taps: a speculative
decoder's width-0 step keeps them), a 3- and a 16-row verify forward (with taps), the draft at 15 kept rows, a batched decode step of each `--batch` size (the server's
continuous batching: one row per request) and, for each `--tree` budget, a tree cycle's draft (all 15
positions reduced to their top candidates) and its verify forward (a tree the host built from
the draft's scores at the prompt, under its ancestor mask), prints the wall time per call (graph build, launch, sync),
the kernels launched per call, their summed device time, the costliest kernels and the most launched
ones. Where the summed device
time is a small part of the wall time the forward is bound by launching kernels, not by running them
(docs/benchmarks.md, "What bounds the ratios").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from regime import draft_call, forward_call  # noqa: E402
from width_replay import add_draft_args, load_target_and_draft  # noqa: E402

from bench import GREEDY, PROMPTS  # noqa: E402  (bench/bench.py: this script's folder is on sys.path)
from engine.decode.drafters import DFlashDrafter  # noqa: E402
from engine.decode.sampling import TokenRng  # noqa: E402
from engine.decode.tree import DraftTree, build_tree, verify_rows  # noqa: E402
from engine.model.target import Target  # noqa: E402


def profile_calls(fn: Callable[[], None], calls: int) -> dict[str, Any]:
    """Wall ms per call and the kernels CUPTI saw, per call (warmed up first)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - start) / calls
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name -> [launches, device us]
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name[:100]]
            entry[0] += 1
            entry[1] += event.device_time_total
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    launched = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {"wall_ms": wall * 1e3, "kernels": sum(v[0] for v in kernels.values()) / calls,
            "device_ms": sum(v[1] for v in kernels.values()) / calls / 1e3,
            "top": [{"name": name, "per_call": n / calls, "us": us / calls} for name, (n, us) in top[:15]],
            "launched": [{"name": name, "per_call": n / calls, "us": us / calls} for name, (n, us) in launched[:15]]}


def batched_step(model: Any, tokenizer: Any, rows: int) -> Callable[[], None]:
    """One forward of a BatchDecoder's step over `rows` requests of different prompt lengths (the batch's
    cache grows by a row a call; the prompts are short)."""
    from engine.decode.batch import BatchDecoder
    from engine.decode.prefix_cache import PrefixLease

    batch = BatchDecoder(model)
    for i, name in zip(range(rows), [*PROMPTS] * rows):
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[name]}]))
        row = batch.make_row(GREEDY, TokenRng(0), PrefixLease(None, ids, None), len(ids), wants_taps=False)
        batch.prefill_and_join(row, ids)
    for _ in range(3):
        batch.step()

    def run() -> None:  # the step's forward and its one shared offsets add, without sampling
        mx.eval(batch.forward_rows()[0], batch.cache[0].offset)
    return run


def tree_draft(drafter: DFlashDrafter, ids: list[int], taps: mx.array, k: int) -> Callable[[], None]:
    def run() -> None:  # one new context row a call, then rewound, as the chain draft's case
        mx.eval(drafter.propose_candidates([ids[-1]], taps[:, -1:], 15, GREEDY, TokenRng(0), k))
        for layer_cache in drafter._cache or []:
            layer_cache.offset -= 1
    return run


def tree_verify(target: Target, cache: list[Any], anchor: int, tree: DraftTree) -> Callable[[], None]:
    def run() -> None:  # [anchor, nodes] at positions P + depth under the ancestor mask, then trimmed
        tokens, rows = verify_rows(tree, anchor, target.cache_length(cache), 15)
        mx.eval(target(tokens, cache, taps=True, tree=rows))
        target.trim(cache, tree.budget + 1)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_draft_args(parser, "unused", "code")
    parser.add_argument("--calls", type=int, default=20, help="profiled calls of each forward")
    parser.add_argument("--batch", default="", help="comma list of batched decode step sizes, e.g. 2,4")
    parser.add_argument("--tree", default="", help="comma list of tree budgets to profile, e.g. 8,32")
    parser.add_argument("--out", type=Path, default=None, help="write the profile as JSON here")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("kernel_profile.py needs PyTorch (its profiler reads CUPTI): pip install torch")
    if not torch.cuda.is_available() or mx.default_device() != mx.gpu:
        sys.exit("kernel_profile.py profiles CUDA kernels: run it on an NVIDIA GPU with MLX's CUDA backend")

    loaded, model, draft, prepared = load_target_and_draft(args)
    print(f"[profile] {loaded.description}, {args.target_dtype}, {prepared}", flush=True)
    target = Target(model, draft.config.target_layer_ids)
    ids = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[args.prompts.split(",")[0]]}]))
    cache = target.make_cache()
    _, taps = target(mx.array([ids]), cache, taps=True)
    mx.eval(taps, cache[0].state)
    drafter = DFlashDrafter(draft, target)
    drafter.begin(ids, taps)
    mx.eval(drafter.propose([ids[-1]], None, 15, GREEDY, TokenRng(0)).tokens)

    # at the prompt's context every time (the rows are trimmed again; the draft's context row rewound);
    # a speculative decoder's width-0 step is a 1-row forward that keeps its taps for the draft
    cases = {"decode step, 1 row": forward_call(target, cache, 1, taps=False),
             "width-0 step, 1 row with taps": forward_call(target, cache, 1),
             "verify, 3 rows": forward_call(target, cache, 3), "verify, 16 rows": forward_call(target, cache, 16),
             "draft, 15 kept rows": draft_call(drafter, ids, taps, 15)}
    for rows in (int(n) for n in args.batch.split(",") if n):
        cases[f"batched decode step, {rows} rows"] = batched_step(model, loaded.tokenizer, rows)
    if budgets := [int(n) for n in args.tree.split(",") if n]:
        target.enable_trees()
        top_ids, top_lp = drafter.propose_candidates([ids[-1]], taps[:, -1:], 15, GREEDY, TokenRng(0), max(budgets))
        for layer_cache in drafter._cache or []:  # rewound, as after every draft case's call
            layer_cache.offset -= 1
        cases[f"tree draft, 15 positions to top {max(budgets)}"] = tree_draft(drafter, ids, taps, max(budgets))
        for budget in budgets:
            tree = build_tree(top_ids.tolist(), top_lp.tolist(), budget)
            cases[f"tree verify, {budget} nodes"] = tree_verify(target, cache, ids[-1], tree)
    results = {}
    for name, fn in cases.items():
        result = results[name] = profile_calls(fn, args.calls)
        print(f"\n{name}: wall {result['wall_ms']:.2f} ms, {result['kernels']:.0f} kernels, "
              f"device {result['device_ms']:.2f} ms ({result['device_ms'] / result['wall_ms']:.0%} of the wall)")
        for kernel in result["top"][:8]:
            print(f"  {kernel['us']:8.1f} us  x{kernel['per_call']:5.1f}  {kernel['name'][:80]}")
        print("  most launched:")
        for kernel in result["launched"][:6]:
            print(f"  {kernel['us']:8.1f} us  x{kernel['per_call']:5.1f}  {kernel['name'][:80]}")
    drafter.end()
    if args.out:
        args.out.write_text(json.dumps({"model": loaded.description, "prepared": prepared, **results}, indent=1))


if __name__ == "__main__":
    main()
