"""A prompt's prefill: the rest of the prompt through the target in chunks, the first token's logits last.

Plain, speculative and batched decoding all prefill this way; they differ only in the forward they pass
(with or without the draft's taps) and in what they note per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from engine.decode.decoder import DecodeStep

if TYPE_CHECKING:
    from engine.decode.prefix_cache import PrefixLease

# (tokens (1, n), whether the chunk ends the prompt) -> (logits (1, n or 1, V), taps (1, n, T*H) or None), lazy.
# For the chunk that ends the prompt a forward may run its head on the last row only (engine/model/split_head.py).
Forward = Callable[[mx.array, bool], tuple[mx.array, mx.array | None]]


def prefill_spans(start: int, stop: int, chunk: int, cut: int | None = None) -> list[tuple[int, int]]:
    """Chunks [start, stop) of at most `chunk` tokens; one ends exactly at `cut` when it lies inside."""
    ends = list(range(start + chunk, stop, chunk)) + ([stop] if stop > start else [])
    if cut is not None and start < cut < stop and cut not in ends:
        ends = sorted([*ends, cut])
    return list(zip([start, *ends[:-1]], ends))


def prefill(
    forward: Forward,
    ids: mx.array,
    cache: list[Any],
    start: int,
    chunk: int,
    *,
    split: bool,
    lease: PrefixLease | None = None,
    fed: Callable[[int], None] | None = None,
) -> Generator[DecodeStep, None, tuple[mx.array, list[mx.array]]]:
    """Run ids[:, start:] (1, P) into `cache`, which holds the first `start` rows; returns the last row's
    logits (1, V), lazy, and the chunks' taps in order.

    With `split` the last chunk ends at the prompt's end and its logits are the first token's: one
    forward and, with the first token, one sync fewer. Else (a model whose head cannot be split off) the
    last token runs alone after the chunks. With a prefix `lease`, a chunk ends at its cut (a recurrent
    checkpoint) and the lease hears of every chunk but the last (`reached`); `fed(rows)` follows every
    forward. An empty step after every chunk but the last lets the scheduler notice a cancel mid-prefill.
    """
    end = ids.shape[1]
    taps: list[mx.array] = []
    logits = None
    cut = None if lease is None else lease.cut
    for lo, hi in prefill_spans(start, end if split else end - 1, chunk, cut):
        logits, chunk_taps = forward(ids[:, lo:hi], hi == end)
        taps += [] if chunk_taps is None else [chunk_taps]
        if fed is not None:
            fed(hi - lo)
        if hi == end:
            break  # its logits are read with the first token: one sync for both
        mx.eval([c.state for c in cache], taps[-1:])  # bound the graph per chunk
        if lease is not None:
            lease.reached(hi, cache)
        yield DecodeStep([], None)
    if not split:
        logits, last_taps = forward(ids[:, end - 1 :], False)
        taps += [] if last_taps is None else [last_taps]
        if fed is not None:
            fed(1)
    assert logits is not None, f"nothing to prefill: the cache held {start} of the prompt's {end} rows"
    return logits[:, -1], taps
