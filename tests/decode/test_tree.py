"""Tree verification: construction, the tree forward, the walk, and lossless decoding with trees.

Tiny random float32 targets as tests/decode/test_speculative.py builds them. The oracle drafter puts
the true token at chosen ranks, so trees accept through non-top-1 branches where a chain rejects.
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from test_speculative import (
    GREEDY,
    MIN_GAP,
    PROMPT,
    SEEDED,
    RecordingTarget,
    Varied,
    _chi2,
    _chi2_critical,
    _run,
    _seeded_plain,
    three_token_law,
    varied_target,
)
from tiny_models import (
    build_draft,
    build_target,
    draft_config,
    plain_greedy,
    target_config,
)

from engine.decode.drafters import DFlashDrafter, NgramDrafter, OracleDrafter
from engine.decode.sampling import (
    SamplingParams,
    TokenRng,
    token_logprobs,
)
from engine.decode.speculative import SpeculativeDecoder
from engine.decode.verify_width import TREE_BUDGETS, CostCurve, Plan, TreeOutcome, VerifyWidth
from engine.backend.attention_kernel import tree_bits
from engine.decode.tree import (
    DraftTree,
    accept_tree,
    ancestor_rows,
    build_tree,
    top_candidates,
    tree_mask,
)
from engine.model.fused import fuse_projections
from engine.model.rope_table import use_table_rope
from engine.model.target import Target
from engine.model.tree_attention import TreeRows
from tests.model.test_hybrid import hybrid_config

# true-token ranks per cycle and block position: top-1 wrong and top-2 right, deeper, and chains
RANKS = [[1, 0, 2, 0, 1], [0, 1, 1], [2, 2], [0, 0, 0, 0, 3], [], [1]]


def _rank_paths(tree: DraftTree, ids: list[list[int]]) -> list[tuple[int, ...]]:
    """Each node (in row order) as its rank path: the rank of every token on it among its depth's candidates."""
    tokens, parents, depths = (np.array(x).tolist() for x in (tree.tokens, tree.parents, tree.depths))
    out = []
    for i in range(len(tokens)):
        path, row = [], i + 1
        while row:
            path.append(ids[depths[row - 1] - 1].index(tokens[row - 1]))
            row = parents[row - 1]
        out.append(tuple(reversed(path)))
    return out


def _ancestors(parents: list[int], row: int) -> set[int]:
    out = {0, row}
    while row:
        row = parents[row - 1]
        out.add(row)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def varied(request: pytest.FixtureRequest) -> Varied:
    return varied_target(request.param)


# --- construction --------------------------------------------------------------------------


def _lattice(rng: np.random.Generator, depth: int, vocab: int, k: int, spread: float = 2.0,
             ) -> tuple[list[list[int]], list[list[float]]]:
    logits = spread * rng.normal(size=(depth, vocab))
    lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    ids, vals = top_candidates(mx.array(lp), k)
    return ids.tolist(), vals.tolist()


