"""The DFlash training objective (spec §3): blocks, their attention mask, the decayed loss, τ.

N random anchors per sequence each open a block [anchor token, MASK × (B−1)]; all blocks of a
batch run through the draft in parallel under one attention mask.

DFlash 2 (shared/docs/dflash2.md §5; the official objective is unpublished) adds NeMo AutoModel's
selector term: loss = block CE + λ · selector CE, the selector's K-way cross-entropy over each slot's
top-K draft candidates, scored with the true predecessor (teacher forcing; slot 1: the anchor), with the
block CE's decay weights; slots whose true token is not among the K are dropped from that term. The conv
has no loss of its own. Correctness and τ then follow the selector's path, as decoding does.

`--loss kl` replaces the block CE by the KL divergence from the frozen target's next-token distribution
at each row (soft labels; z-lab found it about equal to CE, converging slower). Validation keeps the CE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.model.draft import DFlash2Draft, DFlashDraft
from engine.model.target import Target
from engine.train.dataset import BlockBatch


def loss_weights(block_size: int, gamma: float) -> mx.array:
    """(B,) w_0 = 0 (the anchor is given), w_k = exp(−(k−1)/γ) for k ≥ 1 (paper Eq. 4)."""
    k = mx.arange(block_size, dtype=mx.float32)
    return mx.where(k == 0, 0.0, mx.exp(-(k - 1) / gamma))


def block_attention_mask(anchors: mx.array, seq_len: int, block_size: int) -> mx.array:
    """(b, N) anchors -> (b, 1, N*B, S + N*B) bool: which keys each block row may attend to.

    Keys are [context rows 0..S−1 | all blocks]. A block sees context strictly before its anchor
    (the anchor's own hidden state does not exist yet at inference) and its own block in both
    directions, never another block.
    """
    b, n = anchors.shape
    rows = n * block_size
    row_anchor = mx.repeat(anchors, block_size, axis=1)  # (b, N*B)
    sees_context = mx.arange(seq_len)[None, None, :] < row_anchor[:, :, None]  # (b, N*B, S)
    block_id = mx.arange(rows) // block_size
    own_block = mx.broadcast_to(block_id[:, None] == block_id[None, :], (b, rows, rows))
    return mx.concatenate([sees_context, own_block], axis=-1)[:, None]


class BlockTargets(NamedTuple):
    """Device-side inputs and labels for one batch of blocks (N*B rows per sequence)."""

    noise_ids: mx.array  # (b, N*B) [anchor token, MASK × (B−1)] per block
    positions: mx.array  # (b, N*B) absolute position of each row
    labels: mx.array  # (b, N*B) row k of a block predicts the token at anchor + k
    weights: mx.array  # (b, N*B) decay × in-bounds × valid block; 0 on row 0
    mask: mx.array  # (b, 1, N*B, S + N*B)


def block_targets(batch: BlockBatch, block_size: int, mask_token_id: int, gamma: float) -> BlockTargets:
    tokens = mx.array(batch.tokens)  # (b, S)
    b, seq_len = tokens.shape
    anchors = mx.array(batch.anchors)  # (b, N)
    offsets = mx.arange(block_size)
    positions = anchors[:, :, None] + offsets  # (b, N, B)
    in_bounds = positions < mx.array(batch.lengths)[:, None, None]
    flat = positions.reshape(b, -1)
    labels = mx.take_along_axis(tokens, mx.minimum(flat, seq_len - 1), axis=1)  # (b, N*B)
    is_anchor = mx.broadcast_to(offsets == 0, positions.shape).reshape(b, -1)
    noise_ids = mx.where(is_anchor, labels, mask_token_id)
    valid = mx.array(batch.block_valid)[:, :, None]
    weights = loss_weights(block_size, gamma) * in_bounds * valid  # (b, N, B)
    mask = block_attention_mask(anchors, seq_len, block_size)
    return BlockTargets(noise_ids, flat, labels, weights.reshape(b, -1).astype(mx.float32), mask)


def draft_hidden(draft: DFlashDraft, noise: mx.array, context: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
    """The draft over every sequence's blocks; vmap gives each sequence its own row positions.

    Rows come in blocks of block_size: DFlash 2's conv stays inside each (dflash2.md §2.1).
    """
    block_size = draft.config.block_size

    def one(n: mx.array, c: mx.array, p: mx.array, m: mx.array) -> mx.array:
        return draft(n[None], c[None], q_offset=p, mask=m[None], block_size=block_size)[0]

    return mx.vmap(one)(noise, context, positions, mask)  # (b, N*B, H)


def soft_targets(target_logits: mx.array, blocks: BlockTargets, block_size: int) -> mx.array:
    """The target's log-probs for every supervised block row: (b, S, V) -> (b, N, B−1, V) float32.

    Row k ≥ 1 of a block predicts the token at anchor + k, which the target scores at position
    anchor + k − 1. Rows past a sequence's end read its last position; their loss weight is 0.
    """
    b, seq_len, _ = target_logits.shape
    before = blocks.positions.reshape(b, -1, block_size)[:, :, 1:] - 1  # (b, N, B−1)
    rows = mx.clip(before, 0, seq_len - 1).reshape(b, -1)
    picked = target_logits[mx.arange(b)[:, None], rows].astype(mx.float32)  # (b, N*(B−1), V)
    logp = picked - mx.logsumexp(picked, axis=-1, keepdims=True)
    return mx.stop_gradient(logp.reshape(*before.shape, -1))


def block_rows(draft: DFlashDraft, target: Target, taps: mx.array, blocks: BlockTargets) -> mx.array:
    """The draft's hidden states at block rows 1..B−1 (row 0, the anchor, has no proposal): (b, N, B−1, H)."""
    context = draft.project_context(taps)  # (b, S, H)
    noise = draft.noise_embedding(blocks.noise_ids, target.embed).astype(context.dtype)  # (b, N*B, H)
    hidden = draft_hidden(draft, noise, context, blocks.positions, blocks.mask)
    return hidden.reshape(taps.shape[0], -1, draft.config.block_size, hidden.shape[-1])[:, :, 1:]


def dflash_loss(
    draft: DFlashDraft, target: Target, taps: mx.array, blocks: BlockTargets, selector_weight: float = 1.0,
    soft: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Weighted CE over block rows 1..B−1; also returns correctness (b, N, B−1) and its weights.

    soft: the target's log-probs per row (soft_targets): the loss is then KL(target ‖ draft), which
    teaches the target's whole next-token distribution rather than the one token the data holds.
    A DFlash 2 draft adds `selector_weight` × the selector CE (selector_loss), and its correctness is the
    selector's choice along the true path: a block's leading correct slots are what its greedy walk accepts.
    """
    b = taps.shape[0]
    bs = draft.config.block_size
    hidden = block_rows(draft, target, taps, blocks)
    labels = blocks.labels.reshape(b, -1, bs)[:, :, 1:]  # (b, N, B−1)
    weights = blocks.weights.reshape(b, -1, bs)[:, :, 1:]
    logits = draft.logits(hidden, target.lm_head)  # (b, N, B−1, V) float32
    if soft is None:
        per_row = nn.losses.cross_entropy(logits, labels)  # (b, N, B−1)
    else:
        logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        per_row = (mx.exp(soft) * (soft - logq)).sum(axis=-1)
    loss = (per_row * weights).sum() / mx.maximum(weights.sum(), 1e-6)
    if isinstance(draft, DFlash2Draft):
        predecessors = blocks.labels.reshape(b, -1, bs)[:, :, :-1]  # slot k follows the token at k−1 (the anchor first)
        selector_loss, choice = selector_loss_and_choice(draft, hidden, logits, predecessors, labels, weights)
        return loss + selector_weight * selector_loss, choice == labels, weights
    correct = mx.argmax(logits, axis=-1) == labels
    return loss, correct, weights


def selector_loss_and_choice(
    draft: DFlash2Draft, hidden: mx.array, logits: mx.array, predecessors: mx.array, labels: mx.array,
    weights: mx.array,
) -> tuple[mx.array, mx.array]:
    """The selector's teacher-forced K-way CE (NeMo's dflash2_core recipe) and its chosen tokens.

    hidden (..., H) final-normed slot rows, logits (..., V) their unary logits, predecessors/labels/weights
    (...). Candidates are the top-K ids of the logits (no gradient through the choice; the unary scores
    keep theirs); S(b) = U(b) + pair term with the true predecessor. Returns the weighted CE over slots
    whose true token is a candidate, and each slot's argmax candidate (..., int32).
    """
    selector = draft.candidate_selector
    ids, unary = selector.candidates(logits)  # (..., K)
    scores = unary + selector.pair_scores(hidden, predecessors[..., None], ids)[..., 0, :]  # (..., K)
    hit = ids == labels[..., None]
    found = hit.any(axis=-1)
    true_score = (scores * hit).sum(axis=-1)
    ce = mx.logsumexp(scores, axis=-1) - true_score
    kept = weights * found
    loss = (ce * kept).sum() / mx.maximum(kept.sum(), 1e-6)
    choice = mx.take_along_axis(ids, mx.argmax(scores, axis=-1)[..., None], axis=-1)[..., 0]
    return loss, choice


def block_metrics(correct: mx.array, weights: mx.array) -> dict[str, mx.array]:
    """Top-1 accuracy per position and the teacher-forced acceptance length τ.

    τ = 1 + leading correct drafts, over blocks whose labels are all in bounds; with greedy data
    this is exactly what greedy speculative decoding would accept on these contexts. Also each
    block's leading correct drafts ("run") and whether it counts ("full"), both (b, N).
    """
    seen = weights > 0  # (b, N, B−1)
    per_position = (correct & seen).sum(axis=(0, 1)) / mx.maximum(seen.sum(axis=(0, 1)), 1)
    full = seen.all(axis=-1)  # (b, N)
    run = mx.cumprod(correct.astype(mx.int32), axis=-1).sum(axis=-1)  # (b, N)
    tau = 1 + (run * full).sum() / mx.maximum(full.sum(), 1)
    acc = (correct & seen).sum() / mx.maximum(seen.sum(), 1)
    return {"acc": acc, "tau": tau, "acc_by_position": per_position, "run": run, "full": full}


def anchor_runs(draft: DFlashDraft, target: Target, taps: mx.array, tokens: np.ndarray, first: int, chunk: int = 128) -> np.ndarray:
    """Leading correct greedy drafts of the block anchored at each position first..L−2 of one sequence.

    taps: (1, L, T*H) the target's tapped states over `tokens` (L,). Blocks are teacher-forced, so
    greedy decoding that follows `tokens` would accept exactly these; walk() turns them into its τ.
    """
    runs: list[np.ndarray] = []
    for blocks in _anchor_blocks(draft, tokens, first, chunk):
        _, correct, weights = dflash_loss(draft, target, taps, blocks)
        leading = mx.cumprod((correct & (weights > 0)).astype(mx.int32), axis=-1).sum(axis=-1)  # (1, n)
        runs.append(np.array(leading[0]))
    return np.concatenate(runs) if runs else np.zeros((0,), dtype=np.int32)


def anchor_confidence(draft: DFlashDraft, target: Target, taps: mx.array, tokens: np.ndarray, first: int,
                      head: Callable[[mx.array], mx.array] | None = None, chunk: int = 128) -> np.ndarray:
    """The draft's probability of its greedy proposal at each row 1..B−1 of the blocks anchored at first..L−2,
    teacher-forced as anchor_runs: (n, B−1). `head`: the products proposals are ranked by (a proposal head's),
    default the target's LM head."""
    out: list[np.ndarray] = []
    for blocks in _anchor_blocks(draft, tokens, first, chunk):
        hidden = block_rows(draft, target, taps, blocks)[0]  # (n, B−1, H)
        logits = np.asarray(draft.logits(hidden, head or target.lm_head).astype(mx.float32), dtype=np.float64)
        out.append(1.0 / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    return np.concatenate(out) if out else np.zeros((0, draft.config.block_size - 1))


def _anchor_blocks(draft: DFlashDraft, tokens: np.ndarray, first: int, chunk: int) -> Iterator[BlockTargets]:
    """One sequence's blocks anchored at first..L−2, `chunk` anchors at a time, teacher-forced."""
    length = len(tokens)
    for start in range(first, length - 1, chunk):
        anchors = np.arange(start, min(start + chunk, length - 1), dtype=np.int32)[None]  # (1, n)
        batch = BlockBatch(tokens[None].astype(np.int32), np.array([length], dtype=np.int32),
                           np.array([first], dtype=np.int32), anchors, np.ones(anchors.shape, dtype=bool))
        yield block_targets(batch, draft.config.block_size, draft.config.mask_token_id, gamma=1.0)


def walk(runs: np.ndarray, first: int, length: int) -> tuple[int, int]:
    """(verify cycles, accepted drafts) of greedy speculative decoding along a sequence of `length`
    tokens whose first generated token sits at `first`; the anchor at position i accepts runs[i − first].

    Random anchors (block_metrics' τ) weigh easy and hard stretches alike; decoding crosses easy ones
    in a few long cycles and spends most cycles on hard ones, so this τ is the one decoding gets.
    """
    cycles = accepted = 0
    anchor = first
    while anchor < length - 1:
        run = min(int(runs[anchor - first]), length - 1 - anchor)
        cycles, accepted = cycles + 1, accepted + run
        anchor += run + 1
    return cycles, accepted
