"""Sampling parameters, the truncated target distribution, per-request RNG and logprobs.

Plain decoding and speculative acceptance share `filter_logprobs`, so the draft's q and the
target's p are truncated the same way and speculative sampling stays exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import mlx.core as mx

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (token history, logits) -> logits

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None  # a structured-output spec (engine/grammar/constraint.py): output must match it

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_processors(self) -> bool:
        """Penalties and biases depend on the token history, which a draft block does not see."""
        return bool(
            self.presence_penalty or self.frequency_penalty
            or self.repetition_penalty != 1.0 or self.logit_bias
        )


class TokenLogprob(NamedTuple):
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob) best first; empty unless requested


@dataclass
class TokenRng:
    """A request's randomness.

    Position-keyed (`by_position`, the default with a seed): the token at sequence position i is
    argmax(log q_i + g(seed, i)) with Gumbel noise g that depends on the seed and i only. That is an
    exact sample of q_i, and it is the same token whoever proposed it or how many random numbers
    anything else drew, so speculative decoding verifies a sampled block by equality, as in greedy
    decoding, and a seeded request returns the same text with or without the draft.
    Otherwise (the default without a seed) a split key stream for rejection sampling, which kept
    more drafts at temperature 1.0: mean tau 2.01 against 1.85 (docs/architecture.md).
    """

    seed: int | None = None
    by_position: bool | None = None  # None: position-keyed exactly when seeded
    _key: mx.array = field(init=False, repr=False)
    _seed_hash: int = field(init=False, repr=False)
    _noise: tuple[int, mx.array] | None = field(default=None, init=False, repr=False)  # (first position, rows)

    def __post_init__(self) -> None:
        if self.by_position is None:
            self.by_position = self.seed is not None
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        seed %= 1 << 64
        self._key = mx.random.key(seed % (1 << 63))
        self._seed_hash = _hash32_int(seed & 0xFFFFFFFF ^ _hash32_int((seed >> 32) ^ 0x5BD1E995))

    def next_key(self) -> mx.array:
        self._key, sub = mx.random.split(self._key)
        return sub

    def gumbel(self, first: int, rows: int, vocab: int) -> mx.array:
        """(rows, vocab) float32 Gumbel noise for sequence positions first..first+rows-1, lazily.

        The last block's noise is kept: a drafter and the verify forward after it ask for the same rows.
        """
        if self._noise is not None and self._noise[0] == first and self._noise[1].shape[0] >= rows \
                and self._noise[1].shape[1] == vocab:
            return self._noise[1][:rows]
        noise = position_gumbel(self._seed_hash, first, rows, vocab)
        self._noise = (first, noise)
        return noise


_M1, _M2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9  # lowbias32's multipliers; 2^32 / phi


def _hash32_int(x: int) -> int:
    """lowbias32 (a 32-bit integer mixer), on the host."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = x * _M1 & 0xFFFFFFFF
    x ^= x >> 15
    x = x * _M2 & 0xFFFFFFFF
    return x ^ (x >> 16)


def _hash32(x: mx.array) -> mx.array:
    """lowbias32 over a uint32 array: integer ops, so every backend gives the same bits."""
    x = x ^ (x >> 16)
    x = x * _M1
    x = x ^ (x >> 15)
    x = x * _M2
    return x ^ (x >> 16)


def position_gumbel(seed_hash: int, first: int, rows: int, vocab: int) -> mx.array:
    """Gumbel(0, 1) noise g[r, v] = G(hash(seed, first + r, v)): (rows, vocab) float32."""
    positions = mx.arange(first, first + rows, dtype=mx.uint32)
    row_keys = _hash32(mx.array(seed_hash, dtype=mx.uint32) ^ _hash32(positions * _GOLDEN))  # (rows,)
    bits = _hash32(row_keys[:, None] ^ _hash32(mx.arange(vocab, dtype=mx.uint32) + _GOLDEN))  # (rows, V)
    uniform = ((bits >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))  # 24 bits, open interval (0, 1)
    return -mx.log(-mx.log(uniform))


