"""Several running requests: continuous batching, with speculation where it pays (one request).

A lone request runs as before: its decoder alone (speculative with a drafter, the prefix cache, the
adaptive verify width). When another request waits, the lone one moves into a batch (its decoder's
cache, handed over through its prefix lease) and every running request decodes plainly in one target
forward per step (engine/decode/batch.py). New requests are prefilled alone, up to one prefill chunk
of prompt tokens between two batched steps, and join with their first token out; finished, cancelled or failed rows leave
before the next step. When one row is left, nothing waits, and a drafter can take it, it goes back to
speculative decoding with its own cache and taps (no target work is redone but its latest token).
A batch of one row that the drafter cannot take (penalties, logit_bias, no drafter) stays batched:
that is plain decoding, and moving it back would buy nothing. A request under a grammar (structured
outputs) runs alone: the batched step applies no constraint, so the queue waits behind it, first come first.
"""

from __future__ import annotations

import logging

from engine.decode.batch import BatchDecoder
from engine.decode.prefix_cache import PrefixLease
from engine.runtime.detokenizer import Detokenizer
from engine.runtime.request import FinishReason, Request
from engine.runtime.scheduler import Running, Scheduler

log = logging.getLogger("dflash.scheduler")


class BatchScheduler(Scheduler):
    def __init__(self, *args: object, batch: BatchDecoder, max_batch: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if max_batch < 2:
            raise ValueError(f"a batch scheduler runs 2 or more requests at once, got max_batch={max_batch}")
        self.batch = batch
        self.max_batch = max_batch
        self.rows: list[Running] = []  # in the batch, in its row order
        self.joining: list[Running] = []  # being prefilled, first come first

    def in_flight(self) -> list[Running]:
        return [*super().in_flight(), *self.rows, *self.joining]

    # --- the MLX thread ----------------------------------------------------------------
    def step(self) -> bool:
        if not self.batching():
            return super().step()
        self.drop_cancelled()
        self.admit()
        self.prefill()
        if self.rows:
            self.decode_rows()
        self.hand_back()
        return bool(self.in_flight())

    def batching(self) -> bool:
        """Whether this step runs the batch; a lone request that others wait behind moves into it first."""
        if self.rows or self.joining:
            return True
        waiting = sum(not r.cancelled for r in list(self.waiting))
        lone = self.running
        if lone is None:
            # several at once: each prefills alone and joins; a constrained request at the head runs alone
            return waiting >= 2 and not self.next_is_constrained()
        if lone.request.params.grammar is not None:  # the batch applies no grammar: the others wait
            return False
        if waiting and lone.request.num_completion_tokens and not lone.request.cancelled:
            self.into_batch(lone)  # past its prefill: its cache is whole
            return True
        return False

    def into_batch(self, running: Running) -> None:
        request, lease = running.request, running.prefix
        assert lease is not None, "a batching scheduler gives every request a lease"
        self.running = None
        running.stream.close()  # the decoder's `finally` offers its cache to the lease
        running.stream = None
        cache, length = lease.offered
        lease.offered = None
        running.row = self.make_row(request, lease, running.rng)
        self.batch.adopt(running.row, cache, length)
        self.batch.join(running.row)
        self.rows.append(running)

    def make_row(self, request: Request, lease: PrefixLease, rng: object) -> object:
        return self.batch.make_row(request.params, rng, lease, request.num_prompt_tokens,
                                   wants_taps=self.may_speculate(request))

    def may_speculate(self, request: Request) -> bool:
        return self.speculative is not None and self.speculative.supports(request.params) is None

    def drop_cancelled(self) -> None:
        for running in [*self.rows, *self.joining]:
            if running.request.cancelled:
                self.finish(running, FinishReason.ABORT)

    def next_is_constrained(self) -> bool:
        with self.wakeup:
            return bool(self.waiting) and self.waiting[0].params.grammar is not None

    def admit(self) -> None:
        """Take waiting requests in while the batch has room for them; a constrained one (structured
        outputs) is left at the head of the queue: it runs alone once the batch has drained."""
        while len(self.rows) + len(self.joining) < self.max_batch and not self.next_is_constrained():
            with self.wakeup:
                request = self.waiting.popleft() if self.waiting else None
            if request is None:
                return
            if request.cancelled:
                self.end_unstarted(request)
            else:
                self.start_row(request)

    def start_row(self, request: Request) -> None:
        self.choose_decoder(request)  # what it runs alone: a batch decodes plainly (usage says how much)
        rng = self.make_rng(request)
        lease = self.lease(request)
        running = Running(request, None, Detokenizer(self.tokenizer, request.stop), lease, rng)
        running.row = self.make_row(request, lease, rng)
        running.stream = self.batch.prefill(running.row, request.prompt_ids)
        self.joining.append(running)
        if request.max_tokens <= 0:
            self.finish(running, FinishReason.LENGTH)

    def prefill(self) -> None:
        """Up to a prefill chunk of prompt tokens over the joining requests, first come first (at least
        one chunk): running rows wait for that much prefill per step, never for a whole long prompt."""
        budget = self.batch.prefill_chunk
        for running in list(self.joining):
            if budget <= 0:
                return
            before = running.row.prefilled
            self.advance(running)
            budget -= max(running.row.prefilled - before, 1)

    def advance(self, running: Running) -> None:
        """One prefill chunk of the joining request, or its first token and its join."""
        try:
            self.route(running, next(running.stream))
        except Exception as e:  # its own failure (a prompt too long for memory): the batch goes on
            log.exception("request %s failed", running.request.request_id)
            self.finish(running, None, error=e)
            return
        if running in self.joining and running.row.first is not None:  # its first token is out
            self.joining.remove(running)
            running.stream = None
            self.batch.join(running.row)
            self.rows.append(running)

    def decode_rows(self) -> None:
        try:
            out = self.batch.step()
        except Exception as e:  # the shared forward: every row fails, the server goes on
            log.exception("a batched step failed")
            for running in list(self.rows):
                self.finish(running, None, error=e)
            return
        self.stats.record_batch(len(self.rows), len(out))
        by_row = {id(r.row): r for r in self.rows}
        for row, decoded in out:
            running = by_row[id(row)]
            try:
                running.request.num_batched_tokens += len(decoded.tokens)
                self.route(running, decoded)
            except Exception as e:  # one request's failure must not stop the others
                log.exception("request %s failed", running.request.request_id)
                self.finish(running, None, error=e)
        for running in list(self.rows):
            if running.row.failed is not None:
                self.finish(running, None, error=running.row.failed)

    def hand_back(self) -> None:
        """A lone row that a drafter can take goes back to speculative decoding."""
        if len(self.rows) != 1 or self.joining or self.running is not None or self.waiting:
            return
        running = self.rows[0]
        request, row = running.request, running.row
        needs_taps = self.speculative is not None and self.speculative.drafter.needs_taps
        if not self.may_speculate(request) or (needs_taps and not row.wants_taps) or request.cancelled:
            return
        resume = self.batch.take_out(row)
        self.rows.clear()
        lease = PrefixLease(self.prefix_cache, list(row.lease.tokens), request.num_stable_prompt_tokens, resume=resume)
        remaining = request.max_tokens - request.num_completion_tokens
        running.row, running.prefix = None, lease
        running.stream = self.speculative.generate(lease.prompt_ids, request.params, remaining, running.rng,
                                                   prefix=lease)
        self.running = running

    # --- leaving -------------------------------------------------------------------------
    def release(self, running: Running, *, keep: bool) -> None:
        if running is self.running or running.row is None:
            super().release(running, keep=keep)
            return
        row, lease = running.row, running.prefix
        if running in self.joining:
            self.joining.remove(running)
            running.stream.close()
            if keep and row.own_cache is not None:  # it ended at its first token: its prompt's rows
                lease.offer(row.own_cache, int(row.own_cache[0].offset))
            return
        self.rows.remove(running)
        if keep and lease.store is not None:
            cache = self.batch.row_cache(row)
            lease.offer(cache, int(cache[0].offset))
        self.batch.leave(row)

    def lease(self, request: Request) -> PrefixLease:
        """Every request gets one: a lone decoder hands its cache to the batch through it."""
        return super().lease(request) or PrefixLease(None, request.prompt_ids, request.num_stable_prompt_tokens)

    def fail_all(self, error: BaseException) -> None:
        super().fail_all(error)
        self.rows.clear()
        self.joining.clear()
