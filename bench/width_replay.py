"""Replay the adaptive verify width over teacher-forced draft runs, priced by measured costs.

Greedy output does not depend on the verify width, so each prompt's answer is fixed, and so is
what a block anchored at each of its positions would accept (engine/train/objective.anchor_runs).
A cycle of width c at anchor a then accepts min(run[a], c) and costs forward(c + 1) + host (+ the
draft's fixed and per-row cost when c > 0); a width-0 cycle after another costs a plain step (chained). Replaying engine/decode/verify_width.VerifyWidth over that,
request after request as the bench sends them, compares controller policies in seconds and without
timing noise; bench/bench.py measures the real thing.

    python bench/width_replay.py --draft engine/drafts/smollm2-135m-instruct-dflash
    python bench/width_replay.py --draft DIR --costs 1:4.5,2:4.7,4:5.0,8:5.5,16:7.0 --draft-ms 1.8 --row-ms 0.02 --host-ms 0.3
    python bench/width_replay.py --draft DIR --costs 1:4.4,4:4.7,16:6.0 --draft-ms 0 --row-ms 0 --host-ms 3.2 --plain-ms 3.8
    python bench/width_replay.py --draft DIR --confidence      # drafting cycles' widths from the draft's confidence

--confidence replays the CPU's default: a drafting cycle verifies as far as the draft is sure of its proposals
(VerifyWidth.confident_width), from the draft's teacher-forced probabilities of each proposal.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx

from bench import (  # bench/bench.py: this script's folder is on sys.path
    GREEDY,
    PROMPTS,
    load_served,
)
from engine.backend.blas import maybe_reexec_with_blas
from engine.decode.sampling import TokenRng
from engine.decode.verify_width import CostCurve, VerifyWidth


RIVALS = (2, 3, 4, 6)  # the fixed widths of bench.py's per-prompt check (--fixed-widths 2,3,4,6)


class Costs:
    """Seconds of one cycle by verified drafts, and of a plain decoding step."""

    def __init__(self, curve: CostCurve, draft_s: float, row_s: float, host_s: float, plain_s: float | None = None) -> None:
        self.curve, self.draft_s, self.row_s, self.host_s = curve, draft_s, row_s, host_s
        self.plain_s = curve(1) if plain_s is None else plain_s  # a chained plain step (GPUs: below a synced forward)

    def cycle(self, drafts: int, drafted: bool | None = None) -> float:
        drafting = drafts > 0 if drafted is None else drafted
        return self.curve(drafts + 1) + self.host_s + (self.draft_s + self.row_s * drafts if drafting else 0.0)

    def plain(self) -> float:
        return self.plain_s

    def describe(self) -> str:
        rows = ", ".join(f"{r}: {self.curve(r) * 1e3:.1f}" for r in (1, 2, 4, 8, 16) if r <= len(self.curve.seconds))
        return (f"forward ms by rows {{{rows}}}, draft {self.draft_s * 1e3:.1f} ms + {self.row_s * 1e3:.2f} ms a row, "
                f"host {self.host_s * 1e3:.1f} ms, chained plain step {self.plain_s * 1e3:.1f} ms")


def replay(controller: VerifyWidth | None, runs: list[int], length: int, first: int, costs: Costs,
           block_size: int, fixed: int | None = None, confidence: list[list[float]] | None = None) -> float:
    """Decode tok/s of one request (first token to last, as bench.py counts) under `controller` or a fixed width;
    `confidence`: per anchor, the draft's probability of each proposal (the controller's widths then follow it)."""
    anchor, emitted, seconds = first, 1, 0.0
    total = length - first
    previous: int | None = None  # drafts of the request's previous cycle
    while emitted < total:
        remaining = total - emitted
        width = fixed if controller is None else controller.choose()
        drafted = width > 0
        if controller is not None and confidence is not None and drafted:
            width = controller.confident_width(confidence[anchor - first])
        drafts = min(width, remaining, block_size - 1)
        accepted, cost = chain_cycle(controller, costs, drafts, runs[anchor - first], previous, drafted)
        emitted += min(accepted + 1, remaining)
        anchor += accepted + 1
        seconds += cost
        previous = drafts if drafted else 0
    return (total - 1) / seconds


def chain_cycle(controller: VerifyWidth | None, costs: Costs, drafts: int, run: int, previous: int | None,
                drafted: bool | None = None) -> tuple[int, float]:
    """(accepted drafts, seconds) of a chain cycle verifying `drafts` where the draft's run is `run`; the
    controller, if any, learns from it. `previous`: the request's previous cycle's drafts (None: none yet, 0: a
    plain step); `drafted`: the draft ran (default: drafts > 0; a confident width may verify none)."""
    drafted = drafts > 0 if drafted is None else drafted
    accepted = min(run, drafts)
    # a width-0 cycle after another is launched before that one's sync, as plain decoding's next step is:
    # its host work overlaps the device's (SpeculativeDecoder._chain)
    chained = not drafted and previous == 0
    cost = costs.plain() if chained else costs.cycle(drafts, drafted)
    if controller is not None:
        # as SpeculativeDecoder._finish: a drafting cycle after plain steps or the prompt teaches no overheads
        controller.update(drafts, accepted, cost if not drafted or previous else None, chained=chained, drafted=drafted)
    return accepted, cost


def add_draft_args(parser: argparse.ArgumentParser, rounds_help: str, prompts: str) -> None:
    """The target, the draft and the prompts: what width_replay.py and width_trace.py both take."""
    parser.add_argument("--model", default="embedded", help="engine.model.loader spec")
    parser.add_argument("--draft", type=Path, required=True, help="DFlash draft directory (published layout)")
    parser.add_argument("--target-dtype", choices=("native", "bfloat16", "float16", "float32"), default="native")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help=rounds_help)
    parser.add_argument("--prompts", default=prompts, help=f"comma list of {', '.join(PROMPTS)}")


def load_target_and_draft(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """(loaded, the target prepared as the server prepares it, the draft, what preparing did)."""
    from engine.model.draft import load_draft
    from engine.runtime.serving_model import prepare_draft

    loaded, model, prepared = load_served(args.model, args.target_dtype)
    margs = model.args
    draft = load_draft(args.draft, target_hidden_size=margs.hidden_size, target_vocab_size=margs.vocab_size,
                       target_num_layers=margs.num_hidden_layers)
    if note := prepare_draft(draft, model):
        prepared += ", " + note
    return loaded, model, draft, prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_draft_args(parser, "measured rounds after a warm-up round, as bench.py", ",".join(PROMPTS))
    parser.add_argument("--costs", default=None, help="forward ms by rows, e.g. 1:34.6,16:82.3 (default: measured here)")
    parser.add_argument("--draft-ms", type=float, default=None, help="draft forward ms at one kept row (default: measured)")
    parser.add_argument("--row-ms", type=float, default=None, help="draft ms per further kept row (default: measured)")
    parser.add_argument("--host-ms", type=float, default=1.0, help="host ms per cycle")
    parser.add_argument("--plain-ms", type=float, default=None,
                        help="ms of a plain step launched before the previous one's sync (default: a 1-row forward)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--confidence", action="store_true",
                        help="drafting cycles verify as far as the draft is sure (the CPU's default), from its "
                             "teacher-forced probabilities")
    parser.add_argument("--answers", type=Path, default=None,
                        help="cache of the answers' runs: read if it exists (same draft and prompts), else written")
    args = parser.parse_args()
    maybe_reexec_with_blas()  # may replace the process; no-op on a GPU

    from engine.decode.drafters import DFlashDrafter
    from engine.decode.plain_decoder import PlainDecoder
    from engine.model.target import Target
    from engine.decode.proposal_head import load_proposal_head
    from engine.train.objective import anchor_confidence, anchor_runs

    loaded, model, draft, prepared = load_target_and_draft(args)
    print(f"[replay] {loaded.description}; {prepared}", flush=True)
    block = draft.config.block_size
    target = Target(model, draft.config.target_layer_ids)
    # as the server builds it: greedy proposals over the draft's proposal vocabulary, where it ships one
    head = load_proposal_head(args.draft, target.output_head, output_multiplier=draft.config.output_multiplier)
    drafter = DFlashDrafter(draft, target, head)

    names = [p.strip() for p in args.prompts.split(",") if p.strip()]
    answers: dict[str, dict] = {}
    if args.answers is not None and args.answers.exists():
        cached = json.loads(args.answers.read_text())
        answers = {n: cached[n] for n in names if n in cached and cached[n]["length"] - cached[n]["first"] == args.max_tokens
                   and (not args.confidence or "confidence" in cached[n])}
    for name in (n for n in names if n not in answers):
        ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[name]}])
        out = [t for s in PlainDecoder(model).generate(ids, GREEDY, args.max_tokens, TokenRng(0)) for t in s.tokens]
        seq = np.array(ids + out)
        _, taps = target(mx.array(seq[None]), None, taps=True)
        runs = anchor_runs(draft, target, taps, seq, len(ids))
        answers[name] = {"first": len(ids), "length": len(seq), "runs": runs.tolist()}
        if args.confidence:
            confidence = anchor_confidence(draft, target, taps, seq, len(ids), None if head is None else head.product)
            answers[name]["confidence"] = confidence.round(5).tolist()
        print(f"[replay] {name}: {len(out)} tokens, mean teacher-forced run {runs.mean():.2f}", flush=True)
    if args.answers is not None:
        args.answers.write_text(json.dumps(answers))

    costs = measure_costs(args, target, drafter, block, answers, loaded.tokenizer)
    print(f"[replay] costs: {costs.describe()}")
    rng = np.random.default_rng(0)
    first, length = 64, 64 + args.max_tokens
    synthetic = {
        "useless": [0] * args.max_tokens,  # a drafter that is never right
        "weak": [int(np.argmin(rng.random(block) < 0.3)) for _ in range(args.max_tokens)],  # right 30% a position
    }
    plain = 1 / costs.plain()
    results: dict[str, dict] = {"costs": costs.describe(), "fixed": {}, "adaptive": {}}
    print(f"\n{'fixed width':<12}" + "".join(f"{n:>8}" for n in names))
    for width in (1, 2, 3, 4, 6, 8, block - 1):
        ratios = [replay(None, a["runs"], a["length"], a["first"], costs, block, fixed=width) / plain for a in answers.values()]
        results["fixed"][width] = dict(zip(names, ratios))
        print(f"{width:<12}" + "".join(f"{r:>8.2f}" for r in ratios))
    # the controller is path-dependent (it carries over between requests): also the mean over 9 prompt orders
    orders = [names] + [list(p) for p in itertools.islice(itertools.permutations(names), 1, None, 97)][:8]
    scenarios = {"bench order": [names], "9 orders": orders, "useless": [["useless"]], "weak": [["weak"]]}
    print(f"\n{'adaptive':<12}{'mean':>7}{'median':>8}  per request (x plain, warm-up round excluded)")
    for label, label_orders in scenarios.items():
        measured = []
        for order in label_orders:
            # as the server: the chained plain step measured with the curve
            controller = VerifyWidth(block - 1, costs.curve, draft_row_s=costs.row_s, plain_s=costs.plain())
            for rnd in range(args.rounds + 1):
                for i, name in enumerate(order):
                    if rnd or i:  # as SpeculativeDecoder.generate: every request after the controller's first
                        controller.new_request()
                    spec = answers.get(name) or {"runs": synthetic[name], "length": length, "first": first}
                    rate = replay(controller, spec["runs"], spec["length"], spec["first"], costs, block,
                                  confidence=spec.get("confidence") if args.confidence else None) / plain
                    if rnd:
                        measured.append((name, rate))
        ratios = [r for _, r in measured]
        results["adaptive"][label] = {"mean": statistics.fmean(ratios), "median": statistics.median(ratios), "requests": measured}
        shown = measured if len(label_orders) == 1 else []
        print(f"{label:<12}{statistics.fmean(ratios):>7.3f}{statistics.median(ratios):>8.3f}  "
              + " ".join(f"{n}:{r:.2f}" for n, r in shown))
        if label == "9 orders":  # bench.py's per-prompt check: adaptive / max(plain, fixed RIVALS)
            best = {n: max([1.0] + [results["fixed"][w][n] for w in RIVALS]) for n in names}
            against = {n: statistics.fmean(r for m, r in measured if m == n) / best[n] for n in names}
            results["adaptive"][label]["against_best"] = against
            print(f"{'x best':<12}{min(against.values()):>7.3f}{'':>8}  " + " ".join(f"{n}:{r:.3f}" for n, r in against.items())
                  + f"  (per prompt, adaptive / max(plain, fixed {','.join(map(str, RIVALS))}); mean: the worst)")
    if args.out:
        args.out.write_text(json.dumps({**results, "answers": answers}, indent=1))


def measure_costs(args: argparse.Namespace, target: object, drafter: object, block: int, answers: dict,
                  tokenizer: object, max_rows: int | None = None) -> Costs:
    """The target's forward by rows (up to `max_rows`, default the block) at a 300-token context and the
    draft's cost, unless given."""
    max_rows = max_rows or block
    if args.costs:
        points = {int(r): float(ms) / 1e3 for r, ms in (p.split(":") for p in args.costs.split(","))}
        curve = CostCurve.from_points(points, max_rows)
    else:
        cache = target.make_cache()
        mx.eval(target(mx.array([[100 + i % 4000 for i in range(300)]], dtype=mx.int32), cache, taps=True))

        def forward(rows: int) -> None:
            mx.eval(target(mx.full((1, rows), 5, dtype=mx.int32), cache, taps=True))
            target.trim(cache, rows)

        curve = CostCurve.measure(forward, max_rows, repeats=5)
    plain_s = None if args.plain_ms is None else args.plain_ms / 1e3
    if args.draft_ms is not None and args.row_ms is not None:
        return Costs(curve, args.draft_ms / 1e3, args.row_ms / 1e3, args.host_ms / 1e3, plain_s)
    ids = list(range(100, 400))
    _, taps = target(mx.array([ids], dtype=mx.int32), None, taps=True)

    def draft_seconds(keep: int) -> float:
        """A cycle's draft: one new context row (the first call after begin() takes in the whole prompt)."""
        drafter.begin(ids, taps)
        mx.eval(drafter.propose([ids[-1]], None, block - 1, GREEDY, TokenRng(0), keep=keep).tokens)
        best = float("inf")
        for _ in range(8):
            start = time.perf_counter()
            mx.eval(drafter.propose([ids[-1]], taps[:, -1:], block - 1, GREEDY, TokenRng(0), keep=keep).tokens)
            best = min(best, time.perf_counter() - start)
        drafter.end()
        return best

    one, full = draft_seconds(1), draft_seconds(block - 1)
    row = max(full - one, 0.0) / (block - 2)
    draft_s = args.draft_ms / 1e3 if args.draft_ms is not None else one - row
    row_s = args.row_ms / 1e3 if args.row_ms is not None else row
    return Costs(curve, draft_s, row_s, args.host_ms / 1e3, plain_s)


if __name__ == "__main__":
    main()
