"""A draft LM head over the tokens answers use most, for greedy proposals on the CPU.

A draft's LM head is the target's: on this CPU backend SmolLM2's 49,152 x 576 float32 head took 3.05 /
5.55 / 13.1 ms at 1 / 3 / 15 rows, the largest part of a draft cycle. Proposals need not be exact (the
target verifies every one, so output is unchanged): the argmax over the K most frequent answer tokens
costs K/V of it. A token outside the K can then never be proposed; 16,384 of SmolLM2's tokens cover
98.2% of held-out answer tokens. The ids ship beside the draft (`proposal_vocab.npy`, most frequent
first); a draft without the file proposes over the whole vocabulary. The subset's columns are a copy
(SmolLM2: 16,384 x 576 float32, 37.7 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

FILE = "proposal_vocab.npy"


def head_matrix(lm_head: Callable[[mx.array], mx.array]) -> mx.array | Any | None:
    """The (H, V) float matrix behind a target's LM head, a quantized embedding the CPU kernel runs, or None
    (other quantized or unknown heads)."""
    owner = getattr(lm_head, "__self__", lm_head)  # a bound `as_linear` or the head module itself
    if callable(getattr(owner, "subset", None)):  # engine/model/quant_linear.QuantEmbedding
        return owner
    if isinstance(owner, nn.QuantizedLinear | nn.QuantizedEmbedding):
        return None
    if isinstance(owner, nn.Module) and "bias" in owner:  # a biased head's argmax is not the product's
        return None
    if isinstance(owner, nn.Module) and "weight_t" in owner:  # engine/model/transposed.py
        return owner["weight_t"]
    if isinstance(owner, nn.Linear | nn.Embedding):
        return owner.weight.T
    return None


class ProposalHead:
    """argmax over a subset of the vocabulary: (k, H) hidden -> (k,) token ids."""

    def __init__(self, ids: np.ndarray, matrix: mx.array | Any) -> None:
        """`matrix`: the head's (H, V) float matrix, or a quantized embedding (engine/model/quant_linear.
        QuantEmbedding) whose `subset` runs the kernel over the chosen rows."""
        vocab = matrix.shape[1] if isinstance(matrix, mx.array) else matrix.num_embeddings
        if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"{FILE}: token ids must be a non-empty list within the vocabulary (0..{vocab - 1})")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{FILE}: token ids repeat")
        self.ids = mx.array(ids.astype(np.int32))
        # the quantized CPU kernel's softmax maximum, where the head runs on it: how sure each proposal is
        self._top_probability: Callable[[mx.array], mx.array] | None = None
        if isinstance(matrix, mx.array):
            subset = mx.contiguous(matrix[:, self.ids])  # (H, K): a copy, read at K/V of the full head's cost
            mx.eval(self.ids, subset)
            self._product: Callable[[mx.array], mx.array] = lambda hidden: hidden @ subset
        else:
            self._product = matrix.subset(self.ids)
            self._top_probability = matrix.top_probability

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.propose(hidden)[0]  # the confidence stays an unevaluated graph: nothing computes it

    def propose(self, hidden: mx.array) -> tuple[mx.array, mx.array | None]:
        """(k, H) hidden -> (k,) token ids and, where the kernel computes it cheaply, (k,) each one's probability
        under the draft (softmax over the subset), else None."""
        logits = self.product(hidden)
        ids = self.ids[mx.argmax(logits, axis=-1)]
        return ids, None if self._top_probability is None else self._top_probability(logits)

    def product(self, hidden: mx.array) -> mx.array:
        """(…, H) -> (…, K): the head's products at the subset's columns, in the subset's order (self.ids)."""
        return self._product(hidden)


def proposal_vocab(counts: np.ndarray, coverage: float) -> np.ndarray | None:
    """The fewest token ids, most frequent first, that cover `coverage` of the counted tokens; None where
    that takes over half the vocabulary (too little of the head saved to be worth a copy of it)."""
    if not 0 < coverage < 1 or counts.sum() == 0:
        return None
    order = np.argsort(-counts, kind="stable")
    k = int(np.searchsorted(np.cumsum(counts[order]), coverage * counts.sum())) + 1
    return order[:k].astype(np.int32) if k <= len(counts) // 2 else None


def save_proposal_vocab(ids: np.ndarray, draft_dir: str | Path) -> Path:
    path = Path(draft_dir) / FILE
    np.save(path, ids.astype(np.int32))
    return path


def load_proposal_head(draft_dir: str | Path, lm_head: Callable[[mx.array], mx.array], *,
                       output_multiplier: float = 1.0) -> ProposalHead | None:
    """The draft directory's proposal vocabulary over the target's head, where it applies.

    Only on the CPU backend, where the head's cost was measured to matter; only where the argmax of the
    subset's raw products is the argmax of the draft's logits (a positive output multiplier; softcapping
    is monotonic)."""
    path = Path(draft_dir) / FILE
    if mx.default_device() != mx.cpu or not path.is_file() or output_multiplier <= 0:
        return None
    matrix = head_matrix(lm_head)
    if matrix is None:
        return None
    return ProposalHead(np.load(path), matrix)
