"""Timing only, on a random target of a real user's size: what the speculative cycle costs and yields there.

    python bench/regime.py --shape qwen3-8b --bits 4          # on a GPU (a random 8B target is 16 GB in bf16)
    python bench/regime.py --shape tiny                         # a smoke run anywhere
    python bench/regime.py --shape qwen3-8b --verify-gemm       # A/B: dense verify-width kernels paused / active
    python bench/regime.py --shape qwen3-8b --profile           # + kernels and device time per forward (CUDA)
    python bench/regime.py --shape qwen3-8b --published-draft   # A/B: the draft packed (as loaded) / published
    python bench/regime.py --shape qwen3-8b --compile-ab --attention-ab  # A/B: layers eager / compiled, and
                                                                # block attention explicit / kernel where it lost alone

A random target has no draft that predicts it, so acceptance comes from an oracle: the draft's
forward (a random DFlash draft of the published 8B-class shape, 5 layers at the target's width)
runs every cycle for its cost, and the tokens it proposes are the target's own greedy
continuation, corrupted at a chosen block position (`--wrong-at 3` accepts 3 drafts a cycle, so a
full block's tau is 4). Prints the target's forward ms by rows, the draft's ms, and decode tok/s of
mlx-lm's generate loop, plain decoding and the speculative decoder (adaptive and full-block) per
acceptance setting. The target is made steady (steady()): its greedy continuation repeats the last token
by a margin no rounding reaches, so every kernel path decodes the same continuation the oracle proposes
and τ is the setting's (a flat random bf16 target's near-ties moved it).

The target is prepared as the server prepares it: on a GPU, engine/backend/verify_matmul.apply swaps
its layers for the verify-width ones (engine/backend/verify_gemm.py for float weights) and the runtime
check picks kernel or MLX per layer shape. `--verify-gemm` also swaps the draft's layers and measures
everything twice in this process, interleaved, with the dense kernels paused ("mlx": MLX's matmul
everywhere) and active ("gemm": where the check chose them), and prints the check's decisions.
`--profile` (CUDA with PyTorch beside MLX, as bench/kernel_profile.py) adds, per state, the kernels each
forward launches, their summed device time and the wall time per call: whether a forward is bound by
reading weights (device time near the wall) or by launching kernels.
`--compile-ab` runs the target's decoder layers as their own forwards and the draft's q/k norms as two calls
("eager"), and both as the server runs them (engine/model/compiled_layer.py, fused.QKNorm: "compiled");
`--qknorm-ab` runs compiled layers and the packed draft with a Qwen3 layer's q/k norms as two calls ("two-norms")
and as one (fused.QKNorm, as a GPU serves them: "one-norm"); each layer keeps both routes' graphs, so the
states can take turns call by call. `--attention-ab` runs the block-attention kernel where it lost its check
alone ("kernel") or not ("explicit"); together, every pair. mlx-lm's loop always runs
the layers' own forwards (the projections packed, as the server loads them); under `--compile-ab` or
`--qknorm-ab` alone that is the same code in both states, so x mlx_lm is taken against the mean of all its runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (  # bench/bench.py: this script's folder is on sys.path
    GREEDY,
    decoder_stream,
    timed,
)
from engine.backend.blas import maybe_reexec_with_blas
from engine.decode.drafters import DFlashDrafter, OracleDrafter, Proposal
from engine.decode.sampling import SamplingParams, TokenRng

STEADY_SCALE = 256.0  # mlx's embedding init (std 1/sqrt(hidden)) -> std 4 at 4,096 wide
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen3-8B: 36 layers, 4096 wide, 32 query / 8 KV heads of 128, MLP 12288, untied head
    "qwen3-8b": {"hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "rope_theta": 1e6, "tie_word_embeddings": False, "max_position_embeddings": 40960},
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000, "rope_theta": 1e6,
             "tie_word_embeddings": False, "max_position_embeddings": 4096},
}


class CostedOracle:
    """The random draft's forward for its cost, the oracle's tokens for acceptance (one graph, so both run)."""

    name = "dflash-oracle"
    needs_taps = True

    def __init__(self, draft: DFlashDrafter, oracle: OracleDrafter) -> None:
        self.draft, self.oracle = draft, oracle

    def begin(self, prompt_ids: list[int], prompt_taps: mx.array | None) -> None:
        self.draft.begin(prompt_ids, prompt_taps)
        self.oracle.begin(prompt_ids, None)

    def propose(self, new_tokens: list[int], taps: mx.array | None, num_tokens: int, params: SamplingParams,
                rng: TokenRng, *, keep: int | None = None) -> Proposal:
        drafted = self.draft.propose(new_tokens, taps, num_tokens, params, rng, keep=keep).tokens
        known = self.oracle.propose(new_tokens, None, num_tokens, params, rng, keep=keep).tokens
        k = min(drafted.shape[0], known.shape[0])
        return Proposal(known[:k] + 0 * drafted[:k], None)

    def end(self) -> None:
        self.draft.end()
        self.oracle.end()


def build_target(shape: str, bits: int | None, dtype: mx.Dtype) -> nn.Module:
    from mlx_lm.models.qwen3 import Model, ModelArgs

    mx.random.seed(0)
    model = Model(ModelArgs(model_type="qwen3", rms_norm_eps=1e-6, **SHAPES[shape]))
    steady(model)
    model.set_dtype(dtype)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model


def steady(model: nn.Module) -> None:
    """Give a random target a greedy continuation that rounding cannot move: its token embeddings scaled to
    dominate the residual stream and read back by the LM head, so each position's argmax is the last token,
    ahead of the runner-up by 7-55x the logits' standard deviation (bf16 on the CPU: the tiny shape, and 36
    layers 1,024 and 4,096 wide). A flat random bf16 target's near-ties moved its continuation between kernels (1-row against
    block forwards) and the oracle's proposals with it. What a forward costs does not depend on the values."""
    inner = model.model
    inner.embed_tokens.weight = inner.embed_tokens.weight * STEADY_SCALE
    if "lm_head" in model:
        model.lm_head.weight = inner.embed_tokens.weight


