"""DFlash draft training for any mlx-lm target: prompts -> generate -> fit -> eval.

Run `python -m engine.train --help`. Every phase writes under one output directory and resumes
from what a previous run left there.
"""

from __future__ import annotations

from typing import Any

from engine.model import progress


def progress_bar(*, total: int | None, desc: str, unit: str, initial: int = 0) -> Any:
    """tqdm on a terminal; redirected to a file, a plain line every 30 s (runs last hours)."""
    return progress.progress_bar(total=total, desc=desc, unit=unit, initial=initial, redirected="lines")