def test_build_tree_holds_the_n_best_prefixes_with_the_chain_first() -> None:
    """Against every prefix of the lattice enumerated: the tree is prefix-closed and holds N prefixes none of
    which scores below one left out; rows put the top-1 chain first in depth order, parents before
    children; ancestors, bit sets and the pops' scores agree."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        depth, vocab = int(rng.integers(1, 5)), int(rng.integers(2, 7))
        k, budget = int(rng.integers(1, vocab + 1)), int(rng.integers(1, 40))
        ids, vals = _lattice(rng, depth, vocab, k)
        assert all(v == sorted(v, reverse=True) for v in vals) and all(len(set(i)) == len(i) for i in ids)
        score = lambda path: sum(vals[d][r] for d, r in enumerate(path))  # noqa: E731
        every = [p for n in range(1, depth + 1) for p in itertools.product(range(k), repeat=n)]
        tree = build_tree(ids, vals, budget, scored=budget + 5)
        got = _rank_paths(tree, ids)
        assert len(got) == len(set(got)) == min(budget, len(every))
        assert all(p[:-1] in got for p in got if len(p) > 1), "prefix-closed"
        left = [p for p in every if p not in set(got)]
        if left:
            assert min(score(p) for p in got) >= max(score(p) for p in left) - 1e-5
        parents = np.array(tree.parents).tolist()
        assert all(p < i + 1 for i, p in enumerate(parents)), "a parent comes before its child"
        chain = [p for p in got if not any(p)]
        assert got[: len(chain)] == sorted(chain, key=len) and tree.spine == len(chain)
        assert [ids[d][0] for d in range(len(chain))] == np.array(tree.tokens).tolist()[: len(chain)]
        ancestors = np.array(tree.ancestors)
        for row in range(1, len(parents) + 1):
            assert set(np.flatnonzero(ancestors[row]).tolist()) == _ancestors(parents, row)
        assert np.array_equal(np.array(tree.bits), tree_bits(ancestors))
        assert len(tree.scores) == min(budget + 5, len(every))
        assert all(a >= b - 1e-6 for a, b in pairwise(tree.scores))  # pop order
        assert sorted(tree.pops) == list(range(len(got)))
        assert np.allclose([tree.scores[tree.pops[i]] for i in range(len(got))], [score(p) for p in got], atol=1e-4)


def test_spine_trees_hold_the_chain_and_outcomes_read_the_path() -> None:
    ids, vals = _lattice(np.random.default_rng(3), 6, 9, 9, spread=0.5)  # flat: deep chain nodes rank low
    tree = build_tree(ids, vals, 30, spine=True)
    assert tree.spine == 6 and np.array(tree.tokens[:6]).tolist() == [row[0] for row in ids]
    plain = build_tree(ids, vals, 30)
    assert set(_rank_paths(plain, ids)) != set(_rank_paths(tree, ids))  # spine nodes displaced others
    # a path along the chain for 2 nodes, then off it: pops of its rows accepted, spine prefix 2
    rows = _rank_paths(tree, ids)
    branch = rows.index((0, 0, 1)) + 1
    on_path, spine = tree.outcome([0, 1, 2, branch])
    assert spine == 2 and sum(on_path) == 3
    assert on_path[tree.pops[branch - 1]] and on_path[tree.pops[0]] and on_path[tree.pops[1]]
    assert tree.outcome([0])[1] == 0 and tree.outcome(list(range(7)))[1] == 6


# --- the tree forward and the walk ---------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("prepared", [False, True])
def test_tree_rows_compute_each_node_as_its_path_run_as_a_chain(family: str, prepared: bool) -> None:
    """Positions P + depth and the ancestor mask, through mlx-lm's attention or our fused one with
    table RoPE; then the accepted path's rows, moved into place, equal a chain verify's."""
    model = build_target(target_config(family, tie_word_embeddings=False), seed=1)
    if prepared:
        fuse_projections(model)
        use_table_rope(model)
    target = Target(model, (1, 3))
    target.enable_trees()
    rows = [(7, None), (10, 0), (11, 0), (12, 1), (13, 2), (14, 3)]  # (token, parent row); row 0 the root
    parents = mx.array([p for _, p in rows[1:]])
    depths = [0, 1, 1, 2, 2, 3]
    cache = target.make_cache()
    target(mx.array([PROMPT]), cache, taps=False)
    start = target.cache_length(cache)
    tree = TreeRows(start + mx.array(depths), tree_mask(mx.array(ancestor_rows(parents.tolist())), start), start + 4)
    logits, taps = target(mx.array([[t for t, _ in rows]]), cache, taps=True, tree=tree)
    for row in range(len(rows)):
        path = sorted(_ancestors(np.array(parents).tolist(), row))
        chain = target.make_cache()
        target(mx.array([PROMPT]), chain, taps=False)
        want_logits, want_taps = target(mx.array([[rows[r][0] for r in path]]), chain, taps=True)
        assert mx.allclose(logits[0, row], want_logits[0, -1], atol=1e-5).item(), row
        assert mx.allclose(taps[0, row], want_taps[0, -1], atol=1e-5).item(), row
    target.keep_rows(cache, start, [0, 2, 4])
    target.trim(cache, 3)
    chain = target.make_cache()
    target(mx.array([PROMPT + [7, 11, 13]]), chain, taps=False)
    for got, want in zip(cache, chain, strict=True):
        assert got.offset == want.offset
        for a, b in ((got.keys, want.keys), (got.values, want.values)):
            assert mx.allclose(a[..., : got.offset, :], b[..., : want.offset, :], atol=1e-5).item()
    target.close()
    assert not type(model.model.layers[0].self_attn).__name__.startswith("Tree")


def _toy_tree() -> DraftTree:
    """root -> a=1 (row 1), b=2 (row 2); a -> c=3 (row 3); b -> d=4 (row 4); c -> e=5 (row 5)."""
    parents = [0, 0, 1, 2, 3]
    ancestors = ancestor_rows(parents)
    return DraftTree(mx.array([1, 2, 3, 4, 5]), mx.array(parents), mx.array([1, 1, 2, 2, 3]), mx.array(ancestors),
                     mx.array(tree_bits(ancestors)), 0, (0, 1, 2, 3, 4), (0.0,) * 5)


def test_accept_tree_follows_the_targets_choices() -> None:
    tree = _toy_tree()
    for choices, want_tokens, want_path in [  # choices: verify row -> the target's argmax there
        ({0: 1, 1: 3, 3: 5, 5: 0, 2: 4}, [1, 3, 5, 0], [0, 1, 3, 5]),  # a, c, e, then the bonus
        ({0: 2, 2: 4, 4: 1, 1: 3}, [2, 4, 1], [0, 2, 4]),  # the second child, b, then d
        ({0: 3, 1: 3}, [3], [0]),  # no child matches: the correction
        ({0: 1, 1: 4, 3: 5}, [1, 4], [0, 1]),  # c is verified but not reached through a: not kept
    ]:
        logits = mx.full((6, 6), -5.0)
        for row, token in choices.items():
            logits[row, token] = 5.0
        verdict = accept_tree(tree, logits, GREEDY, 3)
        a = verdict.num_accepted.item()
        assert np.array(verdict.tokens).tolist()[: a + 1] == want_tokens
        assert np.array(verdict.path).tolist()[: a + 1] == want_path
        assert np.flatnonzero(np.array(verdict.accepted)).tolist() == [r - 1 for r in want_path[1:]]


def test_accept_tree_samples_each_row_from_the_target() -> None:
    """Unseeded: the first token follows row 0's q, the second row a's q where a was kept."""
    tree = _toy_tree()
    n = 20_000
    params = SamplingParams(temperature=1.0)
    q = mx.array([[0.1, 0.3, 0.2, 0.2, 0.1, 0.1], [0.2, 0.1, 0.1, 0.4, 0.1, 0.1]] + [[1 / 6] * 6] * 4)
    firsts, seconds = Counter(), Counter()
    for key in mx.random.split(mx.random.key(0), n):
        verdict = accept_tree(tree, mx.log(q), params, 3, key=key)
        tokens = np.array(verdict.tokens).tolist()
        firsts[tokens[0]] += 1
        if tokens[0] == 1 and verdict.num_accepted.item() >= 1:
            seconds[tokens[1]] += 1
    for counts, row in ((firsts, 0), (seconds, 1)):
        stat, df = _chi2(counts, dict(enumerate(np.array(q[row]).tolist())), sum(counts.values()))
        assert stat < _chi2_critical(df), (row, stat, df)


# --- lossless decoding ----------------------------------------------------------------------


def _tree_decoder(target: Target, drafter: Any, budget: int | str, block_size: int = 8, **kw: Any) -> SpeculativeDecoder:
    return SpeculativeDecoder(target, drafter, block_size=block_size, adaptive=budget == "auto", tree_budget=budget, **kw)


@pytest.mark.parametrize("spine", [False, True])
@pytest.mark.parametrize("budget", [1, 4, 16, 40])
def test_greedy_trees_equal_plain_and_accept_beyond_the_chain(varied: Varied, budget: int, spine: bool) -> None:
    cfg, model, ref = varied
    target = RecordingTarget(model)
    oracle = lambda: OracleDrafter(ref, vocab_size=cfg["vocab_size"], ranks=RANKS)  # noqa: E731
    decoder = _tree_decoder(target, oracle(), budget, tree_spine=spine)
    out, steps = _run(decoder, len(ref))
    assert out == ref
    assert all(b == budget for b in decoder.stats.budgets[:-1])  # every cycle a tree (the last may be cut short)
    # a tree cycle syncs twice: the draft's candidates (the host builds the tree), then the cycle
    assert decoder.stats.syncs == decoder.stats.cycles + sum(1 for b in decoder.stats.budgets if b)
    if budget >= 4 and not (spine and budget <= 7):  # siblings at depth 1-2 (a spine of 7 fills small trees)
        assert decoder.stats.branched >= 3, decoder.stats
    if budget > 8:
        chain = SpeculativeDecoder(target, oracle(), block_size=8, adaptive=False)
        assert _run(chain, len(ref))[0] == ref
        assert decoder.stats.acceptance_length > chain.stats.acceptance_length
    target.close()


@pytest.mark.parametrize("budget", [8, 24, "auto"])
def test_greedy_dflash_trees_equal_plain(varied: Varied, budget: int | str) -> None:
    cfg, model, ref = varied
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    decoder = _tree_decoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), budget)
    for _ in range(2):  # the second request starts from what the controller learned
        assert _run(decoder, 40)[0] == ref
    if budget == "auto":
        assert decoder.verify_width is not None and decoder.verify_width.node_accept, "a tree probe ran"
    target.close()


def test_trees_run_once_before_any_cycle_is_timed(varied: Varied) -> None:
    """With the cost curve a tree verify runs at the largest budget (on CUDA it compiles the attention
    kernel's tree variant), leaving the cache as it was: the request's output is plain greedy's."""
    cfg, model, ref = varied
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    decoder = _tree_decoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), "auto")
    budgets: list[int] = []
    verify = decoder._verify_tree

    def recorded(tree: Any, *args: Any) -> Any:
        budgets.append(tree.budget if decoder.verify_width is None else -tree.budget)
        return verify(tree, *args)

    decoder._verify_tree = recorded
    assert _run(decoder, 40)[0] == ref
    assert budgets[0] == max(TREE_BUDGETS), budgets  # before the controller existed: the warm-up tree
    target.close()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")