def build_draft(target: Any, layers: int, dtype: mx.Dtype, bits: int | None = None, packed: bool = True) -> Any:
    """A random DFlash draft of the published 8B-class shape at the target's width, as load_draft leaves a
    published one: quantized (`bits`), then packed (engine/model/packed_draft.py) unless `packed` is False."""
    from engine.model.draft import DFlashDraft, DraftConfig, build_target_layer_ids, quantizable
    from engine.model.packed_draft import pack_draft

    a = target.model.args
    config = DraftConfig(
        hidden_size=a.hidden_size, num_hidden_layers=layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim, intermediate_size=a.intermediate_size,
        num_target_layers=target.num_layers, target_layer_ids=build_target_layer_ids(target.num_layers, 5),
        mask_token_id=0, block_size=16, vocab_size=target.vocab_size,
    )
    draft = DFlashDraft(config)
    draft.set_dtype(dtype)
    if bits:
        nn.quantize(draft, group_size=64, bits=bits, class_predicate=quantizable)  # DFlash 2's conv/selector stay
    if packed:
        pack_draft(draft)
    mx.eval(draft.parameters())
    return draft


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def interleaved_ms(states: dict[str, Callable[[], None]], make_call: Callable[[str], Callable[[], None]],
                   repeats: int = 20) -> dict[str, float]:
    """Median ms of one call per state, the states taking turns call by call: a slow moment of the host (a
    GPU host's wall times move by 20-50% between seconds) hits every state alike."""
    calls = {label: make_call(label) for label in states}
    samples: dict[str, list[float]] = {label: [] for label in states}
    for rep in range(repeats + 1):
        for label, use in states.items():
            use()
            start = time.perf_counter()
            calls[label]()
            if rep:  # the first round warms each state up
                samples[label].append(time.perf_counter() - start)
    return {label: statistics.median(times) * 1e3 for label, times in samples.items()}


def forward_call(target: Any, cache: list[Any], rows: int, taps: bool = True) -> Callable[[], None]:
    """One target forward of `rows` rows (with the draft's taps) at the cache's context, trimmed again after."""
    def run() -> None:
        mx.eval(target(mx.full((1, rows), 5, dtype=mx.int32), cache, taps=taps))
        target.trim(cache, rows)
    return run


