"""Trace the adaptive verify width live: one speculative decoder over prompts in sequence, as a server sees them.

    python bench/width_trace.py --draft engine/drafts/smollm2-135m-instruct-dflash [--prompts chat,math,chat2,code]
    python bench/width_trace.py --draft DIR --target-dtype bfloat16 --rounds 2      # on a GPU
    python bench/width_trace.py --draft DIR --tree-budget auto                      # chains or trees per cycle

For every request: plain decoding's tok/s on the same prompt (run just before), the speculative
decoder's, their ratio, τ, the widths chosen cycle by cycle (0-f, hex; a tree cycle as a capital
letter for its budget: A 4, B 8, C 16, D 32, E 64 nodes), and how many width-0 cycles were chained.
At the end, what the controller learned: per-position acceptance, the overheads it prices cycles
with (draft fixed + per row, host, and with trees what a tree cycle costs beyond those) and the cost
curve. bench/bench.py
gives the medians; this shows why a request ran as it did (bench/width_replay.py models it).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from width_replay import add_draft_args, load_target_and_draft

from bench import (  # bench/bench.py: this script's folder is on sys.path
    PROMPTS,
    decoder_stream,
    timed,
)
from engine.backend.blas import maybe_reexec_with_blas

HEX = "0123456789abcdefghijklmnopqrstuv"  # widths up to 31
TREES = {4: "A", 8: "B", 16: "C", 32: "D", 64: "E"}  # tree budgets (other budgets: T)


def controller_state(decoder: Any) -> dict[str, Any]:
    width = decoder.verify_width
    if width is None:
        return {}
    return {"trials": [round(t, 2) for t in width.trials], "hits": [round(h, 2) for h in width.hits],
            "estimates": [round(p, 3) for p in width.estimates()], "draft_ms": width.draft_s * 1e3,
            "draft_row_ms": width.draft_row_s * 1e3, "host_ms": width.host_s * 1e3, "plain_ms": width.plain_s * 1e3,
            "curve_ms": [round(s * 1e3, 2) for s in width.curve.seconds], "probe_every": width.probe_every,
            **tree_state(width)}


def tree_state(width: Any) -> dict[str, Any]:
    """With trees: their learned cost, the nodes' acceptance and each budget's rate beside the chain's."""
    if not width.tree_budgets:
        return {}
    chain = width.best()
    tokens = width.tree_tokens() if width.node_accept else {}
    return {"tree_ms": width.tree_s * 1e3, "tree_probe_every": width.tree_probe_every,
            "node_accept": [round(a, 2) for a in width.node_accept[:16]],
            "tree_gain": {b: round(g, 3) for b, g in width.tree_gain.items()},
            "chain_rate": {"width": chain, "tok_s": round(width.rate(chain), 2)},
            "tree_rates": {b: {"tokens": round(t, 2), "ms": round(width.tree_cost(b) * 1e3, 1),
                               "tok_s": round(t / width.tree_cost(b), 2)} for b, t in tokens.items()}}


def cycle_marks(widths: list[int], budgets: list[int]) -> str:
    return "".join(TREES.get(b, "T") if b else HEX[w] for w, b in zip(widths, budgets))


def cycle_costs(widths: list[int], cycle_ms: list[float], plain_ms: float, budgets: list[int] | None = None) -> str:
    """Median ms of a cycle, sync to sync, by kind: a plain step after a plain step (chained where the
    decoder chains them), one after a drafting cycle, a drafting cycle by width, a tree cycle by budget;
    beside plain decoding's."""
    kinds: dict[str, list[float]] = collections.defaultdict(list)
    for i, (width, ms) in enumerate(zip(widths, cycle_ms)):
        before = widths[i - 1] if i else None
        budget = budgets[i] if budgets else 0
        kind = f"tree {budget}" if budget else \
            ("plain after plain" if before == 0 else "plain after draft") if width == 0 else \
            f"width {width}" if width < 4 else "width 4-7" if width < 8 else "width 8+"
        kinds[kind].append(ms)
    parts = [f"{k} {statistics.median(v):.2f} ({len(v)})" for k, v in sorted(kinds.items())]
    return f"ms: plain decoding {plain_ms:.2f}; " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_draft_args(parser, "passes over the prompts, one decoder throughout", "chat,math,chat2,code")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tree-budget", default="0", help="auto, a number of nodes, or 0 (chains only)")
    parser.add_argument("--out", type=Path, default=None, help="write the trace as JSON here")
    args = parser.parse_args()
    maybe_reexec_with_blas()

    from engine.decode.drafters import DFlashDrafter
    from engine.decode.plain_decoder import PlainDecoder
    from engine.decode.proposal_head import load_proposal_head
    from engine.decode.speculative import SpeculativeDecoder
    from engine.model.target import Target

    loaded, model, draft, prepared = load_target_and_draft(args)
    print(f"[trace] {loaded.description}, {args.target_dtype}, {prepared}", flush=True)
    target = Target(model, draft.config.target_layer_ids)
    # as the server builds it: greedy proposals over the draft's proposal vocabulary, where it ships one
    head = load_proposal_head(args.draft, target.output_head, output_multiplier=draft.config.output_multiplier)
    # "overlap" timing reads the clock around each cycle and adds no sync
    tree_budget = args.tree_budget if args.tree_budget == "auto" else int(args.tree_budget)
    spec = SpeculativeDecoder(target, DFlashDrafter(draft, target, head), block_size=args.block_size, timing="overlap",
                              tree_budget=tree_budget)
    if mx.default_device() == mx.gpu:  # as the server warms up: each cycle shape's first run compiles kernels
        spec.rehearse()
    plain = PlainDecoder(model)
    records = []
    for round_ in range(args.rounds):
        for name in args.prompts.split(","):
            ids = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[name]}]))
            plain_tokens, _, plain_s = timed(decoder_stream(plain, ids, args.max_tokens))
            tokens, _, spec_s = timed(decoder_stream(spec, ids, args.max_tokens))
            plain_tps, spec_tps = (len(plain_tokens) - 1) / plain_s, (len(tokens) - 1) / spec_s
            widths, budgets = spec.stats.widths, spec.stats.budgets
            record = {"round": round_, "prompt": name, "plain_tps": plain_tps, "spec_tps": spec_tps,
                      "ratio": spec_tps / plain_tps, "tau": spec.stats.acceptance_length, "cycles": spec.stats.cycles,
                      "chained": spec.stats.chained, "widths": widths, "budgets": budgets, "same": tokens == plain_tokens,
                      "plain_ms": 1e3 * plain_s / max(len(plain_tokens) - 1, 1),
                      "cycle_ms": [round(t.cycle_s * 1e3, 3) for t in spec.stats.timings], "controller": controller_state(spec)}
            records.append(record)
            hist = dict(sorted(collections.Counter(w if not b else f"tree {b}" for w, b in zip(widths, budgets)).items(),
                               key=str))
            print(f"r{round_} {name:6} plain {plain_tps:6.1f} spec {spec_tps:6.1f} ({record['ratio']:.2f}x) "
                  f"tau {record['tau']:.2f} cycles {record['cycles']} chained {record['chained']} widths {hist}"
                  f"{'' if record['same'] else ' (output differs from plain)'}", flush=True)
            print("   " + cycle_marks(widths, budgets), flush=True)
            print("   " + cycle_costs(widths, record["cycle_ms"], record["plain_ms"], budgets), flush=True)
    state = controller_state(spec)
    print("[trace] controller: " + json.dumps(state), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "requests": records,
                                        "controller": state}, indent=1))
    target.close()


if __name__ == "__main__":
    main()
