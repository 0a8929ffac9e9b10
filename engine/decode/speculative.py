"""The speculative cycle (spec §2.1): draft → one verify forward → accept → commit and trim.

One host sync per cycle. After it, the next cycle (draft, verify, acceptance) is built from
lazy results and launched with `mx.async_eval` before the current DecodeStep is yielded, so
the caller's detokenizing and stop checks overlap with device work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import mlx.core as mx

from engine.decode.decoder import DecodeStep
from engine.decode.drafters import Drafter
from engine.decode.prefill import prefill
from engine.decode.sampling import (
    SamplingParams,
    TokenLogprob,
    TokenRng,
    choice_scores,
    fallback_scores,
    filter_logprobs,
    sample,
    to_token_logprobs,
    token_logprobs,
)
from engine.decode.tree import (
    DraftTree,
    accept_tree,
    build_tree,
    device_tree,
    lattice_size,
    tree_builder,
    verify_rows,
)
from engine.decode.verify_width import (
    TREE_BUDGETS,
    CostCurve,
    Plan,
    TreeOutcome,
    VerifyWidth,
)
from engine.model.target import Target

if TYPE_CHECKING:
    from engine.decode.prefix_cache import PrefixLease
    from engine.grammar.constraint import Constraint, State

log = logging.getLogger("dflash.model")

PREFILL_CHUNK = 512
DRAFT_CANDIDATES = 8  # a draft row whose top token the grammar refuses proposes its best allowed one among these
TIMING_MODES = (None, "overlap", "split")
WARM_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)  # ids every vocabulary has: warm-ups and rehearsals decode from it


def accept_draft(
    draft_tokens: mx.array,
    target_logits: mx.array,
    draft_logprobs: mx.array | None,
    params: SamplingParams,
    key: mx.array | None = None,
    noise: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Decide, lazily, how much of a draft block to keep (the one acceptance function).

    draft_tokens: (..., k). target_logits: (..., k+1, V); row i scores the token after draft i
    (row 0 follows the anchor). Returns (num_accepted a (...), next_token (...)): the committed
    tokens are draft_tokens[..., :a] then next_token (the correction at the first rejection, or the bonus).

    Greedy params: the target's token is its argmax. Position-keyed sampling (`noise`, (..., k+1, V)
    Gumbel noise of the rows' sequence positions): the target's token is argmax(log q + noise), an exact
    sample of q that does not depend on the draft. Either way a draft is kept while it equals the
    target's token, and the target's token at the first mismatch is the correction.
    Otherwise rejection sampling with `key` (names follow gpt-fast: p = draft probabilities,
    q = target probabilities; spec §2.1 names them the other way round); draft_logprobs: (..., k, V),
    what each draft was sampled from, or None for a deterministic proposal (p one-hot). Both p and q
    go through `filter_logprobs`, so sampling stays exact for the truncated target distribution.
    """
    k = draft_tokens.shape[-1]
    if params.is_greedy or noise is not None:
        scores = target_logits if params.is_greedy else filter_logprobs(target_logits, params) + noise
        target_tokens = mx.argmax(scores, axis=-1).astype(mx.int32)  # (..., k+1)
        matches = (draft_tokens == target_tokens[..., :k]).astype(mx.int32)
        num_accepted = mx.cumprod(matches, axis=-1).sum(axis=-1)
        return num_accepted, mx.take_along_axis(target_tokens, num_accepted[..., None], axis=-1)[..., 0]
    assert key is not None, "rejection sampling needs a random key"
    q = mx.exp(filter_logprobs(target_logits, params))  # (..., k+1, V)
    if draft_logprobs is None:
        p = (draft_tokens[..., None] == mx.arange(q.shape[-1])).astype(mx.float32)  # (..., k, V)
    else:
        p = mx.exp(draft_logprobs.astype(mx.float32))
    p_draft = mx.take_along_axis(p, draft_tokens[..., None], axis=-1)[..., 0]  # (..., k)
    q_draft = mx.take_along_axis(q[..., :k, :], draft_tokens[..., None], axis=-1)[..., 0]
    accept_key, resample_key = mx.random.split(key)
    # q: target prob, p: draft prob
    # q >= p: always accept draft token
    # q < p: q/p prob to accept draft token
    accepted = mx.random.uniform(shape=p_draft.shape, key=accept_key) * p_draft < q_draft
    num_accepted = mx.cumprod(accepted.astype(mx.int32), axis=-1).sum(axis=-1)
    # at the first rejection sample norm(max(q - p, 0)); row k has no draft (p = 0): the bonus
    p = mx.concatenate([p, mx.zeros((*p.shape[:-2], 1, p.shape[-1]))], axis=-2)  # (..., k+1, V)
    row = num_accepted[..., None, None]
    q_row = mx.take_along_axis(q, row, axis=-2)[..., 0, :]  # (..., V)
    residual = mx.maximum(q_row - mx.take_along_axis(p, row, axis=-2)[..., 0, :], 0.0)
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, q_row)  # p == q
    next_token = mx.random.categorical(mx.log(residual), axis=-1, key=resample_key)
    return num_accepted, next_token.astype(mx.int32)


class CycleTiming(NamedTuple):
    """Per-cycle wall-clock split. On MLX's CPU backend `async_eval` throttles the caller until
    only the graph's tail is in flight, so most device time lands in launch_s, not wait_s."""

    draft_s: float  # build + run the draft ("split" mode only, else 0)
    verify_s: float  # build + run verify and acceptance ("split" mode only, else 0)
    launch_s: float  # bookkeeping after the previous sync, then building and launching this cycle
    host_s: float  # after the launch: the caller's work between the yield and the next resume
    wait_s: float  # blocked in the cycle's one sync
    cycle_s: float  # previous sync's return to this one's: the whole cycle