def draft_call(drafter: DFlashDrafter, prompt: list[int], taps: mx.array, keep: int) -> Callable[[], None]:
    """One draft block with one new context row, its LM head on `keep` rows; the context row rewound after."""
    def run() -> None:
        mx.eval(drafter.propose([prompt[-1]], taps[:, -1:], 15, GREEDY, TokenRng(0), keep=keep).tokens)
        for c in drafter._cache:
            c.offset -= 1
    return run


def decode_tps(stream: Iterator[list[int]]) -> tuple[list[int], float]:
    """Tokens and tok/s after the first token, as bench.py counts."""
    tokens, _, decode_s = timed(stream)
    return tokens, (len(tokens) - 1) / max(decode_s, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--bits", type=int, default=None, help="quantize target and draft (default: bfloat16 weights)")
    parser.add_argument("--draft-layers", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--wrong-at", default="3,5,7,None", help="comma list: block position the oracle corrupts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--verify-gemm", action="store_true",
                        help="A/B the dense verify-width kernels (target and draft) in this process")
    parser.add_argument("--published-draft", action="store_true",
                        help="also time a draft in the published layer layout beside the packed one the server loads")
    parser.add_argument("--compile-ab", action="store_true",
                        help="A/B the target's layers and the draft's q/k norms eager / as served (compiled, QKNorm)")
    parser.add_argument("--qknorm-ab", action="store_true",
                        help="A/B a Qwen3 layer's q/k norms in compiled layers and the draft: two calls / fused.QKNorm")
    parser.add_argument("--attention-ab", action="store_true",
                        help="A/B the block-attention kernel where it lost alone: explicit / kernel (CUDA)")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: kernels launched, device and wall ms per forward (needs PyTorch)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.compile_ab and args.qknorm_ab:
        parser.error("--compile-ab already switches the q/k norms with compiled layers; use one of the two")
    maybe_reexec_with_blas()

    from mlx_lm.generate import generate_step

    from engine.decode.plain_decoder import PlainDecoder
    from engine.decode.speculative import SpeculativeDecoder
    from engine.model import compiled_layer
    from engine.model.target import Target
    from engine.runtime.serving_model import prepare_model

    on_cpu = mx.default_device() == mx.cpu
    dtype = mx.float32 if on_cpu else mx.bfloat16
    start = time.perf_counter()
    model = build_target(args.shape, args.bits, dtype)
    prepared = prepare_model(model, fuse=True)
    draft_probe = Target(model)
    draft = build_draft(draft_probe, args.draft_layers, dtype, args.bits)
    # --published-draft: the same shape with the published layer layout, timed beside the packed one
    published = build_draft(draft_probe, args.draft_layers, dtype, args.bits, packed=False) if args.published_draft else None
    draft_probe.close()
    states = gemm_states([draft] + ([published] if published is not None else [])) if args.verify_gemm else {"": lambda: None}
    if args.compile_ab:
        states = paired(states, compile_states())
    if args.qknorm_ab:
        states = paired(states, qknorm_states())
    if args.attention_ab:
        states = paired(states, attention_states())
    target = Target(model, draft.config.target_layer_ids)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"[regime] {args.shape} {f'{args.bits}-bit' if args.bits else dtype}, {prepared}; draft "
          f"{args.draft_layers} layers; built in {time.perf_counter() - start:.0f} s", flush=True)
    print_attention_decisions()

    # the target's forward by rows at the prompt's context, and the draft's, each synced on its own
    prompt = [int(t) for t in mx.random.randint(10, target.vocab_size, (args.prompt_tokens,)).tolist()]
    cache = target.make_cache()
    _, taps = target(mx.array([prompt]), cache, taps=True)
    mx.eval(cache[0].state, taps)
    curves: dict[str, dict[int, float]] = {label: {} for label in states}
    for rows in (1, 2, 4, 8, 16, 32):
        for label, ms in interleaved_ms(states, lambda _: forward_call(target, cache, rows)).items():
            curves[label][rows] = ms
    drafters = {"": DFlashDrafter(draft, target)}
    if published is not None:
        drafters["published layers"] = DFlashDrafter(published, target)
    for drafter in drafters.values():
        drafter.begin(prompt, taps)
        mx.eval(drafter.propose([prompt[-1]], None, 15, GREEDY, TokenRng(0)).tokens)
    drafts_ms: dict[str, dict[int, float]] = {}
    for keep in (1, 15):
        for kind, drafter in drafters.items():
            for label, ms in interleaved_ms(states, lambda _: draft_call(drafter, prompt, taps, keep)).items():
                drafts_ms.setdefault(" ".join(filter(None, (label, kind))), {})[keep] = ms
    profiles = profile_forwards(target, cache, drafters, prompt, taps, states) if args.profile else {}
    for drafter in drafters.values():
        drafter.end()
    for label, curve in curves.items():
        print(f"[regime]{f' [{label}]' if label else ''} target forward ms by rows "
              + ", ".join(f"{r}: {ms:.2f}" for r, ms in curve.items()), flush=True)
    for label, draft_ms in drafts_ms.items():
        print(f"[regime]{f' [{label}]' if label else ''} draft ms, 1 kept row {draft_ms[1]:.2f}, 15 {draft_ms[15]:.2f}",
              flush=True)

    # the greedy continuation the oracle proposes, then decode speeds
    plain = PlainDecoder(model)
    continuation = [t for s in plain.generate(prompt, GREEDY, args.max_tokens + 16, TokenRng(0)) for t in s.tokens]
    settings = [None if w.strip() == "None" else int(w) for w in args.wrong_at.split(",")]
    rows: dict[str, list[float]] = {}
    taus: dict[str, float] = {}
    same: dict[str, bool] = {}
    splits: dict[str, list[Any]] = {}  # each speculative run's cycles (SpeculativeDecoder's CycleTiming)

    def mlx_lm_stream() -> Iterator[list[int]]:
        state = compiled_layer.is_enabled()
        compiled_layer.set_enabled(False)  # mlx-lm's loop over the layers' own forwards
        try:
            yield from ([int(token)] for token, _ in generate_step(mx.array(prompt), model, max_tokens=args.max_tokens))
        finally:
            compiled_layer.set_enabled(state)

    for round_ in range(args.rounds + 1):
        measured = {}
        for label, use in states.items():
            use()
            tag = f" [{label}]" if label else ""
            measured["mlx_lm" + tag] = decode_tps(mlx_lm_stream())
            measured["plain" + tag] = decode_tps(decoder_stream(plain, prompt, args.max_tokens))
            for wrong in settings:
                for adaptive in (True, False):
                    oracle = OracleDrafter(continuation, vocab_size=target.vocab_size, wrong_at=[wrong])
                    spec = SpeculativeDecoder(target, CostedOracle(DFlashDrafter(draft, target), oracle),
                                              block_size=16, adaptive=adaptive, timing="overlap")
                    name = f"spec wrong@{wrong} {'adaptive' if adaptive else 'full'}{tag}"
                    measured[name] = decode_tps(decoder_stream(spec, prompt, args.max_tokens))
                    taus[name] = spec.stats.acceptance_length
                    if round_:
                        splits.setdefault(name, []).extend(spec.stats.timings[1:])  # the first follows the prefill
        for name, (tokens, tps) in measured.items():
            # in bf16 a near tie can flip between kernels (1-row vs block, mlx-lm's attention vs ours)
            same[name] = same.get(name, True) and tokens == continuation[: len(tokens)]
            if round_:  # the first round warms up kernels, caches and the cost curve
                rows.setdefault(name, []).append(tps)
    first = next(iter(states))  # the baseline: MLX's matmul everywhere under --verify-gemm
    base = statistics.fmean(rows["mlx_lm" + (f" [{first}]" if first else "")])
    if (args.compile_ab or args.qknorm_ab) and not (args.verify_gemm or args.attention_ab):
        # mlx-lm's loop runs the same code in both states (compiled layers and QKNorm off): every state's runs
        # measure it, and a GPU host's speed moves by a third between seconds
        base = statistics.fmean(tps for name, samples in rows.items() if name.startswith("mlx_lm") for tps in samples)
        print(f"[regime] x mlx_lm: against the mean of mlx-lm's runs in every state ({base:.1f} tok/s)")
    plain_tps = statistics.fmean(rows["plain" + (f" [{first}]" if first else "")])
    print(f"\n{'method':<37} {'tok/s':>8} {'x mlx_lm':>9} {'x plain':>8} {'tau':>6}  same as plain")
    summary = {}
    for name, samples in rows.items():
        tps = statistics.fmean(samples)
        summary[name] = {"tok_s": tps, "x_mlx_lm": tps / base, "x_plain": tps / plain_tps, "tau": taus.get(name),
                         "same_as_plain": same[name]}
        tau = f"{taus[name]:6.2f}" if name in taus else f"{'-':>6}"
        print(f"{name:<37} {tps:8.1f} {tps / base:9.2f} {tps / plain_tps:8.2f} {tau}  {same[name]}")
    print(f"\n{'per cycle, medians (ms)':<37} {'cycle':>7} {'launch':>7} {'host':>6} {'wait':>6}")
    cycle_split = {}
    for name, timings in splits.items():
        cycle_split[name] = {part: 1e3 * statistics.median(getattr(t, f"{part}_s") for t in timings)
                             for part in ("cycle", "launch", "host", "wait")}
        print(f"{name:<37} " + " ".join(f"{v:{w}.2f}" for v, w in zip(cycle_split[name].values(), (7, 7, 6, 6))))
    print("launch: bookkeeping after the last sync, then building and launching the draft and the verify; host: "
          "the caller's work after it; wait: blocked in the cycle's one sync")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "prepared": prepared,
                                        "target_params": params, "forward_ms": curves.get("", curves),
                                        "draft_ms": drafts_ms.get("", drafts_ms), "gemm_decisions": gemm_decisions(),
                                        "device": str(mx.default_device()), "summary": summary, "profiles": profiles,
                                        "cycle_split_ms": cycle_split},
                                       indent=1))


