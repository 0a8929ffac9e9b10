"""What a draft architecture costs per cycle: one draft forward plus its LM head, on the served target.

    python bench/draft_cost.py [--model embedded] [--draft DIR ...] [--layers 3,5] [--dflash2]
                               [--context 300] [--rows 15] [--iters 40] [--target-dtype native]

For each draft (the given directories, and random drafts of the shipped draft's shape with each of
`--layers` decoder layers and as many taps, spread as the published formula does; `--dflash2` adds
each one's DFlash 2 wrapper), prefill a `--context`-token prompt, then time `DFlashDrafter.propose`
of the draft's trained block with `--rows` of it scored (over the draft's proposal vocabulary where it ships
one, as the server builds it), one new context row per call as a cycle that accepted one token feeds it, and
the target's one-row decode step beside it. Weights do not change the cost, so random drafts price an
architecture before it is trained (they take the listed draft's shape: a target with none gets only
`--draft`). Prints median ms and the draft's share of a plain step.
On Linux the process re-execs with MKL or OpenBLAS preloaded, as the server does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import load_served  # noqa: E402
from engine.backend.blas import maybe_reexec_with_blas  # noqa: E402
from engine.decode.drafters import DFlashDrafter  # noqa: E402
from engine.decode.proposal_head import load_proposal_head  # noqa: E402
from engine.decode.sampling import SamplingParams, TokenRng  # noqa: E402
from engine.model.draft import (  # noqa: E402
    DFlash2Draft,
    DraftConfig,
    build_target_layer_ids,
    load_draft,
    make_draft,
    save_draft,
)
from engine.model.target import Target  # noqa: E402
from engine.runtime.pairs import default_draft_for  # noqa: E402
from engine.runtime.serving_model import prepare_draft  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def random_drafts(shipped: Path, layers: list[int], dflash2: bool, out: Path) -> dict[str, Path]:
    """Published-layout drafts of the shipped draft's shape with other layer counts (random weights)."""
    base = DraftConfig.from_dict(json.loads((shipped / "config.json").read_text()))
    made: dict[str, Path] = {}
    for count in layers:
        config = replace(base, num_hidden_layers=count, layer_types=(),
                         target_layer_ids=build_target_layer_ids(base.num_target_layers, count))
        draft = make_draft(DraftConfig.from_dict(config.to_dict()))
        made[f"random {count} layers / {count} taps"] = out / f"l{count}"
        save_draft(draft, out / f"l{count}")
        if dflash2:
            name = f"random {count} layers, DFlash 2"
            save_draft(DFlash2Draft.wrapping(draft), out / f"l{count}-d2")
            made[name] = out / f"l{count}-d2"
    return made


def median_ms(step: object, iters: int, warmup: int = 5) -> float:
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        mx.eval(step())  # type: ignore[operator]
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--draft", action="append", default=[],
                        help="a draft directory (repeatable; default: the shipped one)")
    parser.add_argument("--layers", default="3,5", help="random drafts with these layer counts ('' for none)")
    parser.add_argument("--dflash2", action="store_true", help="also each random draft's DFlash 2 wrapper")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rows", type=int, default=15, help="kept draft rows of the block (the LM head runs on these)")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--target-dtype", choices=("native", "bfloat16", "float16", "float32"), default="native")
    args = parser.parse_args()
    maybe_reexec_with_blas()

    from engine.model.loader import resolve_local_path

    loaded, model, prepared = load_served(args.model, args.target_dtype)  # as the server loads and prepares it
    print(f"[draft_cost] {loaded.description}, {args.target_dtype}, {prepared}, {mx.default_device()}")
    listed = default_draft_for(args.model, loaded.model_id)
    shipped = resolve_local_path(listed) if listed else None
    drafts = {d: Path(d) for d in args.draft} or ({"shipped": Path(shipped)} if shipped else {})
    dims = vars(model.args)
    prompt = [(7 * i + 11) % 1000 + 100 for i in range(args.context)]  # any ids: the cost does not read them
    with tempfile.TemporaryDirectory() as tmp:
        if args.layers and shipped:
            layers = [int(n) for n in args.layers.split(",")]
            drafts.update(random_drafts(Path(shipped), layers, args.dflash2, Path(tmp)))
        plain_ms = None
        for name, path in drafts.items():
            draft = load_draft(path, target_hidden_size=dims["hidden_size"], target_vocab_size=dims["vocab_size"],
                               target_num_layers=dims["num_hidden_layers"])
            if args.target_dtype != "native" and mx.default_device() != mx.cpu:
                draft.set_dtype(getattr(mx, args.target_dtype))
            prepare_draft(draft, model)  # as the server does
            target = Target(model, draft.config.target_layer_ids)
            cache = target.make_cache()
            _, taps = target(mx.array([prompt]), cache, taps=True)
            mx.eval(taps)
            if plain_ms is None:  # the target's decode step, at the same context
                plain_ms = median_ms(lambda: target(mx.array([[prompt[-1]]]), cache, taps=False)[0], args.iters)
                target.trim(cache, args.iters + 5)
            # as the server builds it: greedy proposals over the draft's proposal vocabulary, where it ships one
            head = load_proposal_head(path, target.output_head, output_multiplier=draft.config.output_multiplier)
            drafter = DFlashDrafter(draft, target, head)
            drafter.begin(prompt, taps)
            row = taps[:, -1:]
            rng = TokenRng(0)
            block = draft.config.block_size - 1  # the drafter always runs its trained block; `keep` rows are scored
            ms = median_ms(lambda: drafter.propose([prompt[-1]], row, block, GREEDY, rng, keep=args.rows).tokens,
                           args.iters)
            params = sum(v.size for _, v in tree_flatten(draft.parameters()))
            vocab = f"a {head.ids.size:,}-token proposal vocabulary" if head is not None else "the full head"
            print(f"{name:<36} {draft.config.num_hidden_layers} layers, taps {list(draft.config.target_layer_ids)}, "
                  f"{params / 1e6:.1f}M params, {args.rows} of {block} rows scored over {vocab}: draft {ms:.2f} ms "
                  f"= {ms / plain_ms:.2f} of a plain step ({plain_ms:.2f} ms)")
            target.close()


if __name__ == "__main__":
    main()
