"""Measured verify costs kept on disk per machine and model, so a restart does not time them again.

The adaptive verify width prices each width with the target's forward cost at every row count and the
draft's cost per verified row. On 2 CPU cores timing them takes ~8 s of the 135M model's ~11 s load, and
they depend only on the machine, its BLAS, MLX and the model pair: the first start measures and stores
them, later starts read them. Only on the CPU: on a GPU the curve takes under a second and follows the
kernel choices made at warm-up, so it is measured every start.

DFLASH_COST_CACHE=<file> moves the cache (default ~/.cache/dflash-server/costs.json); =off disables it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.decode.verify_width import CostCurve

CACHE_ENV = "DFLASH_COST_CACHE"
MAX_ENTRIES = 32  # one per machine x model pair x settings; the oldest go first

log = logging.getLogger("dflash.model")


@dataclass(frozen=True)
class Costs:
    """What a warm-up measures: the target's seconds by rows and the draft's seconds per verified row."""

    curve: CostCurve
    draft_row_s: float


class CostCache:
    """A JSON file of measured Costs by key (what they were measured for, in words)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def default(cls, environ: Mapping[str, str] = os.environ) -> CostCache | None:
        value = environ.get(CACHE_ENV, "")
        if value.lower() == "off":
            return None
        if value:
            return cls(Path(value))
        base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cls(base / "dflash-server" / "costs.json")

    def get(self, key: str) -> Costs | None:
        entry = self._read().get(key)
        try:
            return Costs(CostCurve(tuple(float(s) for s in entry["curve"])), float(entry["draft_row_s"]))
        except (TypeError, KeyError, ValueError):  # absent, or written by another version: measure again
            return None

    def put(self, key: str, costs: Costs) -> None:
        entries = self._read()
        entries.pop(key, None)
        entries[key] = {"curve": list(costs.curve.seconds), "draft_row_s": costs.draft_row_s,
                        "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        kept = dict(list(entries.items())[-MAX_ENTRIES:])  # insertion order: the newest last
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")  # concurrent starts never read half a file
            temporary.write_text(json.dumps(kept, indent=1))
            temporary.replace(self.path)
        except OSError as e:
            log.warning("verify costs not cached (%s): they are measured again at the next start", e)

    def _read(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}