@pytest.mark.parametrize("params", ["greedy", "seeded"])
def test_trees_built_by_the_kernel_decode_as_host_built_ones(varied: Varied, params: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CUDA builds trees (kernels/tree_build.cu, here its source on the SIMT shim), a tree cycle has no
    sync between draft and verify and its tree's host fields are read at the cycle's sync: the output and the
    controller's outcomes are those of host-built trees."""
    from tests.backend.test_tree_build import shim_kernel

    cfg, model, ref = varied
    if params == "seeded":
        ref = _seeded_plain(model, 1234, 40)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    outcomes: dict[str, list[TreeOutcome]] = {}
    syncs: dict[str, int] = {}
    for builder in ("host", "kernel"):
        if builder == "kernel":
            monkeypatch.setattr("engine.decode.speculative.tree_builder", lambda k=shim_kernel(tmp_path): k)
        decoder = _tree_decoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), 16)
        seen = outcomes.setdefault(builder, [])
        outcome = decoder._outcome
        decoder._outcome = lambda cycle, path: seen.append(outcome(cycle, path)) or seen[-1]  # type: ignore[method-assign]
        sampling = GREEDY if params == "greedy" else SEEDED
        out = [t for step in decoder.generate(PROMPT, sampling, 40, TokenRng(1234)) for t in step.tokens]
        assert out == ref, builder
        syncs[builder] = decoder.stats.syncs - decoder.stats.cycles
    assert len(outcomes["kernel"]) == len(outcomes["host"]) >= 5
    for got, want in zip(outcomes["kernel"], outcomes["host"]):  # scores: float32 from the device, doubles on the host
        assert got._replace(scores=[]) == want._replace(scores=[]) and got.scores == pytest.approx(want.scores, rel=1e-6)
    assert syncs["host"] == len(outcomes["host"]) and syncs["kernel"] == 0  # no second sync per tree cycle
    target.close()