def profile_forwards(target: Any, cache: list[Any], drafters: dict[str, DFlashDrafter], prompt: list[int],
                     taps: mx.array, states: dict[str, Callable[[], None]]) -> dict[str, Any]:
    """--profile: what each forward launches and how long the device works on it, per state (interleaved)."""
    from kernel_profile import profile_calls  # bench/kernel_profile.py: this script's folder is on sys.path

    cases = {f"forward, {rows} row{'s' * (rows > 1)}": forward_call(target, cache, rows) for rows in (1, 2, 16)}
    for kind, drafter in drafters.items():
        cases |= {f"draft{f' ({kind})' if kind else ''}, {keep} kept row{'s' * (keep > 1)}":
                  draft_call(drafter, prompt, taps, keep) for keep in (1, 15)}
    profiles: dict[str, Any] = {}
    for name, fn in cases.items():
        for label, use in states.items():
            use()
            result = profiles[f"{name}{f' [{label}]' if label else ''}"] = profile_calls(fn, 10)
            print(f"[profile] {name}{f' [{label}]' if label else ''}: wall {result['wall_ms']:.2f} ms, "
                  f"{result['kernels']:.0f} kernels, device {result['device_ms']:.2f} ms", flush=True)
            for kernel in result["top"][:6]:
                print(f"[profile]   {kernel['us']:8.1f} us  x{kernel['per_call']:5.1f}  {kernel['name'][:70]}")
    return profiles


