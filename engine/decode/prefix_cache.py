"""The prefix cache: a request restores the longest stored prefix of its tokens and prefills the rest.

Owned by the MLX thread (no locks). An entry holds the committed tokens of a finished request (its
prompt and the reply tokens fed to the target: never a rejected draft row, never the last sampled
token, which no forward has seen), private copies of the target's cache rows for them, and, when
the request was decoded with DFlash, the target taps of every row, which the drafter projects into
its context as it would after a cold prefill. The last prompt token always runs again (reuse stops at
len(prompt) - 1): its logits give the first token, so no entry stores logits.

Attention rows can be cut anywhere; a recurrent (Gated DeltaNet) state only at the lengths it was
copied at: the request's stable boundary (the prompt before its generation header, where the next
turn of a chat diverges) and the end of the request. The store belongs to one loaded target (model,
dtype and dequantization are fixed at load), so the key is the token ids plus the taps an entry carries.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from engine.decode.cache_snapshot import (
    CacheSnapshot,
    has_recurrent_layers,
    recurrent_states,
)

log = logging.getLogger("dflash.prefix_cache")
MIN_REUSE_TOKENS = 16  # a shorter shared head (a default system prompt) is not worth restoring
MAX_CHECKPOINTS = 4  # recurrent checkpoints one entry keeps, its longest: a chat's latest turns
DEFAULT_SHARE, DEFAULT_MAX = 0.10, 4 << 30  # the default budget: 10% of RAM, at most 4 GiB


def default_max_bytes() -> int:
    """10% of physical memory, at most 4 GiB (2 GiB where the size cannot be read)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 << 30
    return min(int(ram * DEFAULT_SHARE), DEFAULT_MAX)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # (n,) int32: the tokens whose rows the snapshot holds
    snapshot: CacheSnapshot
    taps: mx.array | None  # (1, n, T*H): target taps of every row, for a DFlash drafter
    tap_layers: tuple[int, ...]  # the target layers `taps` come from; () without taps

    @property
    def nbytes(self) -> int:
        return self.snapshot.nbytes + (0 if self.taps is None else self.taps.nbytes)

    def reusable(self, limit: int) -> int:
        """The longest restorable length <= limit."""
        if not self.snapshot.is_recurrent:
            return min(limit, self.tokens.size)
        return max((n for n in self.snapshot.checkpoints if n <= limit), default=0)

    def extends(self, other: Entry) -> bool:
        """Whether this entry serves every request `other` serves (its tokens a prefix of ours)."""
        carries = other.tap_layers in ((), self.tap_layers)
        return carries and other.tokens.size <= self.tokens.size and common_prefix(self.tokens, other.tokens) == other.tokens.size


@dataclass
class PrefixCacheStats:
    """Counters read by /metrics; written only by the MLX thread."""

    hits: int = 0  # requests that restored a prefix
    misses: int = 0
    reused_tokens: int = 0  # prompt tokens restored instead of prefilled
    evictions: int = 0  # entries dropped for the byte budget
    skipped: int = 0  # entries larger than the whole budget, never stored


class PrefixCache:
    """Entries in least-recently-used order, bounded by bytes on every insert."""

    def __init__(self, max_bytes: int, *, needs_boundaries: bool = True) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.needs_boundaries = needs_boundaries  # a recurrent target checkpoints at the prompt's stable boundary
        self.entries: list[Entry] = []  # oldest first
        self.nbytes = 0  # what the entries hold; an int so /health reads it from another thread
        self.stats = PrefixCacheStats()

    def lease(self, prompt_ids: list[int], boundary: int | None = None) -> PrefixLease:
        return PrefixLease(self, prompt_ids, boundary)

    def lookup(self, prompt_ids: list[int], tap_layers: tuple[int, ...] = ()) -> tuple[Entry, int] | None:
        """The entry and length to restore for a prompt: the longest usable, ties to the most recent."""
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        best: tuple[Entry, int] | None = None
        for entry in reversed(self.entries):
            if tap_layers and entry.tap_layers != tap_layers:
                continue
            n = entry.reusable(min(common_prefix(entry.tokens, prompt), prompt.size - 1))
            if n >= MIN_REUSE_TOKENS and (best is None or n > best[1]):
                best = entry, n
        if best is None:
            self.stats.misses += 1
            return None
        self.entries.remove(best[0])
        self.entries.append(best[0])
        self.stats.hits += 1
        self.stats.reused_tokens += best[1]
        return best

    def insert(self, entry: Entry) -> None:
        """Store an entry, fold entries it extends into it (or it into one that extends it), evict by bytes."""
        if entry.nbytes > self.max_bytes:
            self.stats.skipped += 1
            return
        for old in list(self.entries):
            if old.extends(entry):  # e.g. a regenerated reply equal to the stored one
                old.snapshot.absorb_checkpoints(entry.snapshot, MAX_CHECKPOINTS)
                self.entries.remove(old)
                entry = old
                break
            if entry.extends(old):  # the previous turn of the same chat
                entry.snapshot.absorb_checkpoints(old.snapshot, MAX_CHECKPOINTS)
                self.entries.remove(old)
        self.entries.append(entry)
        self._evict()

    def commit(self, lease: PrefixLease) -> None:
        """Store what a finished request offered (nothing if it never finished its prefill)."""
        if lease.offered is None:
            return
        cache, length = lease.offered
        if CacheSnapshot.estimate_nbytes(cache, length) > self.max_bytes:
            self.stats.skipped += 1
            return
        snapshot = CacheSnapshot.take(cache, length)
        if lease.checkpoint is not None:
            snapshot.checkpoints.update([lease.checkpoint])
        taps = None
        if lease.tap_layers:
            rows = mx.concatenate(lease.taps, axis=1)  # (1, rows, T*H)
            assert rows.shape[1] == length, f"taps of {rows.shape[1]} rows for {length} cached rows"
            taps = mx.array(rows)
            mx.eval(taps)
        tokens = np.asarray(lease.tokens[:length], dtype=np.int32)
        self.insert(Entry(tokens, snapshot, taps, lease.tap_layers))

    def clear(self) -> None:
        self.entries = []
        self.nbytes = 0

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self.entries)
        while total > self.max_bytes:
            total -= self.entries.pop(0).nbytes
            self.stats.evictions += 1
        self.nbytes = total