def test_rehearsal_runs_every_cycle_shape_and_changes_nothing(varied: Varied) -> None:
    """rehearse() (run at load on GPUs, where a shape's first cycle compiles kernels) verifies every chain width
    and tree budget under greedy, seeded and unseeded sampling, then leaves the controller as it was: the next
    request measures the curve and decodes plain greedy's output."""
    cfg, model, ref = varied
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    decoder = _tree_decoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), "auto")
    shapes: list[tuple[int, int]] = []
    finish = decoder._finish

    def recorded(cycle: Any, *args: Any, **kw: Any) -> Any:
        shapes.append((cycle.width, cycle.block - 1 if cycle.tree is not None else 0))
        return finish(cycle, *args, **kw)

    decoder._finish = recorded
    cycles = decoder.rehearse(PROMPT)
    expected = [(0, 0), (0, 0), *((w, 0) for w in range(1, 8)), *((7, b) for b in TREE_BUDGETS)]
    assert shapes == expected * 3, shapes  # greedy, seeded and unseeded sampling, as scripted
    assert cycles == len(shapes) and decoder.verify_width is None and decoder.cost_curve is None
    assert _run(decoder, 40)[0] == ref
    assert decoder.cost_curve is not None and decoder.verify_width is not None
    target.close()


def test_a_stalled_tree_cycle_does_not_price_trees_out() -> None:
    """A first tree cycle that waited seconds (a kernel compiled) counts as at most the rest of a tree
    cycle's cost, and the tree cycles after it bring the learned extra down to what they cost."""
    controller = VerifyWidth(15, CostCurve.linear(0.010, 0.00002, 65), tree_budgets=TREE_BUDGETS)
    scores = [math.log(0.8 * 0.9**i) for i in range(64)]
    outcome = TreeOutcome(16, scores, [True, False, False, True, True] + [False] * 11, 3, 1)  # siblings paid
    controller.update_tree(outcome, 2.8)
    rest = controller.tree_cost(16) - controller.tree_s
    assert 0 < controller.tree_s <= rest + 1e-9
    for _ in range(40):
        controller.update_tree(outcome, rest + 0.0005)
    assert controller.tree_s < 0.002
    plans = _drive_plans(controller, 100, 0.6, lambda i: 0.9 * 0.97**i)
    assert sum(p.budget > 0 for p in plans[50:]) > 45, Counter(p.budget for p in plans[50:])


