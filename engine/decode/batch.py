"""Continuous batching of plain decoding: every running request's next token from one target forward.

Rows live in one left-padded, right-aligned cache per layer (mlx-lm's BatchKVCache: a shared write
index, per-row left padding, a (B, 1, 1, S) mask and per-row RoPE offsets). A request joins with its
own cache, prefilled alone (the prefix cache still serves it) or handed over by the decoder it ran
in alone; its first token is already out. It leaves by a filter of the batch's rows between steps.

A step feeds each row's latest token and samples the next one per row (its own parameters, seed,
penalties and logit_bias), then reads the tokens the previous step launched: one host sync per step,
with the next forward queued before it (sync elision, as PlainDecoder does). The price is one wasted
row of compute when a row ends. Rows that may go back to a DFlash drafter keep their target taps,
so a lone row can resume speculative decoding without running the target again (take_out).

Numerics: a row's prefill and first token are computed exactly as alone (same shapes); batched steps
are B-row matmuls, and MKL rounds a row of a B-row product differently from a 1-row one (up to ~5e-5
on random float32 products here), so greedy rows can part from their solo output at near-ties only.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from engine.decode.decoder import DecodeStep
from engine.decode.prefill import prefill
from engine.decode.prefix_cache import PrefixLease, Resume
from engine.decode.sampling import (
    LogitsProcessor,
    SamplingParams,
    TokenRng,
    apply_processors,
    make_logits_processors,
    sample,
    to_token_logprobs,
    token_logprobs,
)
from engine.model import rope_table
from engine.model.split_head import SplitHead
from engine.model.target import Target

Logprobs = tuple[mx.array, mx.array, mx.array]  # chosen (1,), top ids (1, k), top logprobs (1, k)


class StepCache(BatchKVCache):
    """mlx-lm's BatchKVCache whose per-row offsets a step advances once for all layers (`advance`).

    mlx-lm adds the fed length to each layer's offset array inside its attention: one add kernel a
    layer, 30 of a 428-kernel batched step of the 135M model on the H200. Every layer rotates at the
    offsets from before the step, so one shared add after the forward gives each the same values."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        offset = self.offset
        out = super().update_and_fetch(keys, values)
        self.offset = offset  # the add built above is dropped unevaluated
        return out


def advance(cache: list[StepCache], length: int) -> None:
    """After a step's forward over `length` new rows: one offset array for every layer."""
    offset = cache[0].offset + length
    for c in cache:
        c.offset = offset


@dataclass(eq=False)
class Row:
    """One request's decoding state in the batch. Its lease holds its tokens (prompt, then every token
    produced) and, when `wants_taps`, the taps of every row in its cache."""

    params: SamplingParams
    rng: TokenRng
    lease: PrefixLease
    num_prompt_tokens: int  # of the request's prompt: presence and frequency penalties count what follows
    wants_taps: bool = False
    processors: list[LogitsProcessor] = field(default_factory=list)
    history: mx.array | None = None  # (n,) prompt + produced, for the processors; None without them
    position: int = 0  # sequence position of the token the next step samples
    unread: bool = False  # its latest token was launched by the last step and not read yet
    logprobs: Logprobs | None = None  # of that unread token, when requested
    failed: BaseException | None = None  # building its sampling graph raised: the scheduler ends it
    gone: bool = False  # left; dropped from the cache before the next step
    prefilled: int = 0  # prompt tokens its prefill has run so far (restored ones not counted)
    own_cache: list[Any] | None = None  # its cache until it joins
    first: mx.array | None = None  # (1,) its latest token until it joins

    def __post_init__(self) -> None:
        self.processors = make_logits_processors(self.params, self.num_prompt_tokens)

    @property
    def num_tokens(self) -> int:
        """Prompt and produced tokens read so far."""
        return len(self.lease.tokens)


@dataclass
class BatchStats:
    steps: int = 0  # batched forwards
    tokens: int = 0  # tokens they read out (a row's first token comes from its prefill, not counted)
    rows: list[int] = field(default_factory=list)  # rows per step, newest last (bounded)


