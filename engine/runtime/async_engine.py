"""The bridge between asyncio and the MLX thread.

One background thread owns MLX: it loads the model, then runs the scheduler loop. Values,
end markers (None) and exceptions come back through a per-request asyncio.Queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

import mlx.core as mx

from engine.model import progress
from engine.runtime.batch_scheduler import BatchScheduler
from engine.runtime.request import Request, RequestOutput
from engine.runtime.scheduler import EngineBusy, Scheduler
from engine.runtime.serving_model import ServingModel

log = logging.getLogger("dflash.engine")


class EngineDead(RuntimeError):
    """The MLX thread is gone; requests fail fast instead of hanging."""


class AsyncEngine:
    POLL_SECONDS = 1.0  # how often a waiting request checks that the MLX thread is alive

    def __init__(
        self, load: Callable[[], ServingModel], *, max_waiting: int,
        make_scheduler: Callable[..., Scheduler] | None = None,
    ) -> None:
        self._load = load
        self._make_scheduler = make_scheduler  # a tensor-parallel group's rank 0 passes DistributedScheduler
        # (None: Scheduler, or BatchScheduler when the model batches)
        self.max_waiting = max_waiting
        self.model: ServingModel | None = None
        self.scheduler: Scheduler | None = None
        self.error: BaseException | None = None
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._closed = False  # set by abort_all: the server is shutting down
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._started = threading.Lock()  # held once the thread has been started

    # --- lifecycle ---------------------------------------------------------------------
    def load(self) -> None:
        """Start the MLX thread (once) and wait until the model is loaded; raises what loading raised."""
        if self._started.acquire(blocking=False):
            self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.load)

    async def stop(self) -> None:
        self._stop.set()
        if self.scheduler is not None:
            with self.scheduler.wakeup:
                self.scheduler.wakeup.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    def abort_all(self) -> int:
        """Shutdown: refuse new requests and end every queued or running one with finish_reason abort."""
        self._closed = True
        return self.scheduler.abort_all() if self.scheduler is not None else 0

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _run(self) -> None:
        try:
            with progress.logging_redirected():  # a log line during loading must not land mid-bar
                self.model = self._load()
            make, batching = self._make_scheduler or Scheduler, {}
            if self._make_scheduler is None and self.model.batch is not None:
                make, batching = BatchScheduler, {"batch": self.model.batch, "max_batch": self.model.max_batch}
            self.scheduler = make(
                self.model.plain, self.model.speculative, self.model.tokenizer,
                self.model.tokenizer.eos_token_ids, self._emit, max_waiting=self.max_waiting,
                prefix_cache=self.model.prefix_cache, **batching,
            )
        except BaseException as e:
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not self.scheduler.step():
                    self.scheduler.wait_for_work(timeout=0.5)
            self.scheduler.close()
        except BaseException as e:  # a bug in the loop itself: fail everyone, loudly
            log.exception("engine thread died")
            self.error = EngineDead(f"engine thread died: {e!r}")
            self.scheduler.fail_all(self.error)
        finally:
            if hasattr(mx, "clear_streams"):  # the thread's MLX streams go with it (older MLX lacks this)
                mx.clear_streams()

    # --- requests ----------------------------------------------------------------------
    def _emit(self, request: Request, item: RequestOutput | BaseException | None) -> None:
        entry = self._queues.get(request.request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def submit(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue a request (raising EngineBusy / EngineDead at once) and return its delta stream.

        Leaving the stream early (a client disconnect) cancels the request.
        """
        if not self.is_alive or self.scheduler is None:
            raise self.error or EngineDead("the engine is not running")
        if self._closed:
            raise EngineBusy("the server is shutting down")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.scheduler.add(request)
        except BaseException:
            self._queues.pop(request.request_id, None)
            raise
        return self._stream(request, queue)

    async def _stream(self, request: Request, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        done = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=self.POLL_SECONDS)
                except asyncio.TimeoutError:
                    if not self.is_alive:
                        raise self.error or EngineDead("the engine thread exited") from None
                    continue
                if item is None:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            if not done:
                self.scheduler.abort(request)
            self._queues.pop(request.request_id, None)
