"""The scheduler of a tensor-parallel group: every rank runs this loop in lockstep, rank 0 steers.

Each tick starts with rank 0's control message (engine/runtime/control_channel.py); every rank
applies it at the same point, so admission, cancellation and finishing happen at the same cycle
boundary everywhere and every forward's collectives line up. Only rank 0 has HTTP clients.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import asdict
from typing import Any

from engine.decode.decoder import DecodeStep
from engine.decode.sampling import SamplingParams, TokenRng
from engine.runtime.control_channel import MAX_IDS, Control, ControlChannel, NewRequest
from engine.runtime.request import FinishReason, Request, RequestOutput
from engine.runtime.scheduler import EngineBusy, Running, Scheduler

log = logging.getLogger("dflash.distributed")
CHECKSUM_MODULUS = 2_147_483_647  # fits the int32 header


class RankDiverged(RuntimeError):
    """A follower's state differs from rank 0's: its next collective would sum the wrong things."""


class DistributedScheduler(Scheduler):
    IDLE_SECONDS = 0.05  # rank 0 ticks at least this often, so followers never wait long in a collective

    def __init__(self, *args: Any, channel: ControlChannel, backend: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channel = channel
        self.backend = backend  # what /health names: ring, jaccl, nccl or mpi
        self.is_leader = channel.rank == 0
        self.tick = 0
        self.checksum = 0  # of every committed token, in order
        self.last_tick_time = time.monotonic()  # the watchdog's and /health's view of liveness
        self.shut_down = False
        self._live: dict[int, Request] = {}  # announced and not ended, by number (the same on every rank)
        self._seeds: dict[int, int] = {}
        self._last_idle = False
        # rank 0 only: what the next message carries
        self._inbox: deque[Request] = deque()
        self._numbers: dict[Request, int] = {}
        self._announced: dict[int, Request] = {}  # in the message being sent, not yet applied
        self._aborts: list[int] = []
        self._finished: list[int] = []
        self._next_number = 1

    # --- rank 0, any thread ---------------------------------------------------------------
    def add(self, request: Request) -> None:
        with self.wakeup:
            if len(self.waiting) + len(self._inbox) >= self.max_waiting:
                raise EngineBusy(f"server busy: {len(self.waiting) + len(self._inbox)} requests already waiting")
            self._inbox.append(request)
            self.wakeup.notify()

    def abort(self, request: Request) -> None:
        """Cancellation takes effect on every rank at the next tick, never at once on rank 0 alone."""
        with self.wakeup:
            if request in self._inbox:  # never announced: the other ranks never hear of it
                self._inbox.remove(request)
                request.cancelled = True
            elif request in self._numbers:
                self._aborts.append(self._numbers[request])
            self.wakeup.notify()

    def abort_all(self) -> int:
        with self.wakeup:
            unannounced = list(self._inbox)
            self._inbox.clear()
            self._aborts.extend(self._numbers.values())
            count = len(self._numbers) + len(unannounced)
            self.wakeup.notify()
        for request in unannounced:
            self.end_unstarted(request)
        return count

    def fail_all(self, error: BaseException) -> None:
        with self.wakeup:
            unannounced = list(self._inbox)
            self._inbox.clear()
        super().fail_all(error)
        for request in unannounced:
            self.emit(request, error)
            self.emit(request, None)

    def group_health(self) -> dict[str, object]:
        # every tick is a collective of all ranks: a recent tick means every rank was alive then
        return {"world_size": self.channel.group.size(), "backend": self.backend, "tick": self.tick,
                "last_tick_age_s": round(time.monotonic() - self.last_tick_time, 3)}

    # --- every rank, the MLX thread -------------------------------------------------------
    def step(self) -> bool:
        control = self.channel.exchange(self._outgoing() if self.is_leader else None)
        self._apply(control)
        self.tick += 1
        self.last_tick_time = time.monotonic()
        if self.shut_down:
            return False
        running = self.schedule()
        if running is None:
            return False
        # no per-request recovery: a failure on one rank would leave the others in a collective alone
        self.route(running, next(running.stream, None))
        return True

    def wait_for_work(self, timeout: float) -> None:
        if self.is_leader:
            with self.wakeup:
                if self.running is None and not self.waiting and not self._inbox and not self._aborts:
                    self.wakeup.wait(min(timeout, self.IDLE_SECONDS))
        elif self._last_idle:  # sleep through most of rank 0's idle wait instead of spinning in the collective
            time.sleep(self.IDLE_SECONDS * 0.9)

    def close(self) -> None:
        """Rank 0's last message: every other rank leaves its loop and exits."""
        if not self.is_leader or self.shut_down:
            return
        self.shut_down = True
        try:
            self.channel.exchange(Control(self.tick, self.checksum, shutdown=True))
        except Exception as e:  # a peer already gone: nobody left to tell
            log.warning("could not send shutdown to the other ranks: %s", e)

    def route(self, running: Running, decoded: DecodeStep | None) -> None:
        for token in decoded.tokens if decoded is not None else ():
            self.checksum = (self.checksum * 1_000_003 + token + 1) % CHECKSUM_MODULUS
        super().route(running, decoded)

    def finish(self, running: Running, reason: FinishReason | None, **kwargs: Any) -> None:
        number = self._forget(running.request)
        if self.is_leader and running.detokenizer.stopped and number is not None:
            self._finished.append(number)  # a stop string: only rank 0 detokenizes with the stop list
        super().finish(running, reason, **kwargs)

    def end_unstarted(self, request: Request) -> None:
        self._forget(request)
        super().end_unstarted(request)

    def make_rng(self, request: Request) -> TokenRng:
        # the seed rank 0 announced: every rank draws the same numbers, seeded or not
        number = self._number(request)
        return TokenRng(self._seeds.pop(number),
                        by_position=request.params.seed is not None or request.params.grammar is not None)

    # --- the message ----------------------------------------------------------------------
    def _outgoing(self) -> Control:
        with self.wakeup:
            new = self._announce(self._inbox.popleft()) if self._inbox else None
            aborts, self._aborts = self._aborts[:MAX_IDS], self._aborts[MAX_IDS:]
        finishes, self._finished = self._finished[:MAX_IDS], self._finished[MAX_IDS:]
        idle = new is None and not aborts and not finishes and self.running is None and not self.waiting
        return Control(self.tick, self.checksum, new, tuple(aborts), tuple(finishes), idle=idle)

    def _announce(self, request: Request) -> NewRequest:
        number, self._next_number = self._next_number, self._next_number + 1
        self._numbers[request] = number
        seed = request.params.seed if request.params.seed is not None else int.from_bytes(os.urandom(8), "little")
        settings = {
            "params": asdict(request.params),
            "max_tokens": request.max_tokens,
            "include_stop_token_ids": request.include_stop_token_ids,
            "seed": seed,
        }
        self._announced[number] = request
        return NewRequest(number, tuple(request.prompt_ids), settings)

    def _apply(self, control: Control) -> None:
        if not self.is_leader:
            self._check(control)
        self._last_idle = control.idle
        if control.new is not None:
            request = self._admit(control.new)
            with self.wakeup:
                self.waiting.append(request)
        for number in control.aborts:
            if (request := self._live.get(number)) is not None:
                request.cancelled = True
        if not self.is_leader:
            for number in control.finishes:
                if self.running is not None and self._live.get(number) is self.running.request:
                    self.finish(self.running, FinishReason.STOP)
        self.shut_down = control.shutdown

    def _admit(self, new: NewRequest) -> Request:
        settings = new.settings
        self._seeds[new.number] = settings["seed"]
        if self.is_leader:
            request = self._announced.pop(new.number)
        else:
            params = dict(settings["params"])
            params["logit_bias"] = tuple((int(t), float(b)) for t, b in params["logit_bias"])
            request = Request(
                f"rank-{self.channel.rank}-{new.number}", list(new.prompt_ids), SamplingParams(**params),
                settings["max_tokens"], include_stop_token_ids=settings["include_stop_token_ids"],
            )
        self._live[new.number] = request
        return request

    def _check(self, control: Control) -> None:
        if control.tick != self.tick or control.checksum != self.checksum:
            raise RankDiverged(
                f"rank {self.channel.rank} diverged from rank 0 at tick {self.tick}: rank 0 is at tick "
                f"{control.tick}, token checksum {control.checksum} against {self.checksum} here"
            )

    def _number(self, request: Request) -> int:
        return next(n for n, r in self._live.items() if r is request)

    def _forget(self, request: Request) -> int | None:
        number = next((n for n, r in self._live.items() if r is request), None)
        if number is not None:
            del self._live[number]
            self._seeds.pop(number, None)
        with self.wakeup:
            self._numbers.pop(request, None)
        return number


def drop_outputs(request: Request, item: RequestOutput | BaseException | None) -> None:
    """A follower's emit: its tokens have no client (rank 0 answers them)."""
