"""Tree verification (issue 22, DDTree): verify the best N continuations of a draft block in one forward.

A DFlash draft scores every block position in one forward, and its positions are predicted in
parallel: every node at depth d-1 has the same candidate children, the top-k of position d, and a
path's score is the sum of its positions' log-probs. The tree of budget N holds the N best-scoring
prefixes of that lattice (/work/shared/docs/tree-verify.md §1): the best-first heap's first N pops.

The device reduces the draft's (L, V) scores to each position's top K (`top_candidates`). On CUDA one
kernel (kernels/tree_build.cu, one thread) pops the heap and lays out the rows, so the cycle's draft,
tree and verify launch without a sync between them (`tree_builder`; built from ~170 small MLX ops the
tree cost more than the sync on a launch-bound GPU). Elsewhere the host reads the candidates (the
cycle's second sync) and pops the heap (`build_tree`, ~0.1 ms of Python for 64 nodes). Pops past the
chosen budget score the nodes the controller has not seen.

The verify forward sees [anchor, nodes...] at positions P + depth, each row attending to the
committed rows, its ancestors and itself (engine/model/tree_attention.py). Rows hold the draft's
top-1 chain first, in depth order, then the other nodes in pop order: a path along the chain is
already in place in the cache, so only a branch's rows are moved. The walk follows the child equal
to the target's choice at each row (accept_tree).
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from engine.backend import fast_exp
from engine.backend.attention_kernel import MAX_TREE_ROWS, tree_bits, tree_mask_of
from engine.backend.tree_build import TreeKernel
from engine.decode.sampling import SamplingParams, filter_logprobs
from engine.model.tree_attention import TreeRows

log = logging.getLogger("dflash.tree")

FLOOR = -50.0  # per-position log-probs are clamped here: no infinities in path sums (e^-50 is never a choice)
SPINE_BONUS = 1e3  # with spine=True the draft's top-1 chain pops first (paths score above -50 * 15)


class DraftTree(NamedTuple):
    """N nodes as verify rows: row 0 is the root (the anchor), node i is row i + 1 (see the module doc)."""

    tokens: mx.array  # (N,) int32
    parents: mx.array  # (N,) int32: the verify row of each node's parent (0: the root)
    depths: mx.array  # (N,) int32: 1..L, the block position the node's token fills
    ancestors: mx.array  # (N+1, N+1) bool: [i, j] row j is row i or one of its ancestors (row 0: the root)
    bits: mx.array  # (N+1, 4) uint32: row i's ancestors-or-self as a bit set (the CUDA attention kernel's mask)
    # built on the device, the last three are arrays ((1,), (N,), (S,)) until the cycle's sync: on_host
    spine: int | mx.array  # rows 1..spine are the draft's top-1 chain, in depth order
    pops: tuple[int, ...] | mx.array  # node i's place in best-first order
    scores: tuple[float, ...] | mx.array  # path log-probs of every pop, the unverified ones past the budget included

    @property
    def budget(self) -> int:
        return len(self.pops)

    def lazy(self) -> list[mx.array]:
        """What the cycle's sync must evaluate besides the verdict (a device-built tree's host fields)."""
        return [x for x in (self.spine, self.pops, self.scores) if isinstance(x, mx.array)]

    def on_host(self) -> DraftTree:
        """The tree with spine, pops and scores as Python values (a read: after the cycle's sync)."""
        if not isinstance(self.pops, mx.array):
            return self
        assert isinstance(self.spine, mx.array) and isinstance(self.scores, mx.array)
        return self._replace(spine=int(self.spine.item()), pops=tuple(self.pops.tolist()),
                             scores=tuple(self.scores.tolist()))

    def outcome(self, path: list[int]) -> tuple[list[bool], int]:
        """The accepted path's verify rows (root first) -> per pop whether it was accepted, and how many of
        the spine's rows were (the chain's nodes are rows 1..spine, so those are a prefix of the path)."""
        on_path = [False] * self.budget
        for row in path[1:]:
            on_path[self.pops[row - 1]] = True
        spine = 0
        while spine < min(len(path) - 1, self.spine) and path[spine + 1] == spine + 1:
            spine += 1
        return on_path, spine


def top_candidates(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(L, V) log-probs -> each position's k best (ids (L, k) int32, log-probs (L, k) float32), best first,
    lazily: what the host builds a tree from."""
    vocab = logprobs.shape[-1]
    k = max(1, min(k, vocab))
    lp = mx.maximum(logprobs.astype(mx.float32), FLOOR)
    top = mx.argpartition(-lp, k - 1, axis=-1)[:, :k] if k < vocab else mx.broadcast_to(mx.arange(vocab), lp.shape)
    vals = mx.take_along_axis(lp, top, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return mx.take_along_axis(top, order, axis=-1).astype(mx.int32), mx.take_along_axis(vals, order, axis=-1)


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
    return x - fast_exp.logsumexp(x)  # the CPU's polynomial exp: 4.0 against 8.8 ms over 15 x 49,152


def build_tree(ids: list[list[int]], logprobs: list[list[float]], budget: int, *, scored: int = 0,
               spine: bool = False) -> DraftTree:
    """The tree of the `budget` best prefixes, from each position's candidates best first (top_candidates).

    `scored`: pop this many nodes in all (at least `budget`) so that `scores` covers them (the controller
    prices larger trees by them). spine=True pops the top-1 chain first, then the best other prefixes: the
    tree then always holds the chain a chain cycle would verify.
    """
    pops, scores = best_first(logprobs, max(budget, scored), spine=spine)
    chosen = pops[:budget]
    chain = [i for i, ranks in enumerate(chosen) if not any(ranks)]  # the top-1 chain's nodes, in depth order
    order = chain + [i for i, ranks in enumerate(chosen) if any(ranks)]
    row_of = {chosen[i]: row for row, i in enumerate(order, 1)}
    assert len(order) < MAX_TREE_ROWS, f"a tree of {len(order)} nodes is past {MAX_TREE_ROWS - 1}"
    tokens, parents, depths = [], [], []
    for i in order:
        ranks = chosen[i]
        parents.append(row_of[ranks[:-1]] if len(ranks) > 1 else 0)
        tokens.append(ids[len(ranks) - 1][ranks[-1]])
        depths.append(len(ranks))
    ancestors = ancestor_rows(parents)
    return DraftTree(
        tokens=mx.array(tokens, dtype=mx.int32),
        parents=mx.array(parents, dtype=mx.int32),
        depths=mx.array(depths, dtype=mx.int32),
        ancestors=mx.array(ancestors),
        bits=mx.array(tree_bits(ancestors)),
        spine=len(chain),
        pops=tuple(order),
        scores=tuple(scores),
    )


def lattice_size(depth: int, k: int) -> int:
    """Nodes in the candidate lattice of `depth` positions with `k` candidates each (the most a tree holds)."""
    return sum(k**d for d in range(1, depth + 1))


@functools.cache
def tree_builder() -> TreeKernel | None:
    """The CUDA tree kernel where MLX runs on CUDA and its rows equal build_tree's on random candidates (and
    DFLASH_TREE_KERNEL is not 0); None: the host builds trees after reading the candidates."""
    from engine.backend.verify_matmul import detect_backend

    if detect_backend() != "cuda" or os.environ.get("DFLASH_TREE_KERNEL", "1").strip().lower() in ("0", "off", "no"):
        return None
    from engine.backend.tree_build import make_cuda_kernel

    kernel = make_cuda_kernel()
    try:
        mismatch = check_tree_kernel(kernel)
    except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or run is not used
        mismatch = f"failed: {e!r}"
    if mismatch:
        log.warning("tree kernel off (the host builds trees): %s", mismatch)
        return None
    log.info("draft trees built on the device (kernels/tree_build.cu)")
    return kernel


def check_tree_kernel(kernel: TreeKernel, seed: int = 0) -> str | None:
    """None if the kernel's trees equal build_tree's on random candidates (ties included), else what differed."""
    rng = np.random.default_rng(seed)
    for depth, k, budget, scored, spine in ((15, 64, 16, 64, False), (15, 64, 64, 64, True), (3, 4, 9, 20, False),
                                            (7, 8, 32, 40, False)):
        lp = -np.sort(rng.exponential(1.0, (depth, k)), axis=1).astype(np.float32)
        lp[:, 1::3] = lp[:, 0::3][:, : lp[:, 1::3].shape[1]]  # equal scores: ties broken as Python does
        lp = np.sort(lp, axis=1)[:, ::-1].copy()
        ids = rng.integers(0, 50_000, (depth, k)).astype(np.int32)
        want = build_tree(ids.tolist(), lp.tolist(), budget, scored=scored, spine=spine)
        got = device_tree(kernel, mx.array(ids), mx.array(lp), budget, scored, spine).on_host()
        for name in ("tokens", "parents", "depths", "ancestors", "bits"):
            if not np.array_equal(np.array(getattr(got, name)), np.array(getattr(want, name))):
                return f"{name} differ at depth {depth}, k {k}, budget {budget}"
        if got.pops != want.pops or got.spine != want.spine:
            return f"pop order differs at depth {depth}, k {k}, budget {budget}"
        if not np.allclose(got.scores, want.scores, rtol=1e-6, atol=1e-5):
            return f"scores differ at depth {depth}, k {k}, budget {budget}"
    return None


def device_tree(kernel: TreeKernel, ids: mx.array, logprobs: mx.array, budget: int, scored: int,
                spine: bool = False) -> DraftTree:
    """build_tree's tree from the candidates as lazy device arrays (no sync): kernels/tree_build.cu."""
    tokens, parents, depths, pops, bits, ancestors, scores, spine_rows = kernel(ids, logprobs, budget, scored, spine)
    return DraftTree(tokens, parents, depths, ancestors.astype(mx.bool_), bits, spine_rows, pops, scores)


def ancestor_rows(parents: list[int]) -> np.ndarray:
    """Each node's parent row (parents come first) -> the (N+1, N+1) bool ancestor-or-self matrix, root row 0."""
    out = np.eye(len(parents) + 1, dtype=bool)
    for row, parent in enumerate(parents, 1):
        out[row] |= out[parent]
    return out


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
    return tree_mask_of(ancestors, committed + ancestors.shape[0])[None, None]


def verify_rows(tree: DraftTree, anchor: int, start: int, depth: int) -> tuple[mx.array, TreeRows]:
    """A tree verify's input: [anchor, nodes] (1, N+1), at positions start + depth under the ancestor mask.
    The dense mask stays an unevaluated graph where the CUDA kernel reads the bit sets instead."""
    ids = mx.concatenate([mx.array([anchor], dtype=mx.int32), tree.tokens])[None]
    depths = mx.concatenate([mx.zeros((1,), dtype=mx.int32), tree.depths])
    return ids, TreeRows(start + depths, tree_mask(tree.ancestors, start), start + depth + 1, tree.bits)


def best_first(logprobs: list[list[float]], count: int, *, spine: bool = False) -> tuple[list[tuple[int, ...]], list[float]]:
    """The heap's first `count` pops (tree-verify.md §1.2) as rank paths, and their path log-probs.

    logprobs: per depth, log-probs sorted best first. A node enters the heap when its parent or its previous
    sibling pops, so parents pop before children. Ties go to the lexicographically smaller rank path.
    spine=True: the top-1 chain's nodes rank above every other node.
    """
    depth_count, k = len(logprobs), len(logprobs[0])

    def entry(score: float, ranks: tuple[int, ...]) -> tuple[float, tuple[int, ...], float]:
        bonus = SPINE_BONUS if spine and not any(ranks) else 0.0
        return -(score + bonus), ranks, score

    heap = [entry(logprobs[0][0], (0,))]
    pops: list[tuple[int, ...]] = []
    scores: list[float] = []
    while heap and len(pops) < count:
        _, ranks, score = heapq.heappop(heap)
        pops.append(ranks)
        scores.append(score)
        d = len(ranks) - 1
        if ranks[-1] + 1 < k:  # the next sibling
            sibling = score - logprobs[d][ranks[-1]] + logprobs[d][ranks[-1] + 1]
            heapq.heappush(heap, entry(sibling, ranks[:-1] + (ranks[-1] + 1,)))
        if d + 1 < depth_count:  # the first child
            heapq.heappush(heap, entry(score + logprobs[d + 1][0], ranks + (0,)))
    return pops, scores