@dataclass
class Resume:
    """A request's own rows, for the decoder it continues in: the first `length` tokens of its lease."""

    cache: list[Any]  # KVCache per layer holding exactly `length` rows
    taps: mx.array | None  # (1, length, T*H) when it was decoded with taps
    num_cached_tokens: int  # what its first restore took from the prefix cache (its usage keeps saying so)

    @property
    def length(self) -> int:
        return int(self.cache[0].offset)


class PrefixLease:
    """One request's use of the prefix cache, driven by its decoder; the scheduler commits it or drops it.

    restore() fills the decoder's fresh cache; the decoder prefills from num_cached_tokens, stopping at
    `cut` (recurrent targets) so reached() can copy the states there; record() follows the tokens and
    taps of committed rows; offer() hands over the cache when the decoder ends. Only a request that
    finished (stop or length) is committed, so a failed or cancelled one leaves nothing.
    A lease is also how a request moves between decoders (engine/runtime/batch_scheduler.py): a lone
    decoder's offer becomes a batch row's cache, and a row handed back restores its own rows (`resume`)
    instead of looking anything up; with no store (no prefix cache) it only carries caches over.
    """

    def __init__(
        self, store: PrefixCache | None, prompt_ids: list[int], boundary: int | None, *,
        resume: Resume | None = None,
    ) -> None:
        self.store = store  # None: nothing is looked up or committed; the lease only carries a cache over
        self.prompt_ids = prompt_ids
        self.boundary = boundary  # the prompt before its generation header: where the next turn diverges
        self.resume = resume  # restored instead of a lookup: a request moving between decoders
        self.num_cached_tokens = 0 if resume is None else resume.num_cached_tokens
        self.cut: int | None = None  # a prefill chunk ends here and the recurrent states are copied
        self.tap_layers: tuple[int, ...] = ()
        self.tokens: list[int] = list(prompt_ids)  # the prompt, then every emitted token
        self.taps: list[mx.array] = []  # (1, n, T*H) chunks, one row per cached row
        self.checkpoint: tuple[int, list[Any]] | None = None
        self.offered: tuple[list[Any], int] | None = None  # the decoder's cache and its row count

    def restore(self, cache: list[Any], tap_layers: tuple[int, ...] = ()) -> tuple[int, mx.array | None]:
        """Fill `cache` with the longest stored prefix; returns its length and, with tap_layers, its taps."""
        self.tap_layers = tap_layers
        if self.resume is not None:
            return self._restore_resumed(cache, tap_layers)
        hit = None if self.store is None else self.store.lookup(self.prompt_ids, tap_layers)
        taps = None
        if hit is not None:
            entry, n = hit
            entry.snapshot.restore(cache, n, capacity=len(self.prompt_ids))
            taps = entry.taps[:, :n] if tap_layers else None
            self.num_cached_tokens = n
            log.debug("prefix cache hit: %d of %d prompt tokens", n, len(self.prompt_ids))
        b = self.boundary
        if has_recurrent_layers(cache) and b is not None and self.num_cached_tokens < b < len(self.prompt_ids):
            self.cut = b
        return self.num_cached_tokens, taps

    def _restore_resumed(self, cache: list[Any], tap_layers: tuple[int, ...]) -> tuple[int, mx.array | None]:
        """The rows a request already has (engine/decode/batch.py hands a row back): adopted, not copied."""
        resume, self.resume = self.resume, None
        assert resume is not None and len(resume.cache) == len(cache)
        assert not tap_layers or resume.taps is not None, "a resumed DFlash request needs the taps of its rows"
        for c, rows in zip(cache, resume.cache):
            assert type(c) is KVCache and type(rows) is KVCache, "only attention caches move between decoders"
            c.keys, c.values, c.offset = rows.keys, rows.values, rows.offset
        return resume.length, resume.taps if tap_layers else None

    def reached(self, length: int, cache: list[Any]) -> None:
        """A prefill chunk ended at `length` (its cache state evaluated)."""
        if length == self.cut:
            self.checkpoint = (length, recurrent_states(cache))

    def record(self, tokens: list[int], taps: mx.array | None = None) -> None:
        """Tokens emitted, and the taps of rows that entered the cache (prompt rows, accepted blocks)."""
        self.tokens.extend(tokens)
        if taps is not None and self.tap_layers:
            self.taps.append(taps)

    def offer(self, cache: list[Any], length: int) -> None:
        """The decoder ends holding `length` rows: the prompt and the first length - len(prompt) emitted tokens."""
        assert length <= len(self.tokens), f"{length} cached rows but {len(self.tokens)} tokens"
        self.offered = (cache, length)
