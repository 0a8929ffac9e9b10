"""engine/decode/proposal_head.py: greedy proposals over a token subset, lossless through verification."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny_models import build_draft, build_target, draft_config, speculative_greedy, target_config

from engine.decode.drafters import DFlashDrafter
from engine.decode.proposal_head import FILE, ProposalHead, head_matrix, load_proposal_head, proposal_vocab
from engine.decode.sampling import SamplingParams, TokenRng
from engine.decode.speculative import SpeculativeDecoder
from engine.model.draft import DFlashDraft
from engine.model.fused import fuse_projections
from engine.model.target import Target
from engine.model.transposed import transpose_linears

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]


def test_argmax_over_the_subset_mapped_back_to_token_ids() -> None:
    matrix = mx.random.normal((8, 50), key=mx.random.key(0))
    hidden = mx.random.normal((6, 8), key=mx.random.key(1))
    ids = np.array([41, 3, 17, 29, 8, 0, 33], dtype=np.int32)
    got = np.array(ProposalHead(ids, matrix)(hidden))
    scores = np.array(hidden) @ np.array(matrix)[:, ids]
    assert got.tolist() == ids[scores.argmax(axis=-1)].tolist()
    full = ProposalHead(np.arange(50), matrix)(hidden)  # the whole vocabulary: the plain argmax
    assert mx.array_equal(full, mx.argmax(hidden @ matrix, axis=-1)).item()


@pytest.mark.parametrize("ids", [np.array([], dtype=np.int32), np.array([3, 50]), np.array([-1, 2]), np.array([4, 4])])
def test_bad_vocabularies_are_refused(ids: np.ndarray) -> None:
    with pytest.raises(ValueError, match=FILE):
        ProposalHead(ids, mx.zeros((8, 50)))


def test_the_head_matrix_of_each_kind_of_lm_head() -> None:
    linear = nn.Linear(8, 50, bias=False)
    assert mx.array_equal(head_matrix(linear), linear.weight.T).item()
    embedding = nn.Embedding(50, 8)
    assert mx.array_equal(head_matrix(embedding.as_linear), embedding.weight.T).item()  # a tied head
    holder = nn.Module()
    holder.head = linear
    transpose_linears(holder)
    assert mx.array_equal(head_matrix(holder.head), linear.weight.T).item()  # stored transposed
    assert head_matrix(nn.Linear(8, 50, bias=True)) is None
    biased = nn.Module()
    biased.head = nn.Linear(8, 50, bias=True)
    transpose_linears(biased)
    assert head_matrix(biased.head) is None  # transposed, and still biased
    assert head_matrix(nn.QuantizedLinear.from_linear(nn.Linear(64, 64, bias=False))) is None


def test_loaded_only_from_a_file_beside_the_draft(tmp_path: Path) -> None:
    linear = nn.Linear(8, 50, bias=False)
    assert load_proposal_head(tmp_path, linear) is None  # no file: the whole vocabulary
    np.save(tmp_path / FILE, np.array([5, 7, 9], dtype=np.int32))
    head = load_proposal_head(tmp_path, linear)
    assert head is not None and head.ids.tolist() == [5, 7, 9]
    assert load_proposal_head(tmp_path, linear, output_multiplier=-1.0) is None  # argmax would flip


def _half_vocabulary() -> tuple[DFlashDraft, Target, list[int], np.ndarray]:
    """A prepared tiny target, its draft, their greedy output, and a subset: the even ids and its first tokens."""
    config = target_config("llama")
    model = build_target(config, seed=2)
    fuse_projections(model)
    transpose_linears(model)
    draft = build_draft(draft_config(config), seed=3)
    want = speculative_greedy(model, draft, PROMPT, 32)
    ids = np.array(sorted(set(range(0, config["vocab_size"], 2)) | set(want[:8])), dtype=np.int32)
    return draft, Target(model, draft.config.target_layer_ids), want, ids


def test_greedy_speculative_decoding_with_a_subset_head_equals_plain() -> None:
    """Proposals from half the vocabulary: tokens outside it are never proposed, and the output is the
    target's greedy output all the same (verification decides)."""
    draft, target, want, ids = _half_vocabulary()
    try:
        head = ProposalHead(ids, head_matrix(target.output_head))
        drafter = DFlashDrafter(draft, target, head)
        proposed: list[int] = []
        propose = drafter.propose

        def recording(*args: object, **kwargs: object) -> object:
            proposal = propose(*args, **kwargs)
            proposed.extend(np.array(proposal.tokens).tolist())
            return proposal

        drafter.propose = recording  # type: ignore[method-assign]
        decoder = SpeculativeDecoder(target, drafter, block_size=draft.config.block_size, adaptive=False)
        steps = decoder.generate(PROMPT, SamplingParams(temperature=0.0), 32, TokenRng(0))
        got = [t for step in steps for t in step.tokens]
    finally:
        target.close()
    assert got == want and len(want) == 32
    assert proposed and set(proposed) <= set(ids.tolist())


def test_greedy_trees_rank_the_subset_and_equal_plain() -> None:
    """A tree of 12 nodes every cycle: each position's candidates come from the subset, best first by the
    draft's log-probs normalized over it, and the output is the target's greedy output."""
    draft, target, want, ids = _half_vocabulary()
    try:
        matrix = head_matrix(target.output_head)
        drafter = DFlashDrafter(draft, target, ProposalHead(ids, matrix))
        seen: list[tuple[list[list[int]], list[list[float]]]] = []
        candidates = drafter.propose_candidates

        def recording(*args: object, **kwargs: object) -> tuple[mx.array, mx.array]:
            top, logprobs = candidates(*args, **kwargs)
            seen.append((top.tolist(), logprobs.tolist()))
            return top, logprobs

        drafter.propose_candidates = recording  # type: ignore[method-assign]
        decoder = SpeculativeDecoder(target, drafter, block_size=draft.config.block_size, adaptive=False,
                                     tree_budget=12)
        got = [t for step in decoder.generate(PROMPT, SamplingParams(temperature=0.0), 32, TokenRng(0))
               for t in step.tokens]
        top, logprobs = seen[0]  # (positions, 12): tokens of the subset, best first
        assert all(t in set(ids.tolist()) for row in top for t in row)
        assert all(row == sorted(row, reverse=True) for row in logprobs)
        assert all(np.logaddexp.reduce(row) <= 1e-5 for row in logprobs)  # a share of the subset's mass
    finally:
        target.close()
    assert got == want and sum(1 for b in decoder.stats.budgets if b) >= 2


def test_the_vocabulary_is_the_fewest_most_frequent_tokens_covering_the_share() -> None:
    counts = (1000 / np.arange(1, 1001) ** 1.2).astype(np.int64)[np.random.default_rng(0).permutation(1000)]
    ids = proposal_vocab(counts, 0.9)
    assert ids is not None and ids.dtype == np.int32
    assert counts[ids].tolist() == sorted(counts[ids].tolist(), reverse=True)  # most frequent first
    assert counts[ids].sum() >= 0.9 * counts.sum() > counts[ids[:-1]].sum()  # covers it, one fewer does not
    assert set(counts[ids]) >= {c for c in counts if c > counts[ids[-1]]}  # nothing more frequent left out
    assert proposal_vocab(np.ones(1000, dtype=np.int64), 0.9) is None  # 900 of 1000 tokens: not worth a copy
    assert proposal_vocab(counts, 0.0) is None and proposal_vocab(np.zeros(10, dtype=np.int64), 0.9) is None