def print_attention_decisions() -> None:
    """The block-attention kernel's choices so far (CUDA), and whether forwards run it where it lost alone."""
    from engine.backend.attention_kernel import (
        TIMING_SHAPE,
        WARPS,
        default_kernel,
        describe_warps,
        random_block,
        spec_name,
    )

    kernel = default_kernel()
    if kernel.kernel is None:
        return
    for name, d in kernel.summary().items():
        print(f"[regime] block attention {name}: {d['reason']} (kernel {d['kernel_ms']:.3f} ms, explicit "
              f"{d['explicit_ms']:.3f} ms)", flush=True)
    print(f"[regime] block attention where it lost alone: {'run' if kernel.in_forward else 'not run'}", flush=True)
    for spec in kernel.decisions:  # every variant alone, at the check's timing shape
        if spec.padded or spec.tree:
            continue
        q, k, v = random_block(spec, *TIMING_SHAPE)
        for warps in WARPS[spec.head_dim]:
            ms = kernel.timer(lambda: kernel(q, k, v, spec.head_dim**-0.5, spec.causal, warps))
            print(f"[regime] block attention {spec_name(spec)}, {describe_warps(warps)}: {ms:.3f} ms, max rel err "
                  f"{kernel.max_rel_error(spec, warps):.2g}", flush=True)