def filter_logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Log-probabilities of the distribution we sample from: temperature, then top-k, top-p, min-p.

    logits: (..., V). Returns (..., V) float32 with -inf outside the kept set, normalised.
    Undefined for temperature 0 (greedy uses argmax on the raw logits).
    """
    x = logits.astype(mx.float32) / params.temperature
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(x, axis=-1)[..., vocab - params.top_k : vocab - params.top_k + 1]
        x = mx.where(x < kth, -mx.inf, x)
    if params.top_p < 1.0:
        sorted_x = mx.sort(x, axis=-1)  # ascending
        sorted_p = mx.exp(sorted_x)
        # mass strictly above each sorted entry; keep the smallest top set reaching top_p
        mass_above = mx.cumsum(sorted_p, axis=-1, reverse=True, inclusive=False)
        num_dropped = (mass_above >= params.top_p).sum(axis=-1, keepdims=True)
        num_dropped = mx.minimum(num_dropped, vocab - 1)
        threshold = mx.take_along_axis(sorted_x, num_dropped, axis=-1)
        x = mx.where(x < threshold, -mx.inf, x)
    if params.min_p > 0.0:
        top = mx.max(x, axis=-1, keepdims=True)
        x = mx.where(x < top + math.log(params.min_p), -mx.inf, x)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def sample(logits: mx.array, params: SamplingParams, rng: TokenRng, position: int) -> mx.array:
    """logits: (N, V), row r choosing the token at sequence position `position + r` -> (N,) ids, lazily."""
    if params.is_greedy:
        return mx.argmax(logits, axis=-1)
    logprobs = filter_logprobs(logits, params)
    if rng.by_position:
        return mx.argmax(logprobs + rng.gumbel(position, *logprobs.shape), axis=-1)
    return mx.random.categorical(logprobs, axis=-1, key=rng.next_key())


def choice_scores(logits: mx.array, params: SamplingParams, rng: TokenRng, position: int) -> mx.array:
    """(N, V) scores whose row argmax is the token chosen at positions position..position+N-1: the logits for
    greedy, else log q + the position's Gumbel noise (position-keyed sampling, as constrained decoding uses:
    the argmax over any allowed subset is then an exact sample of q restricted to it)."""
    if params.is_greedy:
        return logits
    assert rng.by_position, "constrained sampling draws position-keyed noise"
    logprobs = filter_logprobs(logits, params)
    return logprobs + rng.gumbel(position, *logprobs.shape)


def fallback_scores(logits: mx.array, params: SamplingParams, rng: TokenRng, position: int) -> mx.array:
    """choice_scores without top-k / top-p / min-p (when they leave no allowed token): temperature only."""
    return logits.astype(mx.float32) / params.temperature + rng.gumbel(position, *logits.shape)


def make_logits_processors(params: SamplingParams, num_prompt_tokens: int) -> list[LogitsProcessor]:
    """Processors see the whole history (prompt + output) as a 1-D int array.

    Presence and frequency penalties count output tokens only (OpenAI, vLLM); the repetition
    penalty looks at prompt and output (HF, vLLM).
    """
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        ids = mx.array([t for t, _ in params.logit_bias])
        bias = mx.array([b for _, b in params.logit_bias], dtype=mx.float32)
        processors.append(lambda _, logits: logits.at[..., ids].add(bias))
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty

        def repetition(history: mx.array, logits: mx.array) -> mx.array:
            if history.size == 0:
                return logits
            seen = logits[..., history]
            logits[..., history] = mx.where(seen < 0, seen * penalty, seen / penalty)
            return logits

        processors.append(repetition)
    if params.presence_penalty:
        presence = params.presence_penalty

        def presence_fn(history: mx.array, logits: mx.array) -> mx.array:
            output = history[num_prompt_tokens:]
            if output.size:
                logits[..., output] = logits[..., output] - presence
            return logits

        processors.append(presence_fn)
    if params.frequency_penalty:
        frequency = params.frequency_penalty

        def frequency_fn(history: mx.array, logits: mx.array) -> mx.array:
            output = history[num_prompt_tokens:]
            return logits.at[..., output].subtract(frequency) if output.size else logits

        processors.append(frequency_fn)
    return processors


def apply_processors(
    processors: list[LogitsProcessor], history: mx.array, logits: mx.array
) -> mx.array:
    for process in processors:
        logits = process(history, logits)
    return logits


def token_logprobs(
    logits: mx.array, tokens: mx.array, num_top: int
) -> tuple[mx.array, mx.array, mx.array]:
    """Raw model logprobs (before temperature and truncation, as vLLM reports them).

    logits: (N, V), tokens: (N,). Returns chosen (N,), top ids (N, k), top logprobs (N, k).
    """
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    if num_top == 0:
        empty = mx.zeros((logits.shape[0], 0))
        return chosen, empty.astype(mx.int32), empty
    top_ids = mx.argsort(-logprobs, axis=-1)[:, :num_top]
    return chosen, top_ids, mx.take_along_axis(logprobs, top_ids, axis=-1)


LOGPROB_FLOOR = -9999.0  # OpenAI's value for an impossible token: JSON has no -inf or NaN


def finite_logprob(logprob: float) -> float:
    # extreme penalties (repetition_penalty 1e-300) overflow the logits to inf, and logsumexp to NaN
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def to_token_logprobs(
    tokens: list[int], chosen: list[float], top_ids: list[list[int]], top_lp: list[list[float]]
) -> list[TokenLogprob]:
    return [
        TokenLogprob(t, finite_logprob(c), tuple((i, finite_logprob(lp)) for i, lp in zip(ids, lps)))
        for t, c, ids, lps in zip(tokens, chosen, top_ids, top_lp)
    ]