def test_greedy_trees_through_the_explicit_block_attention(varied: Varied) -> None:
    """Packed projections, table RoPE and forced explicit attention: the prepared CPU/CUDA path."""
    cfg, _, ref = varied
    model = build_target(cfg, seed=1)
    fuse_projections(model)
    use_table_rope(model)
    from engine.model import attention

    attention.set_mode("unfused")
    try:
        target = Target(model)
        decoder = _tree_decoder(target, OracleDrafter(ref, vocab_size=cfg["vocab_size"], ranks=RANKS), 16)
        assert _run(decoder, 40)[0] == ref
    finally:
        attention.set_mode(None)
        target.close()


@pytest.mark.parametrize("budget", [4, 16])
def test_seeded_trees_equal_plain_seeded(varied: Varied, budget: int) -> None:
    cfg, model, _ = varied
    ref = _seeded_plain(model, 1234, 40)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    oracle = _tree_decoder(target, OracleDrafter(ref, vocab_size=cfg["vocab_size"], ranks=RANKS), budget)
    dflash = _tree_decoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), budget)
    for decoder in (oracle, dflash):
        assert _run(decoder, 40, SEEDED, 1234)[0] == ref, decoder.drafter.name
    assert oracle.stats.accepted > 10
    target.close()


def test_unseeded_tree_sampling_follows_the_truncated_target() -> None:
    """Chi-square over the first three tokens (V=8), as the chain's test; rows are sampled, not rejected."""
    cfg = target_config("qwen3", vocab_size=8, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = build_target(cfg, seed=3)
    dcfg = draft_config(cfg, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64, target_layer_ids=(0, 1))
    target = Target(model, dcfg.target_layer_ids)
    decoder = _tree_decoder(target, DFlashDrafter(build_draft(dcfg, seed=4), target), 6, block_size=3)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    prompt = [1, 2, 3, 4]
    law = three_token_law(model, prompt, params)
    n, accepted = 600, 0
    counts: Counter = Counter()
    for seed in range(n):
        out = [t for s in decoder.generate(prompt, params, 3, TokenRng(seed, by_position=False)) for t in s.tokens]
        counts[tuple(out)] += 1
        accepted += decoder.stats.accepted
    target.close()
    stat, df = _chi2(counts, law, n)
    assert stat < _chi2_critical(df), (stat, df)
    assert accepted > n // 5


def test_logprobs_with_trees_are_the_target_logprobs(varied: Varied) -> None:
    cfg, model, ref = varied
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)
    decoder = _tree_decoder(Target(model), OracleDrafter(ref, vocab_size=cfg["vocab_size"], ranks=RANKS), 8)
    out, steps = _run(decoder, 20, params)
    got = [lp for s in steps for lp in s.logprobs]
    logits = model(mx.array(PROMPT + out)[None])[0, len(PROMPT) - 1 : -1]
    chosen, top_ids, _ = token_logprobs(logits, mx.array(out), 3)
    assert [g.token for g in got] == out
    assert mx.allclose(mx.array([g.logprob for g in got]), chosen, atol=1e-4).item()
    assert [[t for t, _ in g.top] for g in got] == top_ids.tolist()


