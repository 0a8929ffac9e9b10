"""Progress bars on stderr for long work: model loading (the server) and draft training.

Bars draw where a person watches: stderr is a terminal and TERM is not "dumb". `configure(True)`
forces them (e.g. into a log file), `configure(False)` silences them (`dflash-server --no-progress`).
They never write to stdout and never use colour (NO_COLOR holds trivially).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_forced: bool | None = None  # None: decide by the terminal; True / False: configure()'s choice


def configure(enabled: bool | None) -> None:
    """Force bars on (True) or off (False) for this process; None restores the terminal check."""
    global _forced
    _forced = enabled


def interactive() -> bool:
    """stderr is a terminal that can redraw a line in place."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def enabled() -> bool:
    return interactive() if _forced is None else _forced


def progress_bar(
    *, total: int | None, desc: str, unit: str, initial: int = 0, redirected: Literal["silent", "lines"] = "silent"
) -> Any:
    """A tqdm bar on stderr when enabled(); otherwise a silent one.

    redirected="lines" (training runs for hours into log files) writes one plain line every 30 s
    instead of staying silent, unless bars were switched off with configure(False).
    """
    if enabled():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.5)
    if redirected == "lines" and _forced is None:
        return _LineBar(total, desc, unit, initial=initial)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=True)


@contextlib.contextmanager
def logging_redirected() -> Iterator[None]:
    """While bars may draw, console log lines go through tqdm.write so none lands mid-bar."""
    if not enabled():
        yield
        return
    with logging_redirect_tqdm():
        yield


class _LineBar:
    """For log files: one plain `desc: n/total unit [elapsed] postfix` line every `interval` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, interval: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.postfix, self.start, self.last = initial, "", time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        total = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"{self.desc}: {self.n}{total} {self.unit} [{now - self.start:.0f}s] {self.postfix}\n")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(force=True)
