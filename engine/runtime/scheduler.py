"""The MLX thread's loop: FIFO admission, one running request, routing of committed tokens.

engine/runtime/batch_scheduler.py extends it to several running requests (continuous batching).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from engine.decode.decoder import Decoder, DecodeStep
from engine.decode.prefix_cache import PrefixCache, PrefixLease
from engine.decode.sampling import TokenRng
from engine.runtime.detokenizer import Decodes, Detokenizer
from engine.runtime.histogram import BATCH_BUCKETS, E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, Histogram
from engine.runtime.request import FinishReason, Request, RequestOutput

log = logging.getLogger("dflash.scheduler")

# What crosses to the asyncio side: a delta, an exception, or None (the end marker).
Emit = Callable[[Request, "RequestOutput | BaseException | None"], None]


class EngineBusy(RuntimeError):
    """The waiting queue is full; the HTTP layer answers 503 with Retry-After."""


@dataclass(eq=False)
class Running:
    request: Request
    stream: Generator[DecodeStep, None, None] | None  # None: a batched row between steps
    detokenizer: Detokenizer
    prefix: PrefixLease | None = None
    rng: TokenRng | None = None  # kept for the request's life: a request may change decoders
    row: Any = None  # engine.decode.batch.Row while it decodes in a batch


class Scheduler:
    def __init__(
        self,
        plain: Decoder,
        speculative: Decoder | None,
        tokenizer: Decodes,
        eos_token_ids: frozenset[int],
        emit: Emit,
        *,
        max_waiting: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.plain = plain
        self.speculative = speculative
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.emit = emit
        self.max_waiting = max_waiting
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: Running | None = None
        self.wakeup = threading.Condition()
        self.stats = SchedulerStats()

    # --- called from any thread -------------------------------------------------------
    def add(self, request: Request) -> None:
        with self.wakeup:
            if len(self.waiting) >= self.max_waiting:
                raise EngineBusy(f"server busy: {len(self.waiting)} requests already waiting")
            self.waiting.append(request)
            self.wakeup.notify()

    def abort(self, request: Request) -> None:
        """A client left: a waiting request leaves the queue now (its slot frees at once), a running one next step."""
        request.cancelled = True
        with self.wakeup:
            if request in self.waiting:
                self.waiting.remove(request)
            self.wakeup.notify()

    def abort_all(self) -> int:
        """Shutdown: cancel the running and every waiting request; each ends with finish_reason abort."""
        with self.wakeup:
            requests = [*(r.request for r in self.in_flight()), *self.waiting]
            for request in requests:
                request.cancelled = True
            self.wakeup.notify()
        return len(requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.in_flight())

    def in_flight(self) -> list[Running]:
        """Requests started and not finished."""
        return [] if self.running is None else [self.running]

    # --- the MLX thread ----------------------------------------------------------------
    def step(self) -> bool:
        """Advance the running request by one decode step. False when there was nothing to do."""
        running = self.schedule()
        if running is None:
            return False
        try:
            decoded = next(running.stream, None)
            self.route(running, decoded)
        except Exception as e:  # one request's failure must not stop the server
            log.exception("request %s failed", running.request.request_id)
            self.finish(running, None, error=e)
        return True

    def wait_for_work(self, timeout: float) -> None:
        with self.wakeup:
            if not self.in_flight() and not self.waiting:
                self.wakeup.wait(timeout)

    def schedule(self) -> Running | None:
        if self.running is not None and self.running.request.cancelled:
            self.finish(self.running, FinishReason.ABORT)
        if self.running is None:
            self.running = self._start_next()
        return self.running

    def _start_next(self) -> Running | None:
        with self.wakeup:
            while self.waiting:
                request = self.waiting.popleft()
                if not request.cancelled:
                    break
                self.end_unstarted(request)
            else:
                return None
        decoder = self.choose_decoder(request)
        rng = self.make_rng(request)
        args = (request.prompt_ids, request.params, request.max_tokens, rng)
        kwargs = {}
        if request.params.grammar is not None:  # structured outputs: the decoder keeps to the grammar
            try:
                kwargs["constraint"] = request.constraint = self.make_constraint(request)
            except Exception as e:  # the HTTP layer compiled it already: only a bug lands here
                log.exception("request %s: cannot build its constraint", request.request_id)
                self.emit(request, e)
                self.emit(request, None)
                return None
        detokenizer = Detokenizer(self.tokenizer, request.stop)
        prefix = self.lease(request)
        if prefix is None:
            return Running(request, decoder.generate(*args, **kwargs), detokenizer, rng=rng)
        return Running(request, decoder.generate(*args, prefix=prefix, **kwargs), detokenizer, prefix, rng)

    def lease(self, request: Request) -> PrefixLease | None:
        if self.prefix_cache is None:
            return None
        return self.prefix_cache.lease(request.prompt_ids, request.num_stable_prompt_tokens)

    def make_rng(self, request: Request) -> TokenRng:
        # constrained sampling takes the position-keyed noise (exact under a mask: engine/grammar/constraint.py)
        return TokenRng(request.params.seed, by_position=True if request.params.grammar is not None else None)

    def make_constraint(self, request: Request) -> object:
        from engine.grammar.constraint import make_constraint

        assert request.params.grammar is not None
        return make_constraint(request.params.grammar, self.tokenizer, self.eos_token_ids)

    def close(self) -> None:
        """The loop has ended (engine shutdown); nothing to release in one process."""

    def group_health(self) -> dict[str, object] | None:
        """A tensor-parallel group's state for /health and /metrics; None in one process."""
        return None

    def end_unstarted(self, request: Request) -> None:
        # cancelled while waiting: never runs; a shutdown abort still reads this final output
        request.finish_reason = FinishReason.ABORT
        self.emit(request, RequestOutput("", [], None, FinishReason.ABORT, request.usage()))
        self.emit(request, None)

    def choose_decoder(self, request: Request) -> Decoder:
        if self.speculative is not None:
            reason = self.speculative.supports(request.params)
            if reason is None:
                request.decoder = self.speculative.name
                return self.speculative
            request.fallback_reason = reason
        request.decoder = self.plain.name
        return self.plain

    def route(self, running: Running, decoded: DecodeStep | None) -> None:
        request = running.request
        if running.prefix is not None:  # restored before the decoder's first step returned
            request.num_cached_tokens = running.prefix.num_cached_tokens
        if decoded is None:  # the decoder produced max_tokens
            self.finish(running, FinishReason.LENGTH)
            return
        if decoded.drafted:
            request.num_verify_steps += 1
            request.num_drafted_tokens += decoded.drafted
            request.num_accepted_tokens += decoded.accepted
            self.stats.record_cycle(decoded)
        kept: list[int] = []
        finish: FinishReason | None = None
        remaining = request.max_tokens - request.num_completion_tokens
        for token in decoded.tokens[:remaining]:
            if token in self.eos_token_ids:
                finish = FinishReason.STOP
                if request.include_stop_token_ids:
                    kept.append(token)
                break
            kept.append(token)
        request.output_ids.extend(kept)
        text = running.detokenizer.add([t for t in kept if t not in self.eos_token_ids])
        if running.detokenizer.stopped:
            finish = FinishReason.STOP
        if finish is None and request.num_completion_tokens >= request.max_tokens:
            finish = FinishReason.LENGTH
        logprobs = decoded.logprobs[: len(kept)] if decoded.logprobs is not None else None
        if kept:
            self.stats.record_tokens(request, len(kept))
        if finish is not None:
            self.finish(running, finish, text=text, token_ids=kept, logprobs=logprobs)
        elif text or kept:
            self.emit(request, RequestOutput(text, kept, logprobs, None, request.usage()))

    def finish(
        self,
        running: Running,
        reason: FinishReason | None,
        *,
        text: str = "",
        token_ids: list[int] | None = None,
        logprobs: list | None = None,
        error: BaseException | None = None,
    ) -> None:
        request = running.request
        keep = error is None and reason is not FinishReason.ABORT
        self.release(running, keep=keep)
        if error is not None:
            self.emit(request, error)
        else:
            assert reason is not None
            request.finish_reason = reason
            if reason is not FinishReason.STOP or not running.detokenizer.stopped:
                text += running.detokenizer.flush()
            self.emit(request, RequestOutput(text, token_ids or [], logprobs, reason, request.usage()))
            self.stats.record_request(request)
        self.emit(request, None)
        if running.prefix is not None and keep:
            self.store_prefix(running.prefix)

    def release(self, running: Running, *, keep: bool) -> None:
        """A finished request stops decoding; with `keep` its cache is offered to its lease."""
        self.running = None
        running.stream.close()  # runs the decoder's `finally` (cache rewind, buffers, the offer)

    def store_prefix(self, prefix: PrefixLease) -> None:
        # after the reply is out: the copy delays the next request, not this one
        if self.prefix_cache is None:
            return
        try:
            self.prefix_cache.commit(prefix)
        except Exception:  # a failed copy (memory) loses an entry, not the server
            log.exception("could not store a prefix cache entry")

    def fail_all(self, error: BaseException) -> None:
        """The engine is going down: every request still here gets the error."""
        with self.wakeup:
            pending = [*(r.request for r in self.in_flight()), *self.waiting]
            self.waiting.clear()
        self.running = None
        for request in pending:
            self.emit(request, error)
            self.emit(request, None)