def test_the_cache_holds_the_committed_rows_when_closed_early(varied: Varied) -> None:
    cfg, model, ref = varied
    target = RecordingTarget(model)
    decoder = _tree_decoder(target, OracleDrafter(ref, vocab_size=cfg["vocab_size"], ranks=RANKS), 16)
    for num_steps in range(1, 6):
        gen = decoder.generate(PROMPT, GREEDY, 40, TokenRng(0))
        emitted = sum(len(next(gen).tokens) for _ in range(num_steps))
        gen.close()
        assert target.cache_length(target.caches[-1]) == len(PROMPT) + emitted - 1


# --- where trees do not apply ------------------------------------------------------------------


def test_hybrid_targets_and_ngram_drafters_stay_on_chains(varied: Varied) -> None:
    cfg = hybrid_config("qwen3_5")
    model = build_target(cfg, seed=2)
    ref, gap = plain_greedy(model, PROMPT, 24)
    assert gap > MIN_GAP
    dcfg = draft_config(cfg)
    target = Target(model, dcfg.target_layer_ids)
    assert "recurrent" in target.tree_support()
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=4,
                                 tree_budget="auto")
    assert decoder.tree_status.startswith("off (hybrid") and decoder.tree_budgets == ()
    assert [t for s in decoder.generate(PROMPT, GREEDY, 24, TokenRng(0)) for t in s.tokens] == ref
    assert not any(decoder.stats.budgets)
    target.close()
    _, attention_model, _ = varied
    ngram = SpeculativeDecoder(Target(attention_model), NgramDrafter(), block_size=4, tree_budget=8)
    assert "ngram" in ngram.tree_status and ngram.tree_budgets == ()


def test_tree_budget_is_validated(varied: Varied) -> None:
    _, model, _ = varied
    for bad in (-1, "many"):
        with pytest.raises(ValueError, match="tree_budget"):
            SpeculativeDecoder(Target(model), NgramDrafter(), block_size=4, tree_budget=bad)
    with pytest.raises(ValueError, match="adaptive"):
        SpeculativeDecoder(Target(model), NgramDrafter(), block_size=4, tree_budget="auto", adaptive=False)


def test_unfamiliar_layers_stay_on_chains() -> None:
    model = build_target(target_config("llama"), seed=0)
    layer = model.model.layers[2]
    attn = layer.self_attn
    del layer.self_attn
    layer.attention = attn  # an attention module the tree hooks do not know where to find
    try:
        assert "layer 2" in Target(model).tree_support()
    finally:
        del layer.attention
        layer.self_attn = attn
    assert Target(model).tree_support() is None


# --- the budget by cost --------------------------------------------------------------------------


