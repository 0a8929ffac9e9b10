"""Generated training sequences: compact .npz shards on disk, and the batches the trainer draws.

A shard holds N sequences as one flat token array plus offsets; `response_start` marks where
the target's answer begins (the loss mask), `key` ties each sequence to its prompt and `mode`
says how it was decoded, so a re-run can skip what a previous run finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

MODES = ("greedy", "sampled")
SHARD_GLOB = "shard-*.npz"


class Sample(NamedTuple):
    tokens: list[int]  # prompt (chat template applied) + response
    response_start: int
    key: int  # Prompt.key
    mode: int  # index into MODES
    finished: bool  # the response ended with an EOS token (not cut by max_new_tokens)


class BlockBatch(NamedTuple):
    """One training step's input, host side. S = padded length, N = blocks per sequence."""

    tokens: np.ndarray  # (b, S) int32, right-padded with 0
    lengths: np.ndarray  # (b,) int32
    response_start: np.ndarray  # (b,) int32
    anchors: np.ndarray  # (b, N) int32 block start positions; 0 where invalid
    block_valid: np.ndarray  # (b, N) bool

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def write_shard(path: Path, samples: list[Sample], vocab_size: int) -> None:
    """Atomic: a shard file either exists whole or not at all."""
    lengths = np.array([len(s.tokens) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.fromiter(
        (t for s in samples for t in s.tokens), dtype=token_dtype(vocab_size), count=int(offsets[-1])
    )
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            tokens=tokens,
            offsets=offsets,
            response_start=np.array([s.response_start for s in samples], dtype=np.int32),
            key=np.array([s.key for s in samples], dtype=np.int64),
            mode=np.array([s.mode for s in samples], dtype=np.int8),
            finished=np.array([s.finished for s in samples], dtype=bool),
        )
    os.replace(tmp, path)


def read_shard(path: Path) -> list[Sample]:
    with np.load(path) as z:
        tokens, offsets = z["tokens"].astype(np.int64), z["offsets"]
        fields = zip(z["response_start"], z["key"], z["mode"], z["finished"])
        return [
            Sample(tokens[offsets[i] : offsets[i + 1]].tolist(), int(rs), int(k), int(m), bool(f))
            for i, (rs, k, m, f) in enumerate(fields)
        ]


def shard_paths(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob(SHARD_GLOB))


def finished_jobs(directory: Path) -> set[tuple[int, int]]:
    """(prompt key, mode) of every sequence already on disk."""
    done: set[tuple[int, int]] = set()
    for path in shard_paths(directory):
        with np.load(path) as z:
            done.update(zip(z["key"].tolist(), z["mode"].tolist()))
    return done


class ShardWriter:
    """Buffers finished samples and writes a shard every `shard_size` of them."""

    def __init__(self, directory: Path, vocab_size: int, shard_size: int = 2048) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.shard_size = shard_size
        self.buffer: list[Sample] = []
        existing = [int(p.stem.split("-")[1]) for p in shard_paths(self.directory)]
        self.next_index = max(existing, default=-1) + 1

    def add(self, sample: Sample) -> None:
        self.buffer.append(sample)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        write_shard(self.directory / f"shard-{self.next_index:05d}.npz", self.buffer, self.vocab_size)
        self.next_index += 1
        self.buffer = []


def write_manifest(directory: Path, meta: dict) -> dict:
    """Summarise the shards on disk (counts per mode, token totals) next to `meta`."""
    shards = []
    for path in shard_paths(directory):
        with np.load(path) as z:
            lengths = np.diff(z["offsets"])
            shards.append({
                "name": path.name,
                "sequences": len(lengths),
                "tokens": int(lengths.sum()),
                "response_tokens": int((lengths - z["response_start"]).sum()),
                "greedy": int((z["mode"] == 0).sum()),
                "finished": int(z["finished"].sum()),
            })
    totals = {k: sum(s[k] for s in shards) for k in ("sequences", "tokens", "response_tokens", "greedy", "finished")}
    manifest = {**meta, "totals": totals, "shards": shards}
    tmp = Path(directory) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(directory) / "manifest.json")
    return manifest


