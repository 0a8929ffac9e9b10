"""Drafters: what proposes the tokens a speculative cycle verifies.

A drafter sees the sequence grow one call at a time. Each `propose` gets the tokens emitted
since the previous call (the last of them is the pending token, not yet in the target cache)
and, when `needs_taps`, the target taps of the positions that entered the cache since then.
It returns k <= num_tokens proposals, lazily, and the distribution they were sampled from
(None when the proposal is deterministic: p is then one-hot and rejection sampling stays exact).
Proposals must not force a host sync: the decoder syncs once per cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import mlx.core as mx

from engine.decode.proposal_head import ProposalHead
from engine.decode.sampling import SamplingParams, TokenRng, filter_logprobs
from engine.decode.tree import rank_scores, top_candidates
from engine.decode.verify_width import CostCurve
from engine.model.draft import DFlash2Draft, DFlashDraft, walk_lattice
from engine.model.target import Target


class Proposal(NamedTuple):
    tokens: mx.array  # (k,) int32, k <= num_tokens; the length must be known without a sync
    draft_logprobs: mx.array | None  # (k, V) what tokens were sampled from; None: deterministic
    # (k,) the draft's probability of each greedy proposal, where its head computes it cheaply (the CPU
    # kernel's proposal head); the adaptive width reads it to verify as far as the draft is sure
    confidence: mx.array | None = None


class Drafter(Protocol):
    name: str
    needs_taps: bool  # False lets the decoder skip computing target taps

    def begin(self, prompt_ids: list[int], prompt_taps: mx.array | None) -> None:
        """Reset for a new request. prompt_taps: (1, P, T*H) when needs_taps, else None."""
        ...

    def propose(
        self,
        new_tokens: list[int],
        taps: mx.array | None,
        num_tokens: int,
        params: SamplingParams,
        rng: TokenRng,
        *,
        keep: int | None = None,
    ) -> Proposal:
        """new_tokens: emitted since the last call, new_tokens[-1] pending; taps: (1, n, T*H).

        keep: only the first `keep` proposals will be verified (None: all); a drafter may skip
        the work for the rest, but proposes as if asked for num_tokens.
        """
        ...

    def end(self) -> None:
        """Drop per-request state (caches)."""
        ...


class TreeDrafter(Drafter, Protocol):
    """A drafter that scores every block position, so a cycle can verify a tree of its best continuations."""

    def propose_candidates(
        self, new_tokens: list[int], taps: mx.array | None, num_tokens: int, params: SamplingParams, rng: TokenRng,
        k: int,
    ) -> tuple[mx.array, mx.array]:
        """As propose's inputs; returns each position's k best tokens (num_tokens, k) int32 and the log-probs a
        tree ranks them by (tree.rank_scores), best first, lazily (tree.top_candidates)."""
        ...


def _deterministic(tokens: list[int]) -> Proposal:
    return Proposal(mx.array(tokens, dtype=mx.int32), None)


class DFlashDrafter:
    """One draft forward per cycle over [pending, MASK × k] (spec §2.1 step 2).

    A DFlash 2 draft (DFlash2Draft) proposes through its candidate selector instead of each slot's
    argmax (dflash2.md §2.2, §3): see `_select`. Its proposals form one path, so it verifies chains only.
    """

    name = "dflash"
    needs_taps = True

    def __init__(self, draft: DFlashDraft, target: Target, proposal_head: ProposalHead | None = None) -> None:
        if target.layer_ids != draft.config.target_layer_ids:
            raise ValueError(
                f"target taps {target.layer_ids} != draft target_layer_ids "
                f"{draft.config.target_layer_ids}; build Target(model, draft.config.target_layer_ids)"
            )
        self.draft = draft
        self.target = target
        self.dflash2 = isinstance(draft, DFlash2Draft)
        # greedy DFlash 1 proposals from the most frequent tokens only (engine/decode/proposal_head.py)
        self.proposal_head = None if self.dflash2 else proposal_head
        # SpeculativeDecoder reads this: trees rank each position's own scores, the selector proposes a path
        self.no_trees = "the DFlash 2 selector proposes one path: chains only" if self.dflash2 else None
        # a grammar may pick a row's proposal among its other candidates (speculative._launch_constrained): DFlash 1
        # scores every position from the same context, so a replaced token leaves the later rows as they were
        self.maskable = not getattr(self, "dflash2", False)
        self._cache: list | None = None
        self._mask_rows: mx.array | None = None  # the MASK rows' noise embedding (1, B, H): the same every cycle
        self._unseen: list[mx.array] = []  # taps the draft cache has not ingested yet

    def begin(self, prompt_ids: list[int], prompt_taps: mx.array | None) -> None:
        assert prompt_taps is not None, "DFlashDrafter needs the prompt taps"
        self._cache = self.draft.make_cache()
        self._unseen = [prompt_taps]

    def propose(
        self,
        new_tokens: list[int],
        taps: mx.array | None,
        num_tokens: int,
        params: SamplingParams,
        rng: TokenRng,
        *,
        keep: int | None = None,
    ) -> Proposal:
        hidden, anchor_position = self._forward(new_tokens, taps, num_tokens)
        # the block keeps its trained width; the LM head (a V-wide matmul per row) runs on kept rows only
        kept = num_tokens if keep is None else min(keep, num_tokens)
        if kept == 0:  # the forward above still feeds the new context rows to the draft cache
            return Proposal(mx.zeros((0,), dtype=mx.int32), None)
        if params.is_greedy and self.proposal_head is not None:
            tokens, confidence = self.proposal_head.propose(hidden[0, 1 : kept + 1])
            return Proposal(tokens.astype(mx.int32), None, confidence)
        logits = self.draft.logits(hidden[0, 1 : kept + 1], self.target.lm_head)  # (kept, V); row 0 is the anchor
        if self.dflash2:
            return self._select(hidden[0, 1 : kept + 1], logits, new_tokens[-1], anchor_position, params, rng)
        if params.is_greedy:
            return Proposal(mx.argmax(logits, axis=-1).astype(mx.int32), None)
        logprobs = filter_logprobs(logits, params)  # (k, V)
        if rng.by_position:  # the target's own noise at these positions: a draft that agrees with q is kept
            gumbel = rng.gumbel(anchor_position + 1, *logprobs.shape)
            return Proposal(mx.argmax(logprobs + gumbel, axis=-1).astype(mx.int32), None)
        tokens = mx.random.categorical(logprobs, axis=-1, key=rng.next_key())
        return Proposal(tokens.astype(mx.int32), logprobs)

    def _select(
        self, hidden: mx.array, logits: mx.array, anchor: int, anchor_position: int, params: SamplingParams,
        rng: TokenRng,
    ) -> Proposal:
        """DFlash 2: the selector's walk over each slot's top-K candidates (dflash2.md §2.2), on the device.

        hidden (k, H) and logits (k, V) of the kept slots: the walk is causal, so slots past `keep` never
        change the kept ones. Greedy: argmax chain. Position-keyed sampling: each slot draws from
        q_t = softmax(S/T) with the target's own Gumbel noise of that position at the candidates, a
        deterministic proposal verified by equality, as DFlash 1's. Otherwise a draw from q_t with the
        request's key, and the realized q_t rows (scattered onto the vocabulary, -inf elsewhere) go to
        rejection sampling, which keeps the target's distribution for any q (spec §3).
        """
        selector = self.draft.candidate_selector
        rows, width = logits.shape
        codebook_rows = selector.successor_codebook.shape[0]
        if logits.shape[-1] > codebook_rows:  # a target head padded past vocab_size: no codebook rows there
            logits = logits[:, :codebook_rows]
        ids, scores = selector.lattice(hidden, logits, anchor)  # (k, K), (k, K, K)
        if params.is_greedy:
            picked, _ = walk_lattice(scores)
            return Proposal(mx.take_along_axis(ids, picked[:, None], axis=-1)[:, 0], None)
        scaled = scores / params.temperature
        if rng.by_position:
            noise = rng.gumbel(anchor_position + 1, rows, width)  # the verify's rows, at the candidates
            picked, _ = walk_lattice(scaled, mx.take_along_axis(noise, ids, axis=-1))
            return Proposal(mx.take_along_axis(ids, picked[:, None], axis=-1)[:, 0], None)
        gumbel = mx.random.gumbel(shape=ids.shape, key=rng.next_key())  # argmax(s/T + G): a draw from q_t
        picked, previous = walk_lattice(scaled, gumbel)
        tokens = mx.take_along_axis(ids, picked[:, None], axis=-1)[:, 0]
        realized = scaled[mx.arange(rows), previous]  # (k, K): the row of the predecessor actually chosen
        logq = realized - mx.logsumexp(realized, axis=-1, keepdims=True)
        dense = mx.put_along_axis(mx.full((rows, logits.shape[-1]), -mx.inf), ids, logq, axis=-1)
        if dense.shape[-1] < width:  # as wide as the target's logits again
            dense = mx.concatenate([dense, mx.full((rows, width - dense.shape[-1]), -mx.inf)], axis=-1)
        return Proposal(tokens, dense)

    def propose_candidates(
        self, new_tokens: list[int], taps: mx.array | None, num_tokens: int, params: SamplingParams, rng: TokenRng,
        k: int,
    ) -> tuple[mx.array, mx.array]:
        """Each block position's k best tokens and their log-probs, lazily, for a tree (engine/decode/tree.py).

        Greedy requests with a proposal head rank its vocabulary only, normalized over it: on the CPU the
        head over 15 rows, the log-normalizer and the top-k cost a third of the whole vocabulary's. A token
        outside it is never in a tree; the target's verification keeps the output unchanged."""
        hidden, anchor_position = self._forward(new_tokens, taps, num_tokens)
        return self.candidates(hidden[0, 1:], params, rng, anchor_position, k)  # row 0 is the anchor

    def candidates(self, hidden: mx.array, params: SamplingParams, rng: TokenRng, anchor_position: int, k: int
                   ) -> tuple[mx.array, mx.array]:
        """The draft's (L, H) block rows after the anchor -> each row's k best tokens and log-probs, lazily
        (also what bench/tree_replay.py ranks teacher-forced blocks with)."""
        if params.is_greedy and self.proposal_head is not None:
            logits = self.draft.logits(hidden, self.proposal_head.product)  # (L, K)
            ids, logprobs = top_candidates(rank_scores(logits, params), k)
            return self.proposal_head.ids[ids], logprobs
        logits = self.draft.logits(hidden, self.target.lm_head)  # (L, V)
        noise = None if params.is_greedy or not rng.by_position else rng.gumbel(anchor_position + 1, *logits.shape)
        return top_candidates(rank_scores(logits, params, noise), k)

    def propose_rows(
        self, new_tokens: list[int], taps: mx.array | None, num_tokens: int, params: SamplingParams, rng: TokenRng,
        keep: int,
    ) -> mx.array:
        """As propose, but the (keep, V) scores whose row argmax is each proposal (rank_scores), lazily."""
        hidden, anchor_position = self._forward(new_tokens, taps, num_tokens)
        logits = self.draft.logits(hidden[0, 1 : keep + 1], self.target.lm_head)  # (keep, V)
        noise = None if params.is_greedy or not rng.by_position else rng.gumbel(anchor_position + 1, *logits.shape)
        return rank_scores(logits, params, noise)

    def _forward(self, new_tokens: list[int], taps: mx.array | None, num_tokens: int) -> tuple[mx.array, int]:
        """The draft over [pending, MASK x num_tokens] after ingesting the new context: (1, k+1, H), anchor position."""
        assert self._cache is not None, "begin() first"
        if taps is not None:
            self._unseen.append(taps)
        unseen = self._unseen[0] if len(self._unseen) == 1 else mx.concatenate(self._unseen, axis=1)
        self._unseen = []
        context = self.draft.project_context(unseen)  # (1, n, H)
        anchor_position = self._cache[0].offset + context.shape[1]
        noise = self._noise(new_tokens[-1], num_tokens)  # (1, k+1, H)
        # one block: DFlash 2's conv runs over its k+1 rows, the anchor's included
        return self.draft(noise, context, cache=self._cache, q_offset=anchor_position), anchor_position

    def _noise(self, anchor: int, num_tokens: int) -> mx.array:
        """The noise embedding of [anchor, MASK x num_tokens]; the MASK rows are looked up once.

        A row's embedding does not depend on the others, so this equals embedding the block whole. On the
        H200 the 16-row lookup in the 4-bit embedding took ~0.3 ms of device time a cycle."""
        if self._mask_rows is None or self._mask_rows.shape[1] < num_tokens:
            ids = mx.full((1, max(num_tokens, self.draft.config.block_size)), self.draft.config.mask_token_id, dtype=mx.int32)
            self._mask_rows = self.draft.noise_embedding(ids, self.target.embed)
            mx.eval(self._mask_rows)
        first = self.draft.noise_embedding(mx.array([[anchor]], dtype=mx.int32), self.target.embed)  # (1, 1, H)
        return mx.concatenate([first, self._mask_rows[:, :num_tokens]], axis=1)

    def end(self) -> None:
        self._cache, self._unseen = None, []

    def kept_row_seconds(self, max_rows: int) -> float:
        """What each verified proposal adds to a draft forward: its LM-head row and argmax.

        Timed once on zeros (the cost does not depend on the values), as the target's cost curve is.
        """
        if max_rows < 2:
            return 0.0
        hidden = mx.zeros((max_rows, self.draft.config.hidden_size), dtype=self.draft.norm.weight.dtype)

        def lm_head_rows(rows: int) -> None:
            if self.proposal_head is not None:  # what greedy requests pay; sampled ones pay the full head
                mx.eval(self.proposal_head(hidden[:rows]))
            else:
                mx.eval(mx.argmax(self.draft.logits(hidden[:rows], self.target.lm_head), axis=-1))

        curve = CostCurve.measure(lm_head_rows, max_rows)
        return max(curve(max_rows) - curve(1), 0.0) / (max_rows - 1)