def gemm_states(drafts: list[nn.Module]) -> dict[str, Callable[[], None]]:
    """--verify-gemm: the draft's layers swapped too, the decisions printed, and the two states to A/B."""
    from engine.backend.verify_gemm import default_verify_gemm
    from engine.backend.verify_kernels import apply as use_verify_kernels
    from engine.model import compiled_layer

    gemm = default_verify_gemm()
    if gemm.kernel is None:
        print(f"[regime] --verify-gemm: no dense kernel on {gemm.backend} (or DFLASH_VERIFY_KERNEL=0); "
              "one state only", flush=True)
        return {"": lambda: None}
    start = time.perf_counter()
    swapped = sum(use_verify_kernels(draft, confirm=False) for draft in drafts)  # the A/B below is the end-to-end check
    print(f"[regime] draft: {swapped} layers swapped in {time.perf_counter() - start:.1f} s", flush=True)
    for row in gemm_decisions():
        print(f"[regime] gemm N={row['n']} K={row['k']} {row['dtype']} rows<={row['bucket']}: "
              f"{'kernel ' + row['tiling'] if row['kernel'] else 'MLX'} ({row['reason']}; kernel "
              f"{row['kernel_ms']:.4f} ms, MLX {row['mlx_ms']:.4f} ms)", flush=True)

    def paused() -> None:
        gemm.active = False
        compiled_layer.invalidate()  # compiled layers traced the other route

    def active() -> None:
        gemm.active = True
        compiled_layer.invalidate()

    return {"mlx": paused, "gemm": active}


def compile_states() -> dict[str, Callable[[], None]]:
    """--compile-ab: the target's decoder layers as their own forwards and the draft's q/k norms as two calls,
    then as the server runs them (compiled graphs; fused.QKNorm off the CPU)."""
    return _layer_states({"eager": (False, False), "compiled": (True, None)})


def qknorm_states() -> dict[str, Callable[[], None]]:
    """--qknorm-ab: compiled layers and the packed draft with two q/k norm calls, then with fused.QKNorm."""
    return _layer_states({"two-norms": (True, False), "one-norm": (True, True)})


def _layer_states(routes: dict[str, tuple[bool, bool | None]]) -> dict[str, Callable[[], None]]:
    """Per label: compiled layers on or off, and fused.QKNorm on, off or the device's default (None)."""
    from engine.model import compiled_layer, fused

    def state(compiled: bool, one_norm: bool | None) -> Callable[[], None]:
        def use() -> None:
            compiled_layer.set_enabled(compiled)
            fused.set_one_qk_norm(one_norm)
        return use

    return {label: state(*route) for label, route in routes.items()}


def attention_states() -> dict[str, Callable[[], None]]:
    """--attention-ab: query blocks through the explicit composition, then through the block-attention kernel
    (where it lost alone too)."""
    from engine.backend.attention_kernel import default_kernel
    from engine.model import attention

    kernel = default_kernel()

    def explicit() -> None:
        attention.set_mode("unfused")

    def kernel_too() -> None:
        attention.set_mode("auto")
        kernel.in_forward = True

    return {"explicit": explicit, "kernel": kernel_too}


def paired(first: dict[str, Callable[[], None]], second: dict[str, Callable[[], None]]) -> dict[str, Callable[[], None]]:
    """Every pair of two state sets, labelled "a+b" (an unlabelled single state takes the other's labels)."""
    def both(a: Callable[[], None], b: Callable[[], None]) -> Callable[[], None]:
        def use() -> None:
            a()
            b()
        return use

    return {"+".join(filter(None, (la, lb))): both(a, b) for la, a in first.items() for lb, b in second.items()}


def gemm_decisions() -> list[dict[str, Any]]:
    from engine.backend.verify_gemm import default_verify_gemm

    return [{"n": spec.n, "k": spec.k, "dtype": str(spec.dtype), "bucket": bucket, "kernel": d.tiling is not None,
             "tiling": str(d.tiling), "kernel_ms": d.kernel_ms, "mlx_ms": d.reference_ms,
             "max_rel_error": d.max_rel_error, "reason": d.reason}
            for (spec, bucket), d in default_verify_gemm().decisions.items()]


if __name__ == "__main__":
    main()