@dataclass
class SpecStats:
    cycles: int = 0
    syncs: int = 0  # host syncs inside the cycle loop (one per cycle unless timing="split")
    chained: int = 0  # width-0 cycles launched before the previous cycle's sync (see _chain)
    drafted: int = 0
    accepted: int = 0
    accept_counts: list[int] = field(default_factory=list)  # histogram of a, as gpt-fast
    widths: list[int] = field(default_factory=list)  # verify width chosen per cycle (probes included)
    budgets: list[int] = field(default_factory=list)  # tree nodes verified per cycle (0: a chain)
    branched: int = 0  # tree cycles whose accepted path left the draft's top-1 chain
    timings: list[CycleTiming] = field(default_factory=list)

    @property
    def acceptance_length(self) -> float:
        """τ = mean tokens committed per cycle, bonus included: (A + S) / S."""
        return (self.accepted + self.cycles) / max(self.cycles, 1)

    def record(self, drafted: int, accepted: int) -> None:
        self.cycles += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accept_counts.extend([0] * (accepted + 1 - len(self.accept_counts)))
        self.accept_counts[accepted] += 1


class _TreePart(NamedTuple):
    """What a tree cycle adds to _Cycle: the tree (built on the host) and where its rows start."""

    start: int  # target cache rows before the verify: the tree's rows follow
    tree: DraftTree
    path: mx.array  # (L+1,) int32: verify rows of the accepted path, root first (lazy)


class _Constrained(NamedTuple):
    """What a constrained cycle adds to _Cycle: the drafts the grammar allowed, the matcher state before each
    (states[i]: after the anchor and drafts[:i]), and the verify rows' scores, lazily."""

    drafts: list[int]
    states: list[State]
    scores: mx.array  # (k+1, V): argmax of row i is the target's unconstrained token after drafts[:i]
    logits: mx.array  # (k+1, V) raw target logits (logprobs, and the fallback scores)
    position: int  # sequence position of the token row 0 chooses
    cut: bool  # the draft block was cut at a draft the grammar refuses


class _Cycle(NamedTuple):
    """A launched cycle: everything lazy except the block size, already in the target cache."""

    block: int  # rows verified = drafted + 1 (a tree: its nodes + 1)
    width: int  # the width chosen for this cycle (the drafter may have proposed fewer)
    num_accepted: mx.array  # () int32
    tokens: mx.array  # (block,) int32: tokens[:a] are the accepted drafts, tokens[a] the next token
    taps: mx.array | None  # (1, block, T*H)
    logprobs: tuple[mx.array, mx.array, mx.array] | None
    draft_s: float
    verify_s: float
    launched_at: float  # perf_counter() when the launch returned (timing only)
    chained: bool = False  # launched by _chain, before the previous cycle's sync
    drafted: bool = False  # the draft ran (a confident width may still verify none of its proposals)
    tree: _TreePart | None = None  # a tree cycle (engine/decode/tree.py); None: a chain
    constrained: _Constrained | None = None  # a cycle under a grammar (structured outputs)