class NgramDrafter:
    """Prompt lookup: continue the latest earlier occurrence of the sequence's last n tokens."""

    name = "ngram"
    needs_taps = False

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.sizes = range(max_ngram, min_ngram - 1, -1)  # longest match first
        self._history: list[int] = []
        self._index: dict[int, dict[tuple[int, ...], int]] = {}

    def begin(self, prompt_ids: list[int], prompt_taps: mx.array | None) -> None:
        self._history = []
        self._index = {n: {} for n in self.sizes}
        self._extend(prompt_ids)

    def _extend(self, tokens: list[int]) -> None:
        # an n-gram is indexed once the token after it is known: the index maps it to that position
        history = self._history
        for token in tokens:
            end = len(history)
            for n in self.sizes:
                if end >= n:
                    self._index[n][tuple(history[end - n : end])] = end
            history.append(token)

    def propose(
        self,
        new_tokens: list[int],
        taps: mx.array | None,
        num_tokens: int,
        params: SamplingParams,
        rng: TokenRng,
        *,
        keep: int | None = None,
    ) -> Proposal:
        self._extend(new_tokens)
        history = self._history
        for n in self.sizes:
            start = self._index[n].get(tuple(history[-n:]))
            if start is not None:
                # copy with overlap (as LZ77): a match near the end continues the period
                tokens = history[start : start + num_tokens]
                while len(tokens) < num_tokens:
                    tokens.append(tokens[len(tokens) - (len(history) - start)])
                return _deterministic(tokens)
        return _deterministic([])

    def end(self) -> None:
        self._history, self._index = [], {}


