"""Plain autoregressive decoding: one target forward per token. The fallback and the baseline."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from engine.decode.decoder import DecodeStep
from engine.decode.prefill import prefill
from engine.decode.sampling import (
    SamplingParams,
    TokenRng,
    apply_processors,
    choice_scores,
    fallback_scores,
    make_logits_processors,
    sample,
    to_token_logprobs,
    token_logprobs,
)
from engine.model.split_head import SplitHead

if TYPE_CHECKING:
    from engine.decode.prefix_cache import PrefixLease
    from engine.grammar.constraint import Constraint


class PlainDecoder:
    name = "plain"

    def __init__(self, model: nn.Module, *, prefill_chunk: int = 512) -> None:
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.split = SplitHead.probe(model)

    def supports(self, params: SamplingParams) -> str | None:
        return None

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, rng: TokenRng,
        prefix: PrefixLease | None = None,
        constraint: Constraint | None = None,
    ) -> Generator[DecodeStep, None, None]:
        if max_tokens <= 0:
            return
        if constraint is not None:
            yield from self._constrained(prompt_ids, params, max_tokens, rng, prefix, constraint)
            return
        cache = make_prompt_cache(self.model)
        history = mx.array(prompt_ids, dtype=mx.int32)
        raw = yield from self._prefill(history, cache, prefix)
        processors = make_logits_processors(params, len(prompt_ids))

        def pick(raw: mx.array, history: mx.array) -> tuple[mx.array, mx.array]:
            # logprobs report the raw model distribution, as vLLM does by default
            # the token sampled here takes sequence position history.size (the seeded noise's key)
            return sample(apply_processors(processors, history, raw), params, rng, history.size), raw

        def forward(token: mx.array, history: mx.array) -> tuple[mx.array, mx.array]:
            return pick(self.model(token.reshape(1, -1), cache=cache)[:, -1, :], history)  # (1, V)

        y, logits = pick(raw, history)
        mx.async_eval(y)
        num_rows = len(prompt_ids)  # in the cache: the prompt, then each token fed back
        try:
            for n in range(max_tokens):
                history = mx.concatenate([history, y])
                if n == 0:
                    # the first token goes out before the next forward is launched: on the CPU backend
                    # async_eval runs most of a launched graph before returning (a step in the TTFT)
                    yield self._commit(y, logits, params, prefix)
                if n + 1 < max_tokens:
                    # queue the next forward before the host reads this token (sync elision)
                    next_y, next_logits = forward(y, history)
                    mx.async_eval(next_y)
                    num_rows += 1
                if n > 0:
                    yield self._commit(y, logits, params, prefix)
                if n + 1 < max_tokens:
                    y, logits = next_y, next_logits
        finally:
            if prefix is not None:
                prefix.offer(cache, num_rows)

    def _prefill(self, history: mx.array, cache: list, prefix: PrefixLease | None
                 ) -> Generator[DecodeStep, None, mx.array]:
        """Restore the cached prefix and run the rest of the prompt (engine/decode/prefill.py); returns the
        last row's raw logits (1, V), lazy."""
        num_cached = 0 if prefix is None else prefix.restore(cache)[0]
        split = self.split

        def forward(tokens: mx.array, last: bool) -> tuple[mx.array, None]:
            if last:
                assert split is not None
                return split.last_logits(tokens, cache), None
            return self.model(tokens, cache=cache), None

        raw, _ = yield from prefill(forward, history[None], cache, num_cached, self.prefill_chunk,
                                    split=split is not None, lease=prefix)
        return raw

    def _constrained(
        self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, rng: TokenRng,
        prefix: PrefixLease | None, constraint: Constraint,
    ) -> Generator[DecodeStep, None, None]:
        """Each token is the best allowed one (Constraint.choose): one host sync per token, then the next
        forward is launched with the chosen token before the step is yielded. Ends after EOS."""
        cache = make_prompt_cache(self.model)
        history = mx.array(prompt_ids, dtype=mx.int32)
        raw = yield from self._prefill(history, cache, prefix)
        processors = make_logits_processors(params, len(prompt_ids))

        def pick(raw: mx.array, history: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
            logits = apply_processors(processors, history, raw)
            scores = choice_scores(logits, params, rng, history.size)
            return mx.argmax(scores, axis=-1), scores, logits, raw

        def forward(token: mx.array, history: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
            return pick(self.model(token.reshape(1, -1), cache=cache)[:, -1, :], history)  # (1, V)

        state = constraint.state
        pending = pick(raw, history)
        mx.async_eval(pending[0])
        num_rows = len(prompt_ids)
        try:
            for n in range(max_tokens):
                top, scores, logits, raw = pending
                position = history.size
                fallback = None if params.is_greedy else (lambda: fallback_scores(logits, params, rng, position)[0])
                token, state = constraint.choose(state, int(top.item()), scores[0], fallback)
                constraint.state = state
                y = mx.array([token], dtype=mx.int32)
                history = mx.concatenate([history, y])
                done = constraint.finished(state)
                if n + 1 < max_tokens and not done:
                    pending = forward(y, history)  # queued before the caller's bookkeeping (sync elision)
                    mx.async_eval(pending[0])
                    num_rows += 1
                if prefix is not None:
                    prefix.record([token])
                yield DecodeStep([token], self._logprobs(y, raw, params))
                if done:
                    return
        finally:
            if prefix is not None:
                prefix.offer(cache, num_rows)

    def _commit(self, y: mx.array, logits: mx.array, params: SamplingParams, prefix: PrefixLease | None) -> DecodeStep:
        token = y.item()
        if prefix is not None:
            prefix.record([token])
        return DecodeStep([token], self._logprobs(y, logits, params))

    @staticmethod
    def _logprobs(y: mx.array, logits: mx.array, params: SamplingParams) -> list | None:
        if not params.logprobs:
            return None
        chosen, top_ids, top_lp = token_logprobs(logits, y, params.top_logprobs)
        return to_token_logprobs(y.tolist(), chosen.tolist(), top_ids.tolist(), top_lp.tolist())
