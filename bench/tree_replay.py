"""Replay chain-or-tree plans over teacher-forced draft candidates, priced by measured costs.

As bench/width_replay.py does for chains: greedy output does not depend on what is verified, so each
prompt's answer is fixed, and so is what any tree anchored at each of its positions would accept. A
block's candidates are each position's K best tokens as DFlashDrafter.propose_candidates ranks them
(the proposal head's vocabulary for greedy requests), and the answer's token at each position has a rank
among them; a tree of budget N (engine/decode/tree.best_first) then accepts its deepest node whose rank
path is the answer's. Replaying VerifyWidth.plan over that compares tree policies (auto, fixed budgets)
with chains in seconds, without timing noise; bench/bench.py --tree-budget measures the real thing.

    python bench/tree_replay.py --draft engine/drafts/smollm2-135m-instruct-dflash
    python bench/tree_replay.py --draft DIR --costs 1:4.4,4:4.7,16:6.0,32:7.5,64:10 --draft-ms 2.3 --row-ms 0 \\
        --host-ms 0 --tree-ms 0.4 --plain-ms 5.5
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx

from bench import GREEDY, PROMPTS  # bench/bench.py: this script's folder is on sys.path
from width_replay import Costs, add_draft_args, chain_cycle, load_target_and_draft, measure_costs

from engine.backend.blas import maybe_reexec_with_blas
from engine.decode.sampling import TokenRng
from engine.decode.tree import best_first
from engine.decode.verify_width import TREE_BUDGETS, Plan, TreeOutcome, VerifyWidth

K = 32  # candidates kept per position: what the heap may pop for trees up to 64 nodes


class Answer(NamedTuple):
    """One prompt's greedy answer, and at each anchor a block's candidates and where the answer ranks."""

    first: int  # position of the first generated token
    length: int  # prompt + answer tokens
    logprobs: list[list[list[float]]]  # per anchor, per block position: the K best log-probs, best first
    ranks: list[list[int]]  # per anchor, per block position: the answer token's rank (K: not among them)

    def run(self, anchor: int) -> int:
        """Leading drafts of the top-1 chain the target accepts at this anchor."""
        ranks = self.ranks[anchor - self.first]
        return next((i for i, r in enumerate(ranks) if r != 0), len(ranks))


class TreeCosts(NamedTuple):
    """Chain costs (width_replay.Costs) and what a tree cycle adds beyond its (N + 1)-row forward and a
    full-block draft: ranking the candidates, the host's build and the cycle's second sync."""

    chain: Costs
    tree_s: float

    def tree(self, budget: int, depth: int) -> float:
        c = self.chain
        return c.curve(budget + 1) + c.host_s + c.draft_s + c.row_s * depth + self.tree_s


def candidates(drafter: object, target: object, taps: mx.array, tokens: np.ndarray, first: int, k: int) -> Answer:
    """Teacher-forced: the draft block anchored at every answer position, ranked as live greedy trees rank."""
    from engine.train.dataset import BlockBatch
    from engine.train.objective import block_targets, draft_hidden

    draft = drafter.draft
    block = draft.config.block_size
    length = len(tokens)
    logprobs: list[list[list[float]]] = []
    ranks: list[list[int]] = []
    context = draft.project_context(taps)
    for start in range(first, length - 1, 32):
        anchors = np.arange(start, min(start + 32, length - 1), dtype=np.int32)[None]
        batch = BlockBatch(tokens[None].astype(np.int32), np.array([length], dtype=np.int32),
                           np.array([first], dtype=np.int32), anchors, np.ones(anchors.shape, dtype=bool))
        blocks = block_targets(batch, block, draft.config.mask_token_id, gamma=1.0)
        noise = draft.noise_embedding(blocks.noise_ids, target.embed).astype(context.dtype)
        hidden = draft_hidden(draft, noise, context, blocks.positions, blocks.mask).reshape(-1, block, context.shape[-1])
        labels = np.array(blocks.labels.reshape(-1, block))[:, 1:]
        for i in range(hidden.shape[0]):
            ids, lp = drafter.candidates(hidden[i, 1:], GREEDY, TokenRng(0), int(anchors[0, i]), k)  # as live trees
            ids, lp = np.array(ids), np.array(lp)
            logprobs.append(np.round(lp, 4).tolist())
            ranks.append([int(np.flatnonzero(row == t)[0]) if (row == t).any() else k for row, t in zip(ids, labels[i])])
    return Answer(first, length, logprobs, ranks)


def tree_outcome(answer: Answer, anchor: int, budget: int, scored: int, depth: int) -> tuple[int, TreeOutcome]:
    """(accepted nodes, what the controller sees) of a tree of `budget` nodes at this anchor."""
    lp = answer.logprobs[anchor - answer.first][:depth]
    pops, scores = best_first(lp, max(budget, scored))
    chosen = pops[:budget]
    truth = tuple(answer.ranks[anchor - answer.first][:depth])
    on_path = [truth[: len(p)] == p for p in chosen]
    accepted = max((len(p) for p, hit in zip(chosen, on_path) if hit), default=0)
    spine = sum(1 for p in chosen if not any(p))
    spine_accepted = min(answer.run(anchor), spine, accepted)
    return accepted, TreeOutcome(budget, scores, on_path, spine, spine_accepted)


def replay(controller: VerifyWidth | None, answer: Answer, costs: TreeCosts, block: int,
           fixed: Plan | None = None) -> tuple[float, int, int]:
    """(tok/s, cycles, tree cycles) of one request (tok/s from the first token to the last, as bench.py
    counts) under `controller` or a fixed plan.

    Mirrors SpeculativeDecoder: a width-0 cycle after another is chained (costs a plain step); the first
    drafting cycle after plain steps teaches no overheads; a tree verifies the plan's budget, scored at
    the largest one."""
    anchor, emitted, seconds = answer.first, 1, 0.0
    total = answer.length - answer.first
    previous: int | None = None
    cycles = trees = 0
    scored = controller.max_budget if controller is not None else (fixed.budget if fixed else 0)
    while emitted < total:
        remaining = total - emitted
        depth = min(block - 1, remaining)
        plan = fixed if controller is None else controller.plan()
        if plan.budget:
            accepted, outcome = tree_outcome(answer, anchor, plan.budget, scored, depth)
            cost = costs.tree(plan.budget, depth)
            if controller is not None:
                controller.update_tree(outcome, cost)
            drafts = depth
            trees += 1
        else:
            drafts = min(plan.width, depth)
            accepted, cost = chain_cycle(controller, costs.chain, drafts, answer.run(anchor), previous)
        emitted += min(accepted + 1, remaining)
        anchor += accepted + 1
        seconds += cost
        previous = drafts
        cycles += 1
    return (total - 1) / seconds, cycles, trees


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_draft_args(parser, "passes over the prompts per order after a warm-up pass", "code,code2,chat,chat2,math,math2")
    parser.add_argument("--costs", default=None, help="forward ms by rows up to 65, e.g. 1:4.4,16:6.0,64:10 (default: measured)")
    parser.add_argument("--draft-ms", type=float, default=None, help="draft forward ms at one kept row (default: measured)")
    parser.add_argument("--row-ms", type=float, default=None, help="draft ms per further kept row (default: measured)")
    parser.add_argument("--host-ms", type=float, default=0.0, help="host ms per cycle")
    parser.add_argument("--plain-ms", type=float, default=None, help="ms of a chained plain step (default: a 1-row forward)")
    parser.add_argument("--tree-ms", type=float, default=2.8,
                        help="what a tree cycle adds to its forward and a full-block draft (this CPU: ~2.8 ms)")
    parser.add_argument("--budgets", default="8,16,32", help="fixed budgets to compare")
    parser.add_argument("--answers", type=Path, default=None, help="cache of the answers' candidates: read if it exists, else written")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    maybe_reexec_with_blas()

    from engine.decode.drafters import DFlashDrafter
    from engine.decode.plain_decoder import PlainDecoder
    from engine.decode.proposal_head import load_proposal_head
    from engine.model.target import Target

    loaded, model, draft, prepared = load_target_and_draft(args)
    print(f"[tree-replay] {loaded.description}; {prepared}", flush=True)
    block = draft.config.block_size
    target = Target(model, draft.config.target_layer_ids)
    head = load_proposal_head(args.draft, target.output_head, output_multiplier=draft.config.output_multiplier)
    drafter = DFlashDrafter(draft, target, head)
    names = [p.strip() for p in args.prompts.split(",") if p.strip()]
    answers: dict[str, Answer] = {}
    if args.answers is not None and args.answers.exists():
        cached = json.loads(args.answers.read_text())
        answers = {n: Answer(**cached[n]) for n in names if n in cached
                   and cached[n]["length"] - cached[n]["first"] == args.max_tokens}
    for name in (n for n in names if n not in answers):
        ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[name]}])
        out = [t for s in PlainDecoder(model).generate(ids, GREEDY, args.max_tokens, TokenRng(0)) for t in s.tokens]
        seq = np.array(ids + out)
        _, taps = target(mx.array(seq[None]), None, taps=True)
        answers[name] = candidates(drafter, target, taps, seq, len(ids), K)
        runs = [answers[name].run(a) for a in range(len(ids), len(seq) - 1)]
        print(f"[tree-replay] {name}: {len(out)} tokens, mean teacher-forced run {statistics.fmean(runs):.2f}", flush=True)
    if args.answers is not None:
        args.answers.write_text(json.dumps({n: a._asdict() for n, a in answers.items()}))

    max_rows = max(TREE_BUDGETS) + 1
    chain = measure_costs(args, target, drafter, block, {}, loaded.tokenizer, max_rows=max_rows)
    costs = TreeCosts(chain, args.tree_ms / 1e3)
    print(f"[tree-replay] costs: {chain.describe()}, forward at 32 / 64 rows {chain.curve(32) * 1e3:.1f} / "
          f"{chain.curve(64) * 1e3:.1f} ms, a tree cycle's extra {args.tree_ms:.1f} ms")
    plain = 1 / chain.plain()
    results: dict[str, dict] = {"costs": chain.describe(), "fixed": {}, "adaptive": {}}
    print(f"\n{'fixed':<12}" + "".join(f"{n:>8}" for n in names) + f"{'mean':>8}")
    fixed = [Plan(w) for w in (2, 4, 6, block - 1)] + [Plan(block - 1, int(b)) for b in args.budgets.split(",")]
    for plan in fixed:
        ratios = [replay(None, answers[n], costs, block, fixed=plan)[0] / plain for n in names]
        label = f"tree {plan.budget}" if plan.budget else f"chain {plan.width}"
        results["fixed"][label] = dict(zip(names, ratios))
        print(f"{label:<12}" + "".join(f"{r:>8.2f}" for r in ratios) + f"{statistics.fmean(ratios):>8.3f}")
    # the controller carries over between requests: the mean over 9 prompt orders, per prompt
    orders = [names] + [list(p) for p in itertools.islice(itertools.permutations(names), 1, None, 97)][:8]
    print(f"\n{'adaptive':<12}" + "".join(f"{n:>8}" for n in names) + f"{'mean':>8}  trees")
    by_order: dict[str, list[tuple[float, float]]] = {}  # per order: summed x plain, share of tree cycles
    for label, budgets in (("chain", ()), ("tree auto", TREE_BUDGETS)):
        per: dict[str, list[float]] = {n: [] for n in names}
        trees = cycles = 0
        for order in orders:
            controller = VerifyWidth(block - 1, chain.curve, draft_row_s=chain.row_s, plain_s=chain.plain(),
                                     tree_budgets=budgets)  # as the server: the chained step measured with the curve
            total = 0.0
            order_trees = order_cycles = 0
            for rnd in range(args.rounds + 1):
                for i, name in enumerate(order):
                    if rnd or i:
                        controller.new_request()
                    rate, n, t = replay(controller, answers[name], costs, block)
                    if rnd:
                        per[name].append(rate / plain)
                        total += rate / plain
                        order_cycles, order_trees = order_cycles + n, order_trees + t
            by_order.setdefault(label, []).append((total, order_trees / max(order_cycles, 1)))
            cycles, trees = cycles + order_cycles, trees + order_trees
        means = [statistics.fmean(per[n]) for n in names]
        results["adaptive"][label] = dict(zip(names, means))
        print(f"{label:<12}" + "".join(f"{r:>8.2f}" for r in means) + f"{statistics.fmean(means):>8.3f}  {trees / max(cycles, 1):.0%}")
    # the controller's path depends on its first tree cycles: what each prompt order gave
    ratios = [tree / chain_total for (chain_total, _), (tree, _) in zip(by_order["chain"], by_order["tree auto"])]
    shares = [share for _, share in by_order["tree auto"]]
    results["adaptive"]["by order"] = {"tree auto x chain": ratios, "tree cycles": shares}
    print(f"per prompt order, tree auto x chain {min(ratios):.3f}-{max(ratios):.3f}, "
          f"tree cycles {min(shares):.0%}-{max(shares):.0%}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