class BatchDecoder:
    """The batch's rows, their shared cache and the step that decodes them together."""

    MAX_HISTORY = 4096  # rows-per-step samples kept for tests and the bench

    def __init__(self, model: nn.Module, *, target: Target | None = None, prefill_chunk: int = 512) -> None:
        self.model = model
        self.target = target  # the speculative decoder's: its taps feed a drafter when a row goes back to it
        self.prefill_chunk = prefill_chunk
        self.split = SplitHead.probe(model)  # the same model as the target's, so the same answer
        self.rows: list[Row] = []
        self.cache: list[StepCache] | None = None
        self.tokens: mx.array | None = None  # (B,) int32: each row's latest token, which the next step feeds
        self.stats = BatchStats()

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """None when `model` can decode in a batch, else why not."""
        kinds = sorted({type(c).__name__ for c in make_prompt_cache(model) if type(c) is not KVCache})
        if kinds:
            return f"its {', '.join(kinds)} caches do not batch yet: one request at a time"
        return None

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return () if self.target is None else self.target.layer_ids

    def make_row(self, params: SamplingParams, rng: TokenRng, lease: PrefixLease, num_prompt_tokens: int,
                 *, wants_taps: bool) -> Row:
        return Row(params, rng, lease, num_prompt_tokens, wants_taps=wants_taps and bool(self.tap_layers))

    # --- joining -------------------------------------------------------------------------
    def prefill(self, row: Row, prompt_ids: list[int]) -> Generator[DecodeStep, None, None]:
        """The row's prompt alone, as its solo decoder would run it: the prefix cache, then chunks of
        `prefill_chunk` (an empty step after each but the last, so a cancel is noticed), the last
        chunk's head on its last row, whose logits give the first token (or, where the head cannot be
        split off, the last token alone). Yields the first token last; join() then takes the row in."""
        cache = make_prompt_cache(self.model)
        num_cached, cached_taps = row.lease.restore(cache, self.tap_layers if row.wants_taps else ())
        ids = mx.array(prompt_ids, dtype=mx.int32)[None]  # (1, P)
        end = len(prompt_ids)

        def forward(tokens: mx.array, last: bool) -> tuple[mx.array, mx.array | None]:
            return self._forward(tokens, cache, row.wants_taps, last=last)

        def fed(rows: int) -> None:
            row.prefilled += rows

        last, chunk_taps = yield from prefill(forward, ids, cache, num_cached, self.prefill_chunk,
                                              split=self.split is not None, lease=row.lease, fed=fed)
        taps = ([] if cached_taps is None else [cached_taps]) + chunk_taps
        row.history = ids[0] if row.processors else None  # what the cache holds; a step appends what it feeds
        row.position = end
        first, logprobs = self._sample_row(row, last)
        mx.eval(first, *(logprobs or ()))
        token = int(first.item())
        row.lease.record([token], mx.concatenate(taps, axis=1) if taps else None)
        row.own_cache, row.first, row.position = cache, first, row.num_tokens
        yield DecodeStep([token], self._to_list(token, logprobs))

    def prefill_and_join(self, row: Row, prompt_ids: list[int]) -> DecodeStep:
        """The row's whole prefill at once, then its join; returns its first token's step. For callers
        that need no interleaving (load-time warm-ups, benches, tests); the scheduler steps prefill()."""
        *_, first = self.prefill(row, prompt_ids)
        self.join(row)
        return first

    def adopt(self, row: Row, cache: list[Any], length: int) -> None:
        """A request leaving its solo decoder: its cache of `length` rows, whatever that decoder fed of
        its last token trimmed away, so the next step feeds it as any row's latest token."""
        keep = row.num_tokens - 1  # the prompt and every produced token but the last
        assert keep <= length, f"{length} cached rows, {keep} expected"
        for c in cache:
            c.trim(length - keep)
        if row.wants_taps:
            taps = mx.concatenate(row.lease.taps, axis=1)
            assert taps.shape[1] == keep, f"taps of {taps.shape[1]} rows for {keep} cached rows"
        row.history = mx.array(row.lease.tokens[:-1], dtype=mx.int32) if row.processors else None
        row.position = row.num_tokens
        row.own_cache, row.first = cache, mx.array(row.lease.tokens[-1:], dtype=mx.int32)

    def join(self, row: Row) -> None:
        """Append a prefilled or adopted row: its cache right-aligned with the batch's (one copy)."""
        assert row.own_cache is not None and row.first is not None
        self._compact()
        new = [StepCache.merge([c]) for c in row.own_cache]
        if self.cache is None:
            self.cache, self.tokens = new, row.first
        else:
            for c, n in zip(self.cache, new):
                c.extend(n)  # pads both to the longer one; the new row's left padding grows by the shift
            self.tokens = mx.concatenate([self.tokens, row.first])
        row.own_cache = row.first = None
        row.unread, row.logprobs = False, None
        self.rows.append(row)

    # --- leaving -------------------------------------------------------------------------
    def leave(self, row: Row) -> None:
        """Drop a row (finished, cancelled, failed or handed back): it is gone from the next step on.

        Rows leaving at the same step go in one filter of the cache (a copy of the rows kept)."""
        row.gone = True
        if not self.num_rows:
            self._compact()  # the last one: free the cache now

    @property
    def num_rows(self) -> int:
        return sum(not r.gone for r in self.rows)

    def _compact(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.tokens = None
            return
        index = mx.array(keep, dtype=mx.int32)
        for c in self.cache:
            c.filter(index)  # also drops the left padding every remaining row has
        self.tokens = self.tokens[index]

    def row_cache(self, row: Row, length: int | None = None) -> list[KVCache]:
        """Views of the row's first `length` cached rows (default: all) as plain caches."""
        i = self.rows.index(row)
        pad = int(self.cache[0].left_padding[i].item())
        length = self.cache[0]._idx - pad if length is None else length
        views = []
        for c in self.cache:
            kv = KVCache()
            kv.keys, kv.values = c.keys[i : i + 1, :, pad : pad + length], c.values[i : i + 1, :, pad : pad + length]
            kv.offset = length
            views.append(kv)
        return views

    def take_out(self, row: Row) -> Resume:
        """The row's rows for the decoder it goes back to: the prompt and every produced token but the
        last (what the last step fed of it is dropped), private copies, and their taps."""
        keep = row.num_tokens - 1
        cache = self.row_cache(row, keep)
        for kv in cache:
            kv.keys, kv.values = mx.contiguous(kv.keys), mx.contiguous(kv.values)
        taps = None
        if row.wants_taps:
            taps = mx.concatenate(row.lease.taps, axis=1)[:, :keep]
        mx.eval([kv.state for kv in cache], taps)
        self.leave(row)
        return Resume(cache, taps, row.lease.num_cached_tokens)

    # --- the step ------------------------------------------------------------------------
    def forward_rows(self, taps: bool = False) -> tuple[mx.array, mx.array | None]:
        """The step's forward, lazily: every row's latest token, (B, 1, V) logits and its taps where asked.
        The caches take the rows and their offsets advance once for every layer (StepCache)."""
        with rope_table.positions_below(self.cache[0]._idx + 1):
            out = self._forward(self.tokens[:, None], self.cache, taps)
        advance(self.cache, 1)
        return out

    def step(self) -> list[tuple[Row, DecodeStep]]:
        """Launch the next forward for every row, then read what the previous step launched.

        Returns the rows whose token was read, with it; a row that joined since returns nothing
        (its first token went out with its prefill).
        """
        self._compact()
        rows, y = self.rows, self.tokens
        if not rows:
            return []
        logits, taps = self.forward_rows(any(r.wants_taps for r in rows))
        raw = logits[:, -1]  # (B, V)
        for i, row in enumerate(rows):
            if row.history is not None:
                row.history = mx.concatenate([row.history, y[i : i + 1]])
        nxt, logprobs = self._sample(raw)
        mx.async_eval(nxt, [lp for lp in logprobs if lp is not None])
        values = y.tolist()  # the one sync: the previous step's tokens
        out = []
        for i, row in enumerate(rows):
            if row.wants_taps:
                row.lease.record([], taps[i : i + 1])  # the row it fed now
            if row.unread:
                token = values[i]
                row.lease.record([token])
                out.append((row, DecodeStep([token], self._to_list(token, row.logprobs))))
            row.unread, row.logprobs = True, logprobs[i]
            row.position += 1
        self.tokens = nxt
        self.stats.steps += 1
        self.stats.tokens += len(out)
        self.stats.rows = [*self.stats.rows[-self.MAX_HISTORY + 1 :], len(rows)]
        return out

    def _forward(self, tokens: mx.array, cache: list[Any], taps: bool, last: bool = False
                 ) -> tuple[mx.array, mx.array | None]:
        """Logits (1, L, V), or (1, 1, V) of the last row with `last`, and the rows' taps where asked."""
        if self.target is not None:
            return self.target(tokens, cache, taps=taps, last=last)
        if last:
            assert self.split is not None
            return self.split.last_logits(tokens, cache), None
        return self.model(tokens, cache=cache), None

    def _sample(self, raw: mx.array) -> tuple[mx.array, list[Logprobs | None]]:
        """Each row's next token (B,) int32 by its own parameters, and its logprobs where requested."""
        greedy = mx.argmax(raw, axis=-1).astype(mx.int32)  # rows without processors or sampling share it
        parts: list[mx.array | None] = []
        logprobs: list[Logprobs | None] = []
        for i, row in enumerate(self.rows):
            token = None
            try:
                if row.processors or not row.params.is_greedy:
                    token = self._sample_row(row, raw[i : i + 1])[0]
                lp = None
                if row.params.logprobs:
                    chosen = greedy[i : i + 1] if token is None else token
                    lp = token_logprobs(raw[i : i + 1], chosen, row.params.top_logprobs)
            except Exception as e:  # a row's own settings must not stop the others: it is ended after the step
                row.failed, token, lp = e, None, None
            parts.append(token)
            logprobs.append(lp)
        if all(p is None for p in parts):
            return greedy, logprobs
        return mx.concatenate([greedy[i : i + 1] if p is None else p for i, p in enumerate(parts)]), logprobs

    def _sample_row(self, row: Row, raw: mx.array) -> tuple[mx.array, Logprobs | None]:
        """One row's token (1,) from its raw logits (1, V), at its position (the seeded noise's key)."""
        logits = apply_processors(row.processors, row.history, raw) if row.processors else raw
        token = sample(logits, row.params, row.rng, row.position).astype(mx.int32)
        lp = token_logprobs(raw, token, row.params.top_logprobs) if row.params.logprobs else None
        return token, lp

    @staticmethod
    def _to_list(token: int, logprobs: Logprobs | None) -> list | None:
        if logprobs is None:
            return None
        chosen, top_ids, top_lp = (x.tolist() for x in logprobs)
        return to_token_logprobs([token], chosen, top_ids, top_lp)
