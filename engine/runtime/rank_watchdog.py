"""A rank that stops ticking (a dead or stuck peer) becomes errors and an exit, never a hang.

A collective waits for every rank, so one lost rank stalls the rest inside `mx.eval`, which
releases the GIL: this thread still runs, sees the last tick age, fails what is waiting and exits.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("dflash.distributed")


class RankWatchdog:
    def __init__(
        self,
        last_tick: Callable[[], float],
        alive: Callable[[], bool],
        fail: Callable[[str], None],
        *,
        timeout: float,
        grace: float = 1.0,
    ) -> None:
        self.last_tick = last_tick  # time.monotonic() of the loop's last completed control exchange
        self.alive = alive  # False once the loop has died (a lost connection raises there) or a local rank exited
        self.fail = fail  # turns the reason into errors for whoever waits; runs before the exit
        self.timeout = timeout
        self.grace = grace  # for the errors to reach clients before the process goes
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        poll = min(1.0, self.timeout / 4)
        while not self._stopped.wait(poll):
            age = time.monotonic() - self.last_tick()
            if not self.alive():
                self._trip("a rank exited or its connection was lost")
            elif age > self.timeout:
                faulthandler.dump_traceback(all_threads=True)
                self._trip(f"no tick for {age:.0f} s: a rank is stuck or gone")

    def _trip(self, reason: str) -> None:
        if self._stopped.is_set():  # a shutdown raced the check
            return
        log.error("tensor-parallel group failed: %s; exiting", reason)
        try:
            self.fail(reason)
        finally:
            time.sleep(self.grace)
            sys.stderr.flush()
            os._exit(1)