class SpeculativeDecoder:
    """Decoder protocol over a Target and a Drafter; batch 1, one sequence at a time."""

    def __init__(
        self,
        target: Target,
        drafter: Drafter,
        *,
        block_size: int,
        prefill_chunk: int = PREFILL_CHUNK,
        timing: str | None = None,
        adaptive: bool = True,
        width: int | None = None,
        cost_curve: CostCurve | None = None,
        learn_overheads: bool = True,
        chain_plain_steps: bool | None = None,
        tree_budget: int | str = 0,
        tree_spine: bool = False,
        confident_widths: bool | None = None,
    ) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (the anchor plus at least one draft), got {block_size}")
        if timing not in TIMING_MODES:
            raise ValueError(f"timing must be one of {TIMING_MODES}, got {timing!r}")
        self.target = target
        self.drafter = drafter
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.timing = timing
        self.adaptive = adaptive
        # without adaptation: drafts verified each cycle (the draft still runs its whole block); None: all
        if width is not None and (adaptive or width < 1):
            raise ValueError(f"a fixed width needs adaptive=False and at least 1 draft, got {width}")
        self.fixed_width = block_size - 1 if width is None else min(width, block_size - 1)
        self.cost_curve = cost_curve  # target seconds by rows; measured once, on first use
        self.draft_row_s: float | None = None  # what each verified draft row adds to a draft; measured with it
        self.curve_from_cache = False  # cost_curve was read from the cost cache: checked before it is used
        self.plain_step_s: float | None = None  # a chained plain step's seconds; measured with the curve
        self.learn_overheads = learn_overheads  # draft/host seconds from live cycle times
        # width-0 cycles queue the next one before their sync, as plain decoding does (hybrid targets
        # roll back by replaying the last verify only, so they keep one cycle in flight). On the CPU
        # too: 128 greedy tokens of width-0 cycles ran at 24.5 tok/s unchained, 25.7 chained, plain 25.9.
        if chain_plain_steps is None:
            chain_plain_steps = True
        self.chain_plain_steps = chain_plain_steps and not target.has_recurrent_layers
        self.name = f"speculative-{drafter.name}"
        self.tree_budgets, self.tree_status = self._tree_setup(tree_budget, adaptive)
        self.tree_spine = tree_spine  # trees put the top-1 chain first (tree.build_tree)
        # greedy chains verify as far as the draft is sure of its proposals (VerifyWidth.confident_width), where
        # the drafter says how sure: a host read between draft and verify, free on the CPU backend, whose
        # async_eval has run the draft by then (default: on the CPU only)
        self.confident_widths = (mx.default_device() == mx.cpu) if confident_widths is None else confident_widths
        self._drafter_confident = True  # False once the drafter proposed without a confidence
        self.stats = SpecStats()
        self._sync_end = 0.0  # perf_counter() at the last sync's return
        self._drafted_last = False  # the last finished cycle verified drafts (its draft had no held context)
        self._width: VerifyWidth | None = None
        self._held: tuple[list[int], list[mx.array]] = ([], [])  # drafter input of width-0 cycles

    @property
    def verify_width(self) -> VerifyWidth | None:
        """The adaptive width controller, made on the first request and kept across requests."""
        return self._width

    def forget_acceptance(self) -> None:
        """Start the width controller afresh at the next request; the measured cost curve is kept."""
        self._width = None

    def _tree_setup(self, tree_budget: int | str, adaptive: bool) -> tuple[tuple[int, ...], str]:
        """The budgets trees may take (none: chains only) and what /health says about it."""
        if tree_budget in (0, "0"):
            return (), "off"
        if tree_budget == "auto":
            if not adaptive:
                raise ValueError("tree_budget 'auto' is chosen by the adaptive width; pass a number without it")
            budgets = TREE_BUDGETS
        elif isinstance(tree_budget, int) and tree_budget > 0:
            budgets = (tree_budget,)
        else:
            raise ValueError(f"tree_budget must be a positive number of nodes, 'auto' or 0, got {tree_budget!r}")
        reason = self.target.tree_support() or getattr(self.drafter, "no_trees", None)
        if reason is None and not hasattr(self.drafter, "propose_candidates"):
            reason = f"the {self.drafter.name} drafter proposes one continuation: chains only"
        if reason is not None:
            return (), f"off ({reason})"
        self.target.enable_trees()
        built = "" if tree_builder() is None else ", built on the device"  # compiled and checked now, not in a request
        return budgets, ("auto" if tree_budget == "auto" else f"{budgets[0]} nodes") + built

    @property
    def max_budget(self) -> int:
        return max(self.tree_budgets, default=0)

    def supports(self, params: SamplingParams) -> str | None:
        if params.has_processors:
            return (
                "speculative decoding cannot apply penalties or logit_bias to a draft block "
                "(they depend on tokens not yet accepted); using plain decoding"
            )
        return None

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        rng: TokenRng,
        prefix: PrefixLease | None = None,
        constraint: Constraint | None = None,
    ) -> Generator[DecodeStep, None, None]:
        if reason := self.supports(params):
            raise ValueError(reason)
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; speculative decoding needs at least one prompt token")
        if max_tokens <= 0:
            return
        if constraint is not None:
            yield from self._generate_constrained(prompt_ids, params, max_tokens, rng, prefix, constraint)
            return
        self.stats = SpecStats()
        cache = self.target.make_cache()
        launched: list[_Cycle] = []  # in flight, oldest first; two only while width-0 cycles chain
        prefilled = False
        try:
            first, first_logprobs, prompt_taps, _ = yield from self._prefill(prompt_ids, cache, params, rng, prefix)
            prefilled = True
            self._begin(prompt_ids, prompt_taps, first, cache, prefix)
            num_committed = len(prompt_ids)  # rows in the target cache
            num_emitted = 1
            # the first token goes out before the first cycle is built: on the CPU backend async_eval
            # runs most of a launched graph before returning, which would add a cycle to the TTFT
            yield DecodeStep([first], first_logprobs)
            if max_tokens > 1:
                launched.append(self._launch([first], None, max_tokens - 1, cache, params, rng))
            while launched:
                cycle = launched.pop(0)
                if not launched:
                    self._chain(cycle, launched, max_tokens - num_emitted - 1, cache, params, rng)
                accepted, tokens, logprobs, path = self._finish(cycle, cache, chained_next=bool(launched))
                num_committed += accepted + 1  # the anchor and the accepted drafts (a tree: its path)
                in_flight = sum(c.block for c in launched)
                assert self.target.cache_length(cache) == num_committed + in_flight, (
                    f"target cache holds {self.target.cache_length(cache)} rows, {num_committed} committed "
                    f"and {in_flight} in flight"
                )
                new_taps = None if cycle.taps is None else _rows(cycle.taps, path)
                if prefix is not None:
                    prefix.record(tokens, new_taps)
                tokens = tokens[: max_tokens - num_emitted]  # the block was sized to reach max_tokens
                num_emitted += len(tokens)
                if num_emitted < max_tokens and not launched:
                    launched.append(self._launch(tokens, new_taps, max_tokens - num_emitted, cache, params, rng))
                shown = min(accepted, len(tokens))
                yield DecodeStep(
                    tokens,
                    None if logprobs is None else logprobs[: len(tokens)],
                    drafted=cycle.block - 1,
                    accepted=shown,
                    accepted_positions=tuple(range(shown)),
                )
        finally:
            for pending in launched:  # closed early: drop the verify rows nobody will accept
                self.target.trim(cache, pending.block)
            self.drafter.end()
            self._held = ([], [])
            if prefix is not None and prefilled:
                prefix.offer(cache, self.target.cache_length(cache))

    def _begin(self, prompt_ids: list[int], prompt_taps: mx.array | None, first: int, cache: list[Any],
               prefix: PrefixLease | None) -> None:
        """After the prefill: the drafter, the prefix record and the width controller start the request."""
        self.drafter.begin(prompt_ids, prompt_taps)
        if prefix is not None:
            prefix.record([first], prompt_taps)
        if self.adaptive and self._width is None:
            # one controller for the decoder's life: what it learned about the drafter and the
            # costs carries over, so a useless drafter stays cheap from a request's first cycle
            self._width = self._make_width(cache, prompt_ids[-1])
        elif self._width is not None:
            self._width.new_request()
        self._held = ([], [])
        self._drafted_last = False
        self._sync_end = time.perf_counter()

    # --- constrained decoding (structured outputs) ------------------------------------------
    def _generate_constrained(
        self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, rng: TokenRng,
        prefix: PrefixLease | None, constraint: Constraint,
    ) -> Generator[DecodeStep, None, None]:
        """Speculative decoding under a grammar, lossless for the constrained target.

        Per cycle: the drafts are checked against the matcher and the block is cut at the first one the
        grammar does not allow (one extra host sync, before the verify forward: no verify rows are spent on
        drafts that cannot be kept); the target verifies [anchor, allowed drafts]; at the sync, the host
        walks the rows: row i's token is the constrained choice in the state after drafts[:i]
        (Constraint.choose: the unconstrained argmax when allowed), a draft is kept while it equals it, and
        the choice at the first mismatch (or after the last draft) is committed with them. So the output is
        exactly the constrained plain decoder's, token for token, for greedy and for seeded sampling. The
        matcher state after the cycle is the kept state snapshot advanced by that one token, the same value
        as replaying the committed tokens from the start. Trees and chained width-0 cycles are off here (a
        chained cycle would start from a token the host has not checked yet). Ends after EOS.
        """
        self.stats = SpecStats()
        cache = self.target.make_cache()
        cycle: _Cycle | None = None
        prefilled = False
        try:
            first, first_logprobs, prompt_taps, state = yield from self._prefill(
                prompt_ids, cache, params, rng, prefix, constraint)
            prefilled = True
            self._begin(prompt_ids, prompt_taps, first, cache, prefix)
            num_committed = len(prompt_ids)  # rows in the target cache
            num_emitted = 1
            constraint.state = state
            yield DecodeStep([first], first_logprobs)
            if constraint.finished(state) or max_tokens == 1:
                return
            cycle = self._launch_constrained([first], None, max_tokens - 1, cache, params, rng, constraint, state)
            while cycle is not None:
                finished, cycle = cycle, None
                accepted, tokens, logprobs, state = self._finish_constrained(finished, cache, params, rng, constraint)
                num_committed += accepted + 1
                assert self.target.cache_length(cache) == num_committed, (
                    f"target cache holds {self.target.cache_length(cache)} rows, {num_committed} committed")
                new_taps = None if finished.taps is None else finished.taps[:, : accepted + 1]
                if prefix is not None:
                    prefix.record(tokens, new_taps)
                if len(tokens) > max_tokens - num_emitted:  # the block was sized to reach max_tokens: past it, cut
                    tokens = tokens[: max_tokens - num_emitted]
                    state = finished.constrained.states[len(tokens)]  # the snapshot after the kept drafts
                num_emitted += len(tokens)
                constraint.state = state
                done = constraint.finished(state)
                if num_emitted < max_tokens and not done:  # launched before the yield (sync elision)
                    cycle = self._launch_constrained(tokens, new_taps, max_tokens - num_emitted, cache, params, rng,
                                                     constraint, state)
                shown = min(accepted, len(tokens))
                yield DecodeStep(tokens, None if logprobs is None else logprobs[: len(tokens)],
                                 drafted=finished.block - 1, accepted=shown, accepted_positions=tuple(range(shown)))
        finally:
            if cycle is not None:  # closed early: drop the verify rows nobody will accept
                self.target.trim(cache, cycle.block)
            self.drafter.end()
            self._held = ([], [])
            if prefix is not None and prefilled:
                prefix.offer(cache, self.target.cache_length(cache))

    def _launch_constrained(
        self, new_tokens: list[int], new_taps: mx.array | None, remaining: int, cache: list[Any],
        params: SamplingParams, rng: TokenRng, constraint: Constraint, state: State,
    ) -> _Cycle:
        """Draft, cut the block at the first draft the grammar refuses, launch the verify (a chain)."""
        block = min(self.block_size, remaining + 1)
        width = min(self.fixed_width if self._width is None else self._width.choose(), block - 1)
        clock = time.perf_counter()
        position = self.target.cache_length(cache) + 1  # of the token verify row 0 chooses
        if width and getattr(self.drafter, "maskable", False):  # the draft's rows, masked by the grammar too
            tokens_in, taps_in = self._with_held(new_tokens, new_taps)
            rows = self.drafter.propose_rows(tokens_in, taps_in, block - 1, params, rng, width)  # (width, V)
            best = mx.argmax(rows, axis=-1)
            self.stats.syncs += 1
            k = min(DRAFT_CANDIDATES, rows.shape[-1])

            def candidates(i: int) -> tuple[list[int], list[float]]:  # one row's top k (a sync): rare
                ids = mx.argpartition(-rows[i], kth=k - 1)[:k]
                return ids.tolist(), rows[i][ids].tolist()

            num_proposed = width
            kept, states = constraint.mask_drafts(state, best.tolist(), candidates)  # the draft check's sync
        else:
            drafts, _, _ = self._draft(new_tokens, new_taps, block - 1, width, params, rng)
            proposed = drafts.tolist() if drafts.size else []  # the draft check's host sync
            self.stats.syncs += bool(proposed)
            states = constraint.check_drafts(state, proposed)
            kept = proposed[: len(states) - 1]
            num_proposed = len(proposed)
        draft_s = time.perf_counter() - clock if self.timing == "split" else 0.0
        clock = time.perf_counter()
        verify_ids = mx.array([new_tokens[-1], *kept], dtype=mx.int32)
        logits, taps = self.target(verify_ids[None], cache, taps=self.drafter.needs_taps)
        logits = logits[0]  # (k+1, V)
        scores = choice_scores(logits, params, rng, position)
        top = mx.argmax(scores, axis=-1).astype(mx.int32)  # (k+1,) the unconstrained choices
        mx.async_eval(top, *([] if taps is None else [taps]))
        verify_s = self._split_sync([top, taps], clock)
        launched_at = time.perf_counter() if self.timing else 0.0
        part = _Constrained(kept, states, scores, logits, position, len(kept) < num_proposed)
        return _Cycle(len(kept) + 1, width, mx.array(0), top, taps, None, draft_s, verify_s, launched_at,
                      constrained=part)

    def _finish_constrained(
        self, cycle: _Cycle, cache: list[Any], params: SamplingParams, rng: TokenRng, constraint: Constraint,
    ) -> tuple[int, list[int], list[TokenLogprob] | None, State]:
        """The cycle's sync and the host's acceptance walk; the target cache is trimmed even if it raises."""
        part = cycle.constrained
        assert part is not None
        rejected = cycle.block  # on failure roll the whole block back
        try:
            clock = time.perf_counter()
            self._sync(cycle.tokens, cycle.taps)
            now = time.perf_counter()
            top = cycle.tokens.tolist()
            drafts, states = part.drafts, part.states
            accepted = 0
            tokens: list[int] | None = None
            while True:
                i = accepted
                if constraint.finished(states[i]):  # an accepted EOS ends the reply: nothing after it
                    tokens, state = drafts[:accepted], states[i]
                    break
                if i < len(drafts) and top[i] == drafts[i]:  # an allowed draft that is the argmax: the choice
                    accepted += 1
                    continue
                fallback = None
                if not params.is_greedy:
                    fallback = lambda i=i: fallback_scores(part.logits[i : i + 1], params, rng, part.position + i)[0]
                choice, state = constraint.choose(states[i], top[i], part.scores[i], fallback)
                if i < len(drafts) and choice == drafts[i]:
                    accepted += 1
                    continue
                break
            if tokens is None:
                tokens = [*drafts[:accepted], choice]
            rejected = cycle.block - 1 - accepted
        finally:
            self.target.trim(cache, rejected)
        if self._width is not None:
            steady = cycle.block == 1 or self._drafted_last
            # a refused draft counts as verified and rejected: the controller learns where drafts stop being kept
            verified = cycle.block - 1 + (part.cut and accepted == cycle.block - 1)
            self._width.update(verified, accepted, (now - self._sync_end) if steady else None)
        if self.timing is not None:
            launch_s = cycle.launched_at - self._sync_end
            self.stats.timings.append(CycleTiming(cycle.draft_s, cycle.verify_s, launch_s, clock - cycle.launched_at,
                                                  now - clock, now - self._sync_end))
        self._drafted_last = cycle.block > 1
        self._sync_end = now
        self.stats.record(cycle.block - 1, accepted)
        self.stats.widths.append(cycle.width)
        self.stats.budgets.append(0)
        logprobs = None
        if params.logprobs:
            chosen = token_logprobs(part.logits[: len(tokens)], mx.array(tokens, dtype=mx.int32), params.top_logprobs)
            logprobs = self._to_list(tokens, chosen)
        return accepted, tokens, logprobs, state

    def _chain(
        self, cycle: _Cycle, launched: list[_Cycle], remaining: int, cache: list[Any], params: SamplingParams,
        rng: TokenRng,
    ) -> None:
        """Before `cycle`'s sync, launch the next cycle too if neither verifies drafts.

        A width-0 cycle commits exactly its one token, so the next one can start from that token
        still on the device, as plain decoding's next forward does: the device never waits for the
        host's bookkeeping and graph building between the two.
        """
        if not self.chain_plain_steps or self._width is None or self.timing == "split":
            return
        if cycle.block != 1 or remaining < 1 or self._width.peek_plan() != Plan(0):
            return
        width = self._width.plan().width  # 0, as peeked; the state moves as a normal launch moves it
        taps = None if cycle.taps is None else cycle.taps[:, :1]
        chained = self._launch([cycle.tokens[:1]], taps, remaining, cache, params, rng, width=width)
        launched.append(chained._replace(chained=True))
        self.stats.chained += 1

    def rehearse(self, prompt_ids: Sequence[int] = WARM_PROMPT) -> int:
        """Run each cycle shape a request can take once: every chain width and tree budget, greedy, seeded
        and unseeded sampling (with logprobs). On CUDA a shape's first cycle compiles kernels (NVRTC): on a
        fresh H100 a width-9 cycle took 5.4 s and a first 8-node tree 14.3 s inside a benchmark's request.
        Learns nothing and keeps the width controller as it was; returns the cycles run."""
        plans = [Plan(0), Plan(0), *(Plan(w) for w in range(1, self.block_size)),
                 *(Plan(self.block_size - 1, b) for b in self.tree_budgets)]
        script = _Script(self.block_size - 1, self.cost_curve or CostCurve((1.0,)), [])
        kept, self._width = self._width, script
        cycles = 0
        try:
            for params, rng in ((SamplingParams(temperature=0.0), TokenRng(0)),
                                (SamplingParams(temperature=0.8, top_p=0.95, seed=0, logprobs=True, top_logprobs=2),
                                 TokenRng(0)),
                                (SamplingParams(temperature=0.8), TokenRng(0, by_position=False))):
                script.plans = [*plans, Plan(0)]  # popped when the cycle before it is finished: then stop
                steps = self.generate(list(prompt_ids), params, self.block_size * (len(plans) + 2), rng)
                for _ in steps:
                    if not script.plans:
                        break
                steps.close()
                cycles += self.stats.cycles
        finally:
            self._width = kept
        return cycles

    def _make_width(self, cache: list[Any], token: int) -> VerifyWidth:
        def forward(rows: int) -> None:
            logits, taps = self.target(mx.full((1, rows), token, dtype=mx.int32), cache, taps=self.drafter.needs_taps)
            mx.eval(logits, taps)
            self.target.trim(cache, rows)

        rows = max(self.block_size, self.max_budget + 1)
        if self.curve_from_cache and self.cost_curve is not None and not self.cost_curve.agrees(forward, rows):
            log.info("the cached verify costs disagree with two forwards timed now: measuring them again")
            self.cost_curve = self.plain_step_s = None
        self.curve_from_cache = False
        if self.cost_curve is None or len(self.cost_curve.seconds) < rows:
            self.cost_curve = CostCurve.measure(forward, rows)
            # with the curve, under the same conditions (a curve given by the caller comes without one)
            if self.learn_overheads and self.chain_plain_steps:
                self.plain_step_s = self._chained_step_seconds(cache, token)
            if self.tree_budgets:
                self._warm_tree(cache, token)
        if self.draft_row_s is None:
            row_cost = getattr(self.drafter, "kept_row_seconds", None)
            self.draft_row_s = row_cost(self.block_size - 1) if row_cost is not None and self.learn_overheads else 0.0
        return VerifyWidth(self.block_size - 1, self.cost_curve, learn_overheads=self.learn_overheads,
                           draft_row_s=self.draft_row_s, plain_s=self.plain_step_s or 0.0,
                           tree_budgets=self.tree_budgets, chains=not self.tree_budgets or len(self.tree_budgets) > 1)

    def _warm_tree(self, cache: list[Any], token: int) -> None:
        """One tree verify at the largest budget before any cycle is timed: on CUDA the first one compiles and
        checks the attention kernel's tree variant (2.8 s on the H200), which the controller took for what
        every tree cycle costs."""
        depth, k = self.block_size - 1, min(self.max_budget, self.target.vocab_size)
        ids = [[(token + j) % self.target.vocab_size for j in range(k)] for _ in range(depth)]
        tree = build_tree(ids, [[-0.5 * j - 0.1 * d for j in range(k)] for d in range(depth)], self.max_budget)
        logits, taps = self._verify_tree(tree, token, self.target.cache_length(cache), depth, cache)
        mx.eval(logits, *([] if taps is None else [taps]))
        self.target.trim(cache, tree.budget + 1)

    def _chained_step_seconds(self, cache: list[Any], token: int, steps: int = 8) -> float:
        """A plain step's seconds when each is launched before the previous one's sync, as plain decoding
        and chained width-0 cycles run: on the H200 5.2 ms for the 135M model where a synced 1-row forward
        (the curve's first point) took 7-8. Priced at the latter until chained steps were seen, plain steps
        lost to drafting on chat prompts where they were faster (bench/width_replay.py with the H200's
        costs: worst prompt 0.939 -> 0.953 of its best fixed width or plain)."""
        def launch(ids: mx.array) -> mx.array:
            logits, taps = self.target(ids[None], cache, taps=self.drafter.needs_taps)
            nxt = mx.argmax(logits[0, -1:], axis=-1).astype(mx.int32)
            mx.async_eval(nxt, *([] if taps is None else [taps]))
            return nxt

        pending = launch(mx.array([token], dtype=mx.int32))
        start = 0.0
        for i in range(steps + 2):  # two to warm up, then `steps` timed sync to sync
            nxt = launch(pending)
            pending.item()
            if i == 1:
                start = time.perf_counter()
            pending = nxt
        seconds = (time.perf_counter() - start) / steps
        pending.item()
        self.target.trim(cache, steps + 3)
        return seconds

    def _prefill(
        self, prompt_ids: list[int], cache: list[Any], params: SamplingParams, rng: TokenRng,
        prefix: PrefixLease | None, constraint: Constraint | None = None,
    ) -> Generator[DecodeStep, None, tuple[int, list[TokenLogprob] | None, mx.array | None, State | None]]:
        """Restore the cached prefix, run the rest with taps; the last chunk's head runs on its last row
        (or, where the model's head cannot be split off, the last token goes alone).

        Yields an empty step after each chunk but the last, as plain decoding does, so a cancel is noticed.
        """
        needs_taps = self.drafter.needs_taps
        tap_layers = self.target.layer_ids if needs_taps else ()
        num_cached, cached_taps = (0, None) if prefix is None else prefix.restore(cache, tap_layers)
        ids = mx.array(prompt_ids, dtype=mx.int32)[None]  # (1, P)

        def forward(tokens: mx.array, last: bool) -> tuple[mx.array, mx.array | None]:
            return self.target(tokens, cache, taps=needs_taps, last=last)

        last, chunk_taps = yield from prefill(forward, ids, cache, num_cached, self.prefill_chunk,
                                              split=self.target.splits_head, lease=prefix)
        taps = ([] if cached_taps is None else [cached_taps]) + chunk_taps
        prompt_taps = mx.concatenate(taps, axis=1) if taps else None  # (1, P, T*H)
        state = None
        if constraint is not None:
            position = len(prompt_ids)
            scores = choice_scores(last, params, rng, position)
            top = mx.argmax(scores, axis=-1)
            mx.eval(top, prompt_taps)
            fallback = None if params.is_greedy else (lambda: fallback_scores(last, params, rng, position)[0])
            token, state = constraint.choose(constraint.state, int(top.item()), scores[0], fallback)
            first = mx.array([token], dtype=mx.int32)
        else:
            first = sample(last, params, rng, len(prompt_ids)).astype(mx.int32)  # (1,)
        logprobs = self._logprobs(last, first, params)
        mx.eval(first, logprobs)
        return int(first.item()), self._to_list([int(first.item())], logprobs), prompt_taps, state

    def _launch(
        self,
        new_tokens: list[int | mx.array],
        new_taps: mx.array | None,
        remaining: int,
        cache: list[Any],
        params: SamplingParams,
        rng: TokenRng,
        width: int | None = None,
    ) -> _Cycle:
        """Build and start one cycle; the block shrinks so it cannot overshoot max_tokens.

        `new_tokens` are ints, except a chained cycle's anchor: a (1,) array not yet synced.
        """
        block = min(self.block_size, remaining + 1)
        if width is None:
            plan = Plan(min(self.fixed_width, block - 1), self.max_budget) if self._width is None else self._width.plan()
            if plan.budget and block > 1:
                return self._launch_tree(new_tokens, new_taps, block, plan.budget, cache, params, rng)
            width = plan.width
        width = min(width, block - 1)
        clock = time.perf_counter()
        position = self.target.cache_length(cache) + 1  # of the token after the anchor: verify row 0 samples it
        # position-keyed sampling: made before the draft, which reads the same rows (TokenRng keeps them)
        noise = None if params.is_greedy or not rng.by_position else rng.gumbel(position, width + 1, self.target.vocab_size)
        drafting = width > 0
        confident = self.confident_widths and self._drafter_confident and params.is_greedy and self._width is not None
        drafts, draft_logprobs, width = self._draft(new_tokens, new_taps, block - 1, width, params, rng,
                                                    confident=confident)  # (k,)
        draft_s = self._split_sync(drafts, clock)
        clock = time.perf_counter()
        last = new_tokens[-1]
        anchor = last if isinstance(last, mx.array) else mx.array([last], dtype=mx.int32)  # (1,)
        verify_ids = mx.concatenate([anchor, drafts]) if drafts.size else anchor  # (k+1,)
        logits, taps = self.target(verify_ids[None], cache, taps=self.drafter.needs_taps)
        logits = logits[0]  # (k+1, V)
        if drafts.size:
            key = None if params.is_greedy or noise is not None else rng.next_key()
            rows_noise = None if noise is None else noise[: drafts.shape[0] + 1]  # a drafter may propose fewer
            num_accepted, next_token = accept_draft(drafts, logits, draft_logprobs, params, key, rows_noise)
            padded = mx.concatenate([drafts, next_token[None]])  # (k+1,)
            tokens = mx.where(mx.arange(padded.shape[0]) == num_accepted, next_token, padded)
        else:  # a plain step has nothing to accept: one sample, not the acceptance graph's dozen ops (GPU launches)
            num_accepted, tokens = mx.array(0, dtype=mx.int32), sample(logits, params, rng, position).astype(mx.int32)
        logprobs = self._logprobs(logits, tokens, params)
        pending = [num_accepted, tokens, *(logprobs or ()), *([] if taps is None else [taps])]
        mx.async_eval(*pending)
        verify_s = self._split_sync(pending, clock)
        launched_at = time.perf_counter() if self.timing else 0.0
        return _Cycle(tokens.shape[0], width, num_accepted, tokens, taps, logprobs, draft_s, verify_s, launched_at,
                      drafted=drafting)

    def _draft(
        self,
        new_tokens: list[int | mx.array],
        new_taps: mx.array | None,
        num_drafts: int,
        width: int,
        params: SamplingParams,
        rng: TokenRng,
        *,
        confident: bool = False,
    ) -> tuple[mx.array, mx.array | None, int]:
        """The drafter proposes its full block; the first `width` proposals are verified. Returns the drafts,
        their distributions and the width.

        Width 0 skips the drafter: its new tokens and taps are held for its next call. `confident`: a drafting
        cycle's width is then chosen from the draft's confidence in each proposal, where the drafter gives it.
        """
        if width == 0:
            held_tokens, held_taps = self._held
            held_tokens.extend(new_tokens)
            if new_taps is not None:
                held_taps.append(new_taps)
            # made here, not at import: a lazy module-level array belongs to the importing thread's stream
            return mx.zeros((0,), dtype=mx.int32), None, 0
        new_tokens, new_taps = self._with_held(new_tokens, new_taps)
        proposal = self.drafter.propose(new_tokens, new_taps, num_drafts, params, rng,
                                        keep=num_drafts if confident else width)
        if confident and proposal.confidence is not None:
            assert self._width is not None
            width = self._width.confident_width(proposal.confidence.tolist(), width)
            self.stats.syncs += 1
        elif confident:  # this drafter says nothing of its confidence: keep only `width` rows from now on
            self._drafter_confident = False
        drafts = proposal.tokens[:width]  # (k,)
        mx.async_eval(drafts)  # the device drafts while the verify graph is built
        logprobs = None if proposal.draft_logprobs is None else proposal.draft_logprobs[:width]
        return drafts, logprobs, width

    def _with_held(self, new_tokens: list[int | mx.array], new_taps: mx.array | None) -> tuple[list[int], mx.array | None]:
        """The drafter's input: what width-0 cycles held for it, then the new tokens and taps."""
        held_tokens, held_taps = self._held
        if held_tokens:
            if new_taps is not None:
                new_taps = mx.concatenate([*held_taps, new_taps], axis=1)  # (1, n, T*H)
            new_tokens = held_tokens + new_tokens
            self._held = ([], [])
        # a chained cycle's anchor was held as an array; it was synced with its cycle since
        return [t if isinstance(t, int) else int(t.item()) for t in new_tokens], new_taps

    def _launch_tree(
        self, new_tokens: list[int | mx.array], new_taps: mx.array | None, block: int, budget: int,
        cache: list[Any], params: SamplingParams, rng: TokenRng,
    ) -> _Cycle:
        """Build and start a tree cycle: the draft's scores reduced to each position's top K on the device,
        read by the host (the cycle's first sync), the tree popped on the host, then one verify forward of
        [anchor, nodes] under the ancestor mask and the walk, lazily (the cycle's own sync reads them)."""
        clock = time.perf_counter()
        depth = block - 1
        start = self.target.cache_length(cache)
        noise = None if params.is_greedy or not rng.by_position else rng.gumbel(start + 1, block, self.target.vocab_size)
        tokens_in, taps_in = self._with_held(new_tokens, new_taps)
        scored = max(budget, self.max_budget)  # the controller reads the score of every node it may verify
        ids, logprobs = self.drafter.propose_candidates(tokens_in, taps_in, depth, params, rng, scored)  # (L, K)
        kernel = tree_builder()
        if kernel is not None:  # built on the device: the verify launches without a sync (kernels/tree_build.cu)
            nodes = lattice_size(*ids.shape)
            tree = device_tree(kernel, ids, logprobs, min(budget, nodes), min(scored, nodes), self.tree_spine)
        else:
            self._sync(ids, logprobs)
            tree = build_tree(ids.tolist(), logprobs.tolist(), budget, scored=scored, spine=self.tree_spine)
        draft_s = time.perf_counter() - clock if self.timing == "split" else 0.0
        clock = time.perf_counter()
        logits, taps = self._verify_tree(tree, tokens_in[-1], start, depth, cache)
        key = None if params.is_greedy or noise is not None else rng.next_key()
        verdict = accept_tree(tree, logits, params, depth, key, noise)
        logprobs_out = self._logprobs(logits[verdict.path], verdict.tokens, params)
        pending = [verdict.num_accepted, verdict.tokens, verdict.path, *(logprobs_out or ()),
                   *([] if taps is None else [taps])]
        mx.async_eval(*pending)
        verify_s = self._split_sync(pending, clock)
        launched_at = time.perf_counter() if self.timing else 0.0
        return _Cycle(tree.budget + 1, depth, verdict.num_accepted, verdict.tokens, taps, logprobs_out, draft_s,
                      verify_s, launched_at, tree=_TreePart(start, tree, verdict.path))

    def _verify_tree(
        self, tree: DraftTree, anchor: int, start: int, depth: int, cache: list[Any]
    ) -> tuple[mx.array, mx.array | None]:
        """One target forward over [anchor, nodes] at positions start + depth: (N+1, V) logits and taps."""
        ids, rows = verify_rows(tree, anchor, start, depth)
        logits, taps = self.target(ids, cache, taps=self.drafter.needs_taps, tree=rows)
        return logits[0], taps

    def _finish(
        self, cycle: _Cycle, cache: list[Any], *, chained_next: bool = False
    ) -> tuple[int, list[int], list[TokenLogprob] | None, list[int]]:
        """The cycle's one host sync; the target cache is trimmed even if it raises.

        `chained_next`: the next cycle was launched before this sync. The CPU backend's async_eval
        runs a launched graph before returning, so this sync-to-sync window holds one forward only if
        exactly one of this cycle's and the next one's was launched in it; other windows (two forwards
        at a chain's start, none at its end) are not cycle costs, and the controller does not learn them.
        """
        rejected = cycle.block  # on failure roll the whole block back
        try:
            clock = time.perf_counter()
            tree_parts = [] if cycle.tree is None else [cycle.tree.path, *cycle.tree.tree.lazy()]
            self._sync(cycle.num_accepted, cycle.tokens, cycle.logprobs, *tree_parts)
            now = time.perf_counter()
            accepted = int(cycle.num_accepted.item())
            path = list(range(accepted + 1))  # the committed rows of the verify: a chain's leading ones
            if cycle.tree is not None:  # a tree's path: its K/V rows move into place, the rest is trimmed
                path = cycle.tree.path.tolist()[: accepted + 1]
                self.target.keep_rows(cache, cycle.tree.start, path)
            rejected = cycle.block - 1 - accepted
        finally:
            self.target.trim(cache, rejected)
        if self.timing is not None:
            launch_s = cycle.launched_at - self._sync_end
            host_s = clock - cycle.launched_at
            self.stats.timings.append(
                CycleTiming(cycle.draft_s, cycle.verify_s, launch_s, host_s, now - clock, now - self._sync_end)
            )
        outcome = None if cycle.tree is None else self._outcome(cycle, path)
        drafted = cycle.block > 1 or cycle.drafted
        if self._width is not None:
            one_forward = (not cycle.chained) != chained_next
            # the first drafting cycle after plain steps (or the prompt) also drafts the context they held
            steady = not drafted or self._drafted_last
            seconds = now - self._sync_end if one_forward else None
            if outcome is None:
                self._width.update(cycle.block - 1, accepted, seconds if steady else None, chained=cycle.chained,
                                   drafted=drafted)
            else:  # held context makes a tree dearer, never cheaper: learning from it errs toward chains
                self._width.update_tree(outcome, seconds)
        self._drafted_last = drafted
        self._sync_end = now
        self.stats.record(cycle.block - 1, accepted)
        self.stats.widths.append(cycle.width)
        self.stats.budgets.append(0 if cycle.tree is None else cycle.block - 1)
        if outcome is not None and outcome.spine_accepted < accepted:
            self.stats.branched += 1
        tokens = cycle.tokens.tolist()[: accepted + 1]
        return accepted, tokens, self._to_list(tokens, cycle.logprobs), path

    @staticmethod
    def _outcome(cycle: _Cycle, path: list[int]) -> TreeOutcome:
        assert cycle.tree is not None
        tree = cycle.tree.tree.on_host()
        on_path, spine_accepted = tree.outcome(path)
        return TreeOutcome(tree.budget, list(tree.scores), on_path, tree.spine, spine_accepted)

    def _sync(self, *arrays: Any) -> None:
        mx.eval(*arrays)
        self.stats.syncs += 1

    def _split_sync(self, arrays: Any, clock: float) -> float:
        """timing="split" only: wait for one stage to attribute device time (costs the overlap)."""
        if self.timing != "split":
            return 0.0
        self._sync(arrays)
        return time.perf_counter() - clock

    @staticmethod
    def _logprobs(
        logits: mx.array, tokens: mx.array, params: SamplingParams
    ) -> tuple[mx.array, mx.array, mx.array] | None:
        # verify row i is the target's exact distribution for committed token i: real logprobs
        return token_logprobs(logits, tokens, params.top_logprobs) if params.logprobs else None

    @staticmethod
    def _to_list(
        tokens: list[int], logprobs: tuple[mx.array, mx.array, mx.array] | None
    ) -> list[TokenLogprob] | None:
        if logprobs is None:
            return None
        chosen, top_ids, top_lp = (x.tolist() for x in logprobs)
        n = len(tokens)
        return to_token_logprobs(tokens, chosen[:n], top_ids[:n], top_lp[:n])


class _Script(VerifyWidth):
    """Plans given in advance (SpeculativeDecoder.rehearse), then plain steps; learns nothing."""

    def __init__(self, max_drafts: int, curve: CostCurve, plans: list[Plan]) -> None:
        super().__init__(max_drafts, curve)
        self.plans = plans

    def plan(self) -> Plan:
        return self.plans.pop(0) if self.plans else Plan(0)

    def peek_plan(self) -> Plan:
        return self.plans[0] if self.plans else Plan(0)

    def choose(self) -> int:
        return self.plan().width

    def update(self, verified: int, accepted: int, seconds: float | None = None, *, chained: bool = False,
               drafted: bool | None = None) -> None:
        pass

    def confident_width(self, confidence: list[float], width: int) -> int:
        return width  # the rehearsal's widths as planned

    def update_tree(self, outcome: TreeOutcome, seconds: float | None = None) -> None:
        pass

    def new_request(self) -> None:
        pass


def _rows(taps: mx.array, path: list[int]) -> mx.array:
    """The committed rows' taps (1, n, T*H): a chain's leading rows, or a tree's path rows in path order."""
    if path == list(range(len(path))):
        return taps[:, : len(path)]
    return taps[:, mx.array(path, dtype=mx.int32)]