class TokenDataset:
    """All shards of a directory in memory, as one flat array (a few tens of MB at most)."""

    def __init__(self, samples: Iterable[Sample], *, max_len: int, min_response: int = 2) -> None:
        kept = [s for s in samples if len(s.tokens) - s.response_start >= min_response]
        kept = [s for s in kept if s.response_start + min_response <= max_len]
        self.lengths = np.array([min(len(s.tokens), max_len) for s in kept], dtype=np.int32)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.tokens = np.fromiter(
            (t for s, n in zip(kept, self.lengths) for t in s.tokens[:n]), dtype=np.int32, count=int(self.offsets[-1])
        )
        self.response_start = np.array([s.response_start for s in kept], dtype=np.int32)
        self.keys = np.array([s.key for s in kept], dtype=np.int64)
        self.modes = np.array([s.mode for s in kept], dtype=np.int8)

    @classmethod
    def from_dir(cls, directory: Path, *, max_len: int, modes: tuple[str, ...] = MODES) -> TokenDataset:
        paths = shard_paths(directory)
        if not paths:
            raise FileNotFoundError(f"no {SHARD_GLOB} in {directory}; run `python -m engine.train generate` first")
        wanted = {MODES.index(m) for m in modes}
        samples = [s for p in paths for s in read_shard(p) if s.mode in wanted]
        return cls(samples, max_len=max_len)

    def __len__(self) -> int:
        return len(self.lengths)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def answer_token_counts(self, indices: np.ndarray, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the answers (not the prompts) of these sequences."""
        parts = [self.tokens[self.offsets[i] + self.response_start[i] : self.offsets[i + 1]] for i in indices]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return np.bincount(flat, minlength=vocab_size)[:vocab_size]

    def split(self, permille: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) indices, by prompt key so both modes of a prompt stay together."""
        val = (self.keys % 1000) < permille
        return np.flatnonzero(~val), np.flatnonzero(val)

    def epoch_batches(
        self, indices: np.ndarray, batch_tokens: int, rng: np.random.Generator, *, pad_to: int = 64
    ) -> list[np.ndarray]:
        """Shuffled batches of similar length, each with b * padded_len <= batch_tokens.

        Sorting within windows of 64 batches' worth of sequences keeps padding small while the
        batch contents still change from epoch to epoch.
        """
        order = rng.permutation(indices)
        window = max(1, 64 * batch_tokens // max(1, int(self.lengths.mean() if len(self) else 1)))
        batches: list[np.ndarray] = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(self._pack(chunk, batch_tokens, pad_to))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _pack(self, sorted_idx: np.ndarray, batch_tokens: int, pad_to: int) -> list[np.ndarray]:
        batches, current = [], []
        for i in sorted_idx:
            padded = -(-int(self.lengths[i]) // pad_to) * pad_to
            if current and (len(current) + 1) * padded > batch_tokens:
                batches.append(np.array(current))
                current = []
            current.append(i)
        if current:
            batches.append(np.array(current))
        return batches

    def block_batch(
        self, indices: np.ndarray, num_blocks: int, rng: np.random.Generator, *, pad_to: int = 64
    ) -> BlockBatch:
        lengths = self.lengths[indices]
        width = -(-int(lengths.max()) // pad_to) * pad_to
        tokens = np.zeros((len(indices), width), dtype=np.int32)
        for row, i in enumerate(indices):
            tokens[row, : lengths[row]] = self.sequence(i)
        starts = self.response_start[indices]
        anchors, valid = sample_anchors(starts, lengths, num_blocks, rng)
        return BlockBatch(tokens, lengths, starts, anchors, valid)


def sample_anchors(
    response_start: np.ndarray, lengths: np.ndarray, num_blocks: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct random block anchors per sequence, on response tokens that have a successor.

    At inference a block always starts at a generated token (never inside the prompt), and a block
    needs at least one label, so anchors lie in [response_start, length - 2].
    Returns anchors (b, N) int32 sorted per row (0 where padded) and valid (b, N) bool; N shrinks
    to the most blocks any row can hold, so a batch of short answers carries no all-padding columns.
    """
    b = len(lengths)
    counts = [min(num_blocks, max(0, int(lengths[r]) - 1 - int(response_start[r]))) for r in range(b)]
    width = max(1, max(counts, default=0))
    anchors = np.zeros((b, width), dtype=np.int32)
    valid = np.zeros((b, width), dtype=bool)
    for row, n in enumerate(counts):
        lo, hi = int(response_start[row]), int(lengths[row]) - 1  # candidates: [lo, hi)
        if n:
            anchors[row, :n] = np.sort(rng.choice(np.arange(lo, hi), size=n, replace=False))
            valid[row, :n] = True
    return anchors, valid