def _drive_plans(controller: VerifyWidth, cycles: int, chain_p: float, sibling_p: Any, seed: int = 0) -> list[Plan]:
    """Synthetic cycles: a chain keeps each draft with chain_p. A tree holds the chain's first 3 drafts (its
    spine), accepted as the chain's are; where the chain broke inside them, its other nodes i continue the
    path one by one with sibling_p(i), so a tree commits what the chain does plus those."""
    rng = random.Random(seed)
    plans = []
    for _ in range(cycles):
        plan = controller.plan()
        plans.append(plan)
        chain = next((i for i in range(controller.max_drafts) if rng.random() >= chain_p), controller.max_drafts)
        if plan.budget:
            scores = [math.log(0.8 * 0.9**i) for i in range(controller.max_budget)]
            spine = min(plan.budget, 3)
            on_path = [i < min(chain, spine) for i in range(plan.budget)]
            if chain < spine:
                for i in range(spine, plan.budget):
                    if rng.random() >= sibling_p(i):
                        break
                    on_path[i] = True
            controller.update_tree(TreeOutcome(plan.budget, scores, on_path, spine, min(chain, spine)))
        else:
            controller.update(plan.width, min(chain, plan.width))
    return plans


def test_cheap_rows_and_useful_siblings_choose_large_trees() -> None:
    """A GPU-like flat cost: a 65-row forward costs what a 1-row one does, and siblings get accepted."""
    controller = VerifyWidth(15, CostCurve.linear(0.010, 0.00002, 65), tree_budgets=TREE_BUDGETS)
    plans = _drive_plans(controller, 300, 0.6, lambda i: 0.9 * 0.97**i)
    late = plans[100:]
    assert sum(p.budget >= 16 for p in late) > 0.9 * len(late), Counter(p.budget for p in late)


def test_expensive_rows_keep_chains_and_probe_trees_ever_less() -> None:
    """A CPU-like steep cost and siblings that add nothing beyond the chain: trees are probed, lose, and
    are looked at ever less often (the chain plan is today's behaviour)."""
    controller = VerifyWidth(15, CostCurve.linear(0.010, 0.004, 65), tree_budgets=TREE_BUDGETS)
    plans = _drive_plans(controller, 600, 0.6, lambda i: 0.0)
    trees = [i for i, p in enumerate(plans) if p.budget]
    assert 2 <= len(trees) < 0.03 * len(plans), trees
    assert all(p.budget <= 8 for p in plans), Counter(p.budget for p in plans)  # probes no wider than the chain's cost
    assert max(b - a for a, b in pairwise(trees)) >= 64  # backed off


def test_tree_estimates_follow_the_chains_outlook_both_ways() -> None:
    """Trees learned on content that accepts much, then a request whose chain cycles accept nothing: the
    plan leaves trees before any tree cycle shows it, since a tree is priced as the chain's expected tokens
    times its learned gain; and it returns to them when chain cycles accept again, also without one."""
    controller = VerifyWidth(15, CostCurve.linear(0.010, 0.002, 65), tree_budgets=TREE_BUDGETS)  # rows cost
    plans = _drive_plans(controller, 200, 0.8, lambda i: 0.8 * 0.93**i)
    assert sum(p.budget > 0 for p in plans[100:]) > 80
    gain = dict(controller.tree_gain)
    learned = max(gain, key=gain.__getitem__, default=0)  # the verified budget that gained most
    assert learned and gain[learned] > 0, gain
    controller.new_request()
    probe = controller.plan()  # a new request's first cycle probes the chain
    assert probe.budget == 0 and controller.probing
    controller.update(probe.width, 0)
    for _ in range(12):
        controller.update(3, 0)  # chain cycles of the new content: every draft rejected
    assert controller.peek_plan().budget == 0, controller.peek_plan()
    assert controller.tree_gain == gain  # no tree cycle ran: only the chain's outlook moved
    chain = controller.expected_tokens(controller._drafting_width(controller.rates()))
    assert controller.tree_tokens()[learned] == pytest.approx(chain * (1 + gain[learned]))
    for _ in range(30):
        controller.update(15, 15)  # the content turns easy again: chain cycles accept every draft
    assert controller.peek_plan().budget > 0, controller.peek_plan()


def test_a_fixed_budget_verifies_that_tree_on_every_drafting_cycle() -> None:
    controller = VerifyWidth(15, CostCurve.linear(0.010, 0.004, 65), tree_budgets=(32,), chains=False)
    plans = _drive_plans(controller, 50, 0.6, lambda i: 0.5)
    assert {p for p in plans if p.width} == {Plan(15, 32)}
