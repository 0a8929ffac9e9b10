"""DFlash draft training for any mlx-lm target: prompts -> generate -> fit -> eval.

Run `python -m engine.train --help`. Every phase writes under one output directory and resumes
from what a previous run left there.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class _LineBar:
    """A `\\r` progress line without tqdm; in a log file, one plain line every `interval` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, *, log: bool = False) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix, self.start, self.last = 0, "", time.perf_counter(), 0.0
        self.interval, self.end = (30.0, "\n") if log else (0.5, "")

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
        line = f"{self.desc}: {self.n}{total} {self.unit} [{now - self.start:.0f}s] {self.postfix}"
        sys.stderr.write(f"{line}\n" if self.end else f"\r{line}  ")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(force=True)
        if not self.end:
            sys.stderr.write("\n")


def progress_bar(*, total: int | None, desc: str, unit: str, initial: int = 0) -> Any:
    """tqdm on a terminal when installed, else a plain line; redirected to a file, a line every 30 s."""
    interactive = sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and interactive:
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, mininterval=0.5)
    bar = _LineBar(total, desc, unit, log=not interactive)
    bar.n = initial
    return bar