class OracleDrafter:
    """For tests and benchmarks: proposes a known continuation (e.g. the target's greedy output).

    `wrong_at[c % len(wrong_at)]` is the draft index corrupted in cycle c (None: none), so
    partial acceptance and rollback happen at chosen block positions, deterministically.
    For trees, `ranks[c % len(ranks)][i]` is the rank of the true token at block position i in cycle c
    (missing: 0; a wrong_at position: 1): its scores put (t+1, ..., t+r) mod V first, then t, then one
    more decoy, so a tree reaches the continuation through a non-top-1 branch where a chain proposes t+1.
    """

    name = "oracle"
    needs_taps = False

    def __init__(
        self, continuation: Sequence[int], *, vocab_size: int, wrong_at: Sequence[int | None] = (None,),
        ranks: Sequence[Sequence[int]] = ((),),
    ) -> None:
        if not wrong_at or not ranks:
            raise ValueError("wrong_at and ranks need at least one entry (None / (): propose the continuation as is)")
        self.continuation = list(continuation)
        self.vocab_size = vocab_size
        self.wrong_at = tuple(wrong_at)
        self.ranks = tuple(tuple(r) for r in ranks)
        self._num_output = 0
        self._cycle = 0

    def begin(self, prompt_ids: list[int], prompt_taps: mx.array | None) -> None:
        self._num_output, self._cycle = 0, 0

    def _next(self, new_tokens: list[int], num_tokens: int) -> tuple[list[int], list[int]]:
        """The true continuation for this cycle and the rank of each of its tokens."""
        self._num_output += len(new_tokens)
        tokens = self.continuation[self._num_output : self._num_output + num_tokens]
        ranks = list(self.ranks[self._cycle % len(self.ranks)][: len(tokens)])
        ranks += [0] * (len(tokens) - len(ranks))
        wrong = self.wrong_at[self._cycle % len(self.wrong_at)]
        self._cycle += 1
        if wrong is not None and wrong < len(tokens):
            ranks[wrong] = max(ranks[wrong], 1)
        return tokens, ranks

    def propose(
        self,
        new_tokens: list[int],
        taps: mx.array | None,
        num_tokens: int,
        params: SamplingParams,
        rng: TokenRng,
        *,
        keep: int | None = None,
    ) -> Proposal:
        tokens, ranks = self._next(new_tokens, num_tokens)
        return _deterministic([t if r == 0 else (t + 1) % self.vocab_size for t, r in zip(tokens, ranks)])

    def propose_candidates(
        self, new_tokens: list[int], taps: mx.array | None, num_tokens: int, params: SamplingParams, rng: TokenRng,
        k: int,
    ) -> tuple[mx.array, mx.array]:
        tokens, ranks = self._next(new_tokens, num_tokens)
        logits = [[0.0] * self.vocab_size for _ in range(num_tokens)]  # past the continuation: uniform
        for row, (t, r) in zip(logits, zip(tokens, ranks)):
            row[:] = [-10.0] * self.vocab_size
            for i in range(r + 2):  # r decoys, the true token, one decoy after it: 2/3 of the mass on rank 0
                row[t if i == r else (t + 1 + min(i, r)) % self.vocab_size] = -0.7 * i
        x = mx.array(logits)
        return top_candidates(x - mx.logsumexp(x, axis=-1, keepdims=True), k)

    def end(self) -> None:
        pass