class SchedulerStats:
    """Counters read by /metrics and /health; written only by the MLX thread."""

    def __init__(self) -> None:
        self.now = time.monotonic
        self.num_requests = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position: list[int] = []
        self.num_finished = {reason: 0 for reason in FinishReason}  # every key up front: readers iterate it
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(ITL_BUCKETS)
        self.e2e_request_latency = Histogram(E2E_BUCKETS)
        self.num_batch_steps = 0  # batched forwards (engine/runtime/batch_scheduler.py)
        self.num_batch_tokens = 0  # tokens they produced
        self.batch_size = Histogram(BATCH_BUCKETS)  # rows per batched forward

    def record_cycle(self, decoded: DecodeStep) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += decoded.drafted
        self.num_accepted_tokens += decoded.accepted
        for pos in decoded.accepted_positions:
            while len(self.accepted_per_position) <= pos:
                self.accepted_per_position.append(0)
            self.accepted_per_position[pos] += 1

    def record_batch(self, rows: int, tokens: int) -> None:
        self.num_batch_steps += 1
        self.num_batch_tokens += tokens
        self.batch_size.observe(rows)

    def record_tokens(self, request: Request, num_tokens: int) -> None:
        """Latencies of a step that committed `num_tokens`; a speculative step's interval is split evenly."""
        now = self.now()
        if request.first_token_time is None:
            request.first_token_time = now
            self.time_to_first_token.observe(now - request.arrival_time)
        elif request.last_token_time is not None:
            self.inter_token_latency.observe((now - request.last_token_time) / num_tokens, num_tokens)
        request.last_token_time = now

    def record_request(self, request: Request) -> None:
        self.num_requests += 1
        if request.finish_reason is not None:
            self.num_finished[request.finish_reason] += 1
        self.e2e_request_latency.observe(self.now() - request.arrival_time)
        self.num_prompt_tokens += request.num_prompt_tokens
        self.num_generation_tokens += request.num_completion_tokens
