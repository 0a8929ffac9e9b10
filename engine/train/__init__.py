"""DFlash draft training for any mlx-lm target: prompts -> generate -> fit -> eval.

Run `python -m engine.train --help`. Every phase writes under one output directory and resumes
from what a previous run left there.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class _LineBar:
    """A one-line `\\r` progress bar for machines without tqdm."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix, self.start, self.last = 0, "", time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        total = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{self.desc}: {self.n}{total} {self.unit} [{now - self.start:.0f}s] {self.postfix}  ")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(force=True)
        sys.stderr.write("\n")


def progress_bar(*, total: int | None, desc: str, unit: str, initial: int = 0) -> Any:
    """tqdm when installed (it is on the GPU image), else a plain `\\r` line."""
    try:
        from tqdm import tqdm
    except ImportError:
        bar = _LineBar(total, desc, unit)
        bar.n = initial
        return bar
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, mininterval=0.5)
