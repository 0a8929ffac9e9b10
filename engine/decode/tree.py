"""Tree verification (issue 22, DDTree): verify the best N continuations of a draft block in one forward.

A DFlash draft scores every block position in one forward, and its positions are predicted in
parallel: every node at depth d-1 has the same candidate children, the top-k of position d, and a
path's score is the sum of its positions' log-probs. The tree of budget N holds the N best-scoring
prefixes of that lattice (/work/shared/docs/tree-verify.md §1). It is built on the device, so the
cycle keeps its one host sync: per depth a beam of the N best prefixes (a node of the global top N
has fewer than N better nodes at its depth, and its parent is in the global top N, so the beams hold
every one), then the N best of all depths in score order. Parents come before children, so any
prefix of that order is a valid tree: a tree built at the largest budget is cut to the chosen one.

The verify forward sees [anchor, nodes...] at positions P + depth, each row attending to the
committed rows, its ancestors and itself (engine/model/tree_attention.py). The walk then follows the
child equal to the target's choice at each row (accept_tree).
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import mlx.core as mx

from engine.decode.sampling import SamplingParams, filter_logprobs

FLOOR = -50.0  # per-position log-probs are clamped here: no infinities in path sums (e^-50 is never a choice)
DEPTH_TIE = 1e-3  # nats per depth in the sort key: a child never ranks before its parent
SPINE_BONUS = 1e3  # with spine=True the draft's top-1 chain ranks first (paths score above -50 * 15)


class DraftTree(NamedTuple):
    """N nodes in score order (parents first); verify row 0 is the root (the anchor), node i is row i + 1."""

    tokens: mx.array  # (N,) int32
    parents: mx.array  # (N,) int32: the verify row of each node's parent (0: the root)
    depths: mx.array  # (N,) int32: 1..L, the block position the node's token fills
    scores: mx.array  # (N,) float32: the path's log-probability under the draft
    spine: mx.array  # (N,) bool: every token on the path is its position's top-1 (the chain)
    ancestors: mx.array  # (N+1, N+1) bool: [i, j] row j is row i or one of its ancestors (row 0: the root)

    @property
    def budget(self) -> int:
        return int(self.tokens.shape[0])

    def cut(self, budget: int) -> DraftTree:
        """The first `budget` nodes: a valid tree, since parents come first."""
        n = min(budget, self.budget)
        return DraftTree(self.tokens[:n], self.parents[:n], self.depths[:n], self.scores[:n], self.spine[:n],
                         self.ancestors[: n + 1, : n + 1])


def rank_scores(logits: mx.array, params: SamplingParams, noise: mx.array | None = None) -> mx.array:
    """(L, V) draft logits -> the log-probs a tree ranks candidates by.

    Greedy: the draft's distribution. Position-keyed sampling: the target takes argmax(log q + g) with
    the rows' own Gumbel noise, so candidates are ranked by the draft's log-probs plus that noise.
    Rejection sampling: the draft's truncated distribution (the target samples each row itself).
    """
    if params.is_greedy:
        x = logits.astype(mx.float32)
    else:
        x = filter_logprobs(logits, params)
        if noise is not None:
            x = x + noise
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def build_tree(logprobs: mx.array, budget: int, *, spine: bool = False) -> DraftTree:
    """The `budget` best prefixes of the per-position top-k lattice, lazily. logprobs: (L, V).

    spine=True puts the top-1 chain first (its nodes up to the budget), then the best other prefixes:
    the tree then always contains the chain a chain cycle would verify.
    """
    depth_count, vocab = logprobs.shape
    k = max(1, min(budget, vocab))
    lp = mx.maximum(logprobs.astype(mx.float32), FLOOR)
    top = mx.argpartition(-lp, k - 1, axis=-1)[:, :k] if k < vocab else mx.broadcast_to(mx.arange(vocab), lp.shape)
    vals = mx.take_along_axis(lp, top, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    ids = mx.take_along_axis(top, order, axis=-1).astype(mx.int32)  # (L, K) best first
    vals = mx.take_along_axis(vals, order, axis=-1)
    rank0 = mx.arange(k) == 0
    # depth 1: the first min(N, K) candidates, already in order
    width = min(budget, k)
    scores, on_spine = vals[0, :width], rank0[:width]
    levels_scores, levels_spine, levels_tokens, levels_parent = [scores], [on_spine], [ids[0, :width]], [None]
    widths = [width]
    for d in range(1, depth_count):
        cand = (scores[:, None] + vals[d][None, :]).reshape(-1)  # (B * K,) children of the beam
        cand_spine = (on_spine[:, None] & rank0[None, :]).reshape(-1)
        new_width = min(budget, widths[-1] * k)
        pick = mx.argsort(-_key(cand, cand_spine, d + 1, spine))[:new_width]
        scores, on_spine = cand[pick], cand_spine[pick]
        parent, rank = pick // k, pick % k
        levels_scores.append(scores)
        levels_spine.append(on_spine)
        levels_tokens.append(ids[d][rank])
        levels_parent.append(parent)
        widths.append(new_width)
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    total = offsets[-1]
    all_scores = mx.concatenate(levels_scores)
    all_spine = mx.concatenate(levels_spine)
    all_depths = mx.concatenate([mx.full((w,), d + 1, dtype=mx.int32) for d, w in enumerate(widths)])
    # a node's parent as an index into the concatenated levels; -1: the root
    all_parents = mx.concatenate(
        [mx.full((widths[0],), -1, dtype=mx.int32)]
        + [p.astype(mx.int32) + offsets[d - 1] for d, p in enumerate(levels_parent) if p is not None]
    )
    n = min(budget, total)
    sel = mx.argsort(-_key(all_scores, all_spine, all_depths, spine))[:n]  # score order, parents first
    row_of = mx.zeros((total,), dtype=mx.int32).at[sel].add(mx.arange(1, n + 1, dtype=mx.int32))
    parent_index = all_parents[sel]
    parents = mx.where(parent_index < 0, 0, row_of[mx.maximum(parent_index, 0)])
    return DraftTree(
        tokens=mx.concatenate(levels_tokens)[sel],
        parents=parents,
        depths=all_depths[sel],
        scores=all_scores[sel],
        spine=all_spine[sel],
        ancestors=ancestor_matrix(parents, depth_count),
    )


def _key(scores: mx.array, on_spine: mx.array, depth: int | mx.array, spine: bool) -> mx.array:
    key = scores - DEPTH_TIE * depth
    return key + SPINE_BONUS * on_spine if spine else key


def ancestor_matrix(parents: mx.array, max_depth: int) -> mx.array:
    """(N,) parent rows -> (N+1, N+1) bool ancestor-or-self matrix, by repeated squaring of one step."""
    n = parents.shape[0] + 1
    parent_of = mx.concatenate([mx.zeros((1,), dtype=mx.int32), parents])  # the root is its own parent
    reach = ((mx.arange(n)[None, :] == parent_of[:, None]) | mx.eye(n, dtype=mx.bool_)).astype(mx.float32)
    for _ in range(max(1, math.ceil(math.log2(max(max_depth, 2))))):  # paths of 2^i steps
        reach = mx.minimum(reach @ reach, 1.0)
    return reach > 0


class TreeVerdict(NamedTuple):
    """What a verified tree commits, lazily."""

    num_accepted: mx.array  # () int32: accepted nodes (the path's depth)
    tokens: mx.array  # (L+1,) int32: tokens[:a] are the path's tokens, tokens[a] the next token
    path: mx.array  # (L+1,) int32: the path's verify rows, root first; rows past a are meaningless
    accepted: mx.array  # (N,) bool: each node is on the path


def accept_tree(
    tree: DraftTree,
    target_logits: mx.array,
    params: SamplingParams,
    max_depth: int,
    key: mx.array | None = None,
    noise: mx.array | None = None,
) -> TreeVerdict:
    """Walk a verified tree from the root: follow the child equal to the target's choice at each row.

    target_logits: (N+1, V), row i the target's distribution after row i's path. The target's choice
    is its argmax (greedy), argmax(log q + noise[depth]) with the noise of the row's sequence position
    (position-keyed sampling; noise (L+1, V) by depth), or else one sample per row. Each row's choice
    is an exact draw from q given its path, and a node is kept only when its parent's choice is its
    token, so every committed token is distributed as the target's (the children are fixed tokens,
    so walking the rows' samples is exact: tree-verify.md §3.2-3.3). Chains need no tree: accept_draft.
    """
    depths = mx.concatenate([mx.zeros((1,), dtype=mx.int32), tree.depths])  # (N+1,)
    if params.is_greedy:
        choice = mx.argmax(target_logits, axis=-1)
    elif noise is not None:
        choice = mx.argmax(filter_logprobs(target_logits, params) + noise[depths], axis=-1)
    else:
        assert key is not None, "sampling without position noise needs a random key"
        choice = mx.random.categorical(filter_logprobs(target_logits, params), axis=-1, key=key)
    choice = choice.astype(mx.int32)  # (N+1,)
    matched = tree.tokens == choice[tree.parents]  # (N,) the edge into each node holds
    broken = mx.concatenate([mx.zeros((1,)), 1.0 - matched.astype(mx.float32)])
    on_path = (tree.ancestors.astype(mx.float32) @ broken) == 0  # (N+1,) every edge from the root holds
    num_accepted = mx.max(mx.where(on_path, depths, 0)).astype(mx.int32)
    # one node per depth is on the path (siblings hold distinct tokens): its row, by depth
    by_depth = on_path[None, :] & (depths[None, :] == mx.arange(max_depth + 1)[:, None])  # (L+1, N+1)
    path = mx.argmax(by_depth, axis=-1).astype(mx.int32)  # (L+1,)
    next_token = choice[path[num_accepted]]
    row_tokens = mx.concatenate([mx.zeros((1,), dtype=mx.int32), tree.tokens])
    padded = row_tokens[mx.concatenate([path[1:], path[:1]])]  # (L+1,) the path's tokens, then filler
    tokens = mx.where(mx.arange(max_depth + 1) == num_accepted, next_token, padded)
    return TreeVerdict(num_accepted, tokens, path, on_path[1:])


def tree_mask(ancestors: mx.array, committed: int) -> mx.array:
    """(1, 1, T, committed + T) bool: every row sees the committed rows, its ancestors and itself."""
    rows = ancestors.shape[0]
    return mx.concatenate([mx.ones((rows, committed), dtype=mx.bool_), ancestors], axis=1)[None, None]


def best_first(logprobs: list[list[float]], budget: int) -> list[tuple[int, ...]]:
    """The host reference (tree-verify.md §1.2): the heap's pop order, as rank paths (for tests).

    logprobs: per depth, log-probs sorted best first. Ties go to the lexicographically smaller rank path.
    """
    depth_count, k = len(logprobs), len(logprobs[0])
    heap = [(-logprobs[0][0], (0,))]
    popped: list[tuple[int, ...]] = []
    while heap and len(popped) < budget:
        neg, ranks = heapq.heappop(heap)
        popped.append(ranks)
        d = len(ranks) - 1
        if ranks[-1] + 1 < k:  # the next sibling
            sibling = neg + logprobs[d][ranks[-1]] - logprobs[d][ranks[-1] + 1]
            heapq.heappush(heap, (sibling, ranks[:-1] + (ranks[-1] + 1,)))
        if d + 1 < depth_count:  # the first child
            heapq.heappush(heap, (neg - logprobs[d + 1][0], ranks + (0,)))
    return popped
