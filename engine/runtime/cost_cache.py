"""Measured verify costs kept on disk per machine and model, so a restart does not time them again.

The adaptive verify width prices each width with the target's forward cost at every row count and the
draft's cost per verified row. On 2 CPU cores timing them takes ~8 s of the 135M model's ~11 s load, and
they depend only on the machine, its BLAS, MLX and the model pair: the first start measures and stores
them, later starts read them. Only on the CPU: on a GPU the curve takes under a second and follows the
kernel choices made at warm-up, so it is measured every start.

They depend on the engine's code too (compiled layers made a 135M step ~0.5 ms cheaper on 2 cores): the
key holds a hash of the engine's sources, so an upgrade measures again.
DFLASH_COST_CACHE=<file> moves the cache (default ~/.cache/dflash-server/costs.json); =off disables it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.backend.disk_cache import DiskCache
from engine.decode.verify_width import CostCurve

CACHE_ENV = "DFLASH_COST_CACHE"
ENGINE_ROOT = Path(__file__).resolve().parents[1]  # engine/
MAX_ENTRIES = 32  # one per machine x model pair x settings; the oldest go first


def engine_stamp(root: Path = ENGINE_ROOT) -> str:
    """A short hash of the engine's Python sources (what prices a cycle besides the machine and the model)."""
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Costs:
    """What a warm-up measures: the target's seconds by rows, the draft's seconds per verified row and a
    chained plain step's seconds (None: not measured, as where plain steps do not chain)."""

    curve: CostCurve
    draft_row_s: float
    plain_step_s: float | None = None


class CostCache:
    """Measured Costs by key (what they were measured for, in words), in a DiskCache file."""

    def __init__(self, path: Path) -> None:
        self.file = DiskCache(path, MAX_ENTRIES)

    @property
    def path(self) -> Path:
        return self.file.path

    @classmethod
    def default(cls, environ: Mapping[str, str] = os.environ) -> CostCache | None:
        file = DiskCache.default("costs.json", CACHE_ENV, MAX_ENTRIES, environ)
        return None if file is None else cls(file.path)

    def get(self, key: str) -> Costs | None:
        entry = self.file.get(key)
        try:
            curve, row = CostCurve(tuple(float(s) for s in entry["curve"])), float(entry["draft_row_s"])
            plain = entry.get("plain_step_s")  # absent from entries written before it was measured
            return Costs(curve, row, None if plain is None else float(plain))
        except (TypeError, KeyError, ValueError):  # absent, or written by another version: measure again
            return None

    def put(self, key: str, costs: Costs) -> None:
        self.file.put(key, {"curve": list(costs.curve.seconds), "draft_row_s": costs.draft_row_s,
                            "plain_step_s": costs.plain_step_s}, "verify costs")
