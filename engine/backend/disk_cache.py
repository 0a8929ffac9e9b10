"""Measurements kept on disk across restarts: a JSON file of entries by key, the newest kept.

What a start measures about this machine (the verify costs on the CPU, which GPU kernel variant wins)
depends only on the machine, its libraries and the model; timing it again at every start costs from
seconds (the CPU cost curve) to minutes (compiling and timing kernel variants on a fresh CUDA process).
A key says in words what an entry was measured for; a different MLX, kernel source or model is a
different key. Writes are atomic, so concurrent starts never read half a file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("dflash.model")


def cache_home(environ: Mapping[str, str] = os.environ) -> Path:
    """~/.cache/dflash-server (XDG_CACHE_HOME respected): where every measurement and build is kept."""
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dflash-server"


class DiskCache:
    """A JSON file of dict entries by key; at most `max_entries`, the oldest dropped first."""

    def __init__(self, path: Path, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries

    @classmethod
    def default(cls, name: str, env: str, max_entries: int, environ: Mapping[str, str] = os.environ) -> DiskCache | None:
        """~/.cache/dflash-server/<name> (XDG_CACHE_HOME respected); `env`=<file> moves it, `env`=off: None."""
        value = environ.get(env, "")
        if value.lower() == "off":
            return None
        if value:
            return cls(Path(value), max_entries)
        return cls(cache_home(environ) / name, max_entries)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict[str, Any], what: str) -> bool:
        """Store `entry` under `key`, the newest last; False where the file could not be written."""
        entries = self._read()
        entries.pop(key, None)
        entries[key] = {**entry, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        kept = dict(list(entries.items())[-self.max_entries :])  # insertion order: the newest last
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(kept, indent=1))
            temporary.replace(self.path)
        except OSError as e:
            log.warning("%s not cached (%s): measured again at the next start", what, e)
            return False
        return True

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}
