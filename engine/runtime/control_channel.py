"""Rank 0's per-tick control message to the other ranks, broadcast through `all_sum`.

Rank 0 sends the values and every other rank sends zeros, so the sum is rank 0's message on every
backend (ring, JACCL, NCCL, MPI) with no second transport. A fixed int32 header goes every tick; a
payload (a new request's token ids and its settings as JSON bytes) only when the header says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

MAX_IDS = 12  # aborted / finished request ids per tick; more wait for the next tick
HEADER = 8 + 2 * MAX_IDS
SHUTDOWN, IDLE = 1, 2  # flag bits


@dataclass(frozen=True)
class NewRequest:
    """What every rank needs to run a request exactly as rank 0 does (stop strings stay on rank 0)."""

    number: int  # the request's id on every rank, > 0
    prompt_ids: tuple[int, ...]
    settings: dict[str, Any]  # sampling params, max_tokens, the rng seed: JSON round-trips floats exactly


@dataclass(frozen=True)
class Control:
    tick: int
    checksum: int = 0  # rank 0's running hash of committed tokens: a follower that differs has diverged
    new: NewRequest | None = None
    aborts: tuple[int, ...] = ()
    finishes: tuple[int, ...] = ()  # ended on rank 0 (a stop string): followers end them before stepping
    shutdown: bool = False
    idle: bool = False  # nothing to run: followers may sleep before the next tick

    def __post_init__(self) -> None:
        if len(self.aborts) > MAX_IDS or len(self.finishes) > MAX_IDS:
            raise ValueError(f"at most {MAX_IDS} aborts and finishes per tick")


@dataclass
class ControlChannel:
    """One side of the broadcast; `exchange` is a collective, so every rank calls it once per tick."""

    group: mx.distributed.Group

    @property
    def rank(self) -> int:
        return self.group.rank()

    def exchange(self, message: Control | None) -> Control:
        """Rank 0 passes its message and gets it back; the others pass None and get rank 0's."""
        assert (message is not None) == (self.rank == 0), "only rank 0 sends control messages"
        header = np.zeros(HEADER, dtype=np.int32)
        payload = np.zeros(0, dtype=np.int32)
        if message is not None:
            header, payload = encode(message)
        got = self._sum(header)
        n_prompt, n_bytes = int(got[4]), int(got[5])
        if n_prompt or n_bytes:
            size = n_prompt + (n_bytes + 3) // 4
            sent = payload if message is not None else np.zeros(size, dtype=np.int32)
            body = self._sum(sent)
        else:
            body = np.zeros(0, dtype=np.int32)
        return decode(got, body)

    def _sum(self, values: np.ndarray) -> np.ndarray:
        # on the CPU stream: ring and JACCL have no GPU implementation of their collectives
        total = mx.distributed.all_sum(mx.array(values), group=self.group, stream=mx.cpu)
        mx.eval(total)
        return np.array(total, dtype=np.int32)


def encode(message: Control) -> tuple[np.ndarray, np.ndarray]:
    header = np.zeros(HEADER, dtype=np.int32)
    flags = (SHUTDOWN if message.shutdown else 0) | (IDLE if message.idle else 0)
    payload = np.zeros(0, dtype=np.int32)
    header[:3] = message.tick, flags, message.checksum
    if message.new is not None:
        blob = json.dumps(message.new.settings, sort_keys=True).encode()
        padded = np.frombuffer(blob + b"\0" * (-len(blob) % 4), dtype=np.int32)
        payload = np.concatenate([np.array(message.new.prompt_ids, dtype=np.int32), padded])
        header[3:6] = message.new.number, len(message.new.prompt_ids), len(blob)
    header[6:8] = len(message.aborts), len(message.finishes)
    header[8 : 8 + len(message.aborts)] = message.aborts
    header[8 + MAX_IDS : 8 + MAX_IDS + len(message.finishes)] = message.finishes
    return header, payload


def decode(header: np.ndarray, payload: np.ndarray) -> Control:
    tick, flags, checksum, number, n_prompt, n_bytes, n_aborts, n_finishes = (int(v) for v in header[:8])
    new = None
    if number:
        blob = payload[n_prompt:].tobytes()[:n_bytes]
        new = NewRequest(number, tuple(int(t) for t in payload[:n_prompt]), json.loads(blob))
    return Control(
        tick=tick,
        checksum=checksum,
        new=new,
        aborts=tuple(int(v) for v in header[8 : 8 + n_aborts]),
        finishes=tuple(int(v) for v in header[8 + MAX_IDS : 8 + MAX_IDS + n_finishes]),
        shutdown=bool(flags & SHUTDOWN),
        idle=bool(flags & IDLE),
    )
