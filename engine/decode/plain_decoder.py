"""Plain autoregressive decoding: one target forward per token. The fallback and the baseline."""

from __future__ import annotations

from collections.abc import Generator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from engine.decode.decoder import DecodeStep
from engine.decode.sampling import (
    SamplingParams,
    TokenRng,
    apply_processors,
    make_logits_processors,
    sample,
    to_token_logprobs,
    token_logprobs,
)


class PlainDecoder:
    name = "plain"

    def __init__(self, model: nn.Module, *, prefill_chunk: int = 512) -> None:
        self.model = model
        self.prefill_chunk = prefill_chunk

    def supports(self, params: SamplingParams) -> str | None:
        return None

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, rng: TokenRng
    ) -> Generator[DecodeStep, None, None]:
        if max_tokens <= 0:
            return
        cache = make_prompt_cache(self.model)
        processors = make_logits_processors(params, len(prompt_ids))
        history = mx.array(prompt_ids, dtype=mx.int32)
        prompt = history
        # Empty steps between prefill chunks let the scheduler notice a cancel mid-prefill.
        while prompt.size > 1:
            chunk, prompt = prompt[: self.prefill_chunk], prompt[self.prefill_chunk :]
            if prompt.size == 0:  # keep the last token for the first sampling step
                chunk, prompt = chunk[:-1], chunk[-1:]
            self.model(chunk[None], cache=cache)
            mx.eval([c.state for c in cache])
            yield DecodeStep([], None)

        def forward(token: mx.array, history: mx.array) -> tuple[mx.array, mx.array]:
            raw = self.model(token.reshape(1, -1), cache=cache)[:, -1, :]  # (1, V)
            # logprobs report the raw model distribution, as vLLM does by default
            # the token sampled here takes sequence position history.size (the seeded noise's key)
            return sample(apply_processors(processors, history, raw), params, rng, history.size), raw

        y, logits = forward(prompt, history)
        mx.async_eval(y)
        for n in range(max_tokens):
            history = mx.concatenate([history, y])
            if n + 1 < max_tokens:
                # queue the next forward before the host reads this token (sync elision)
                next_y, next_logits = forward(y, history)
                mx.async_eval(next_y)
            yield DecodeStep([y.item()], self._logprobs(y, logits, params))
            if n + 1 < max_tokens:
                y, logits = next_y, next_logits

    @staticmethod
    def _logprobs(y: mx.array, logits: mx.array, params: SamplingParams) -> list | None:
        if not params.logprobs:
            return None
        chosen, top_ids, top_lp = token_logprobs(logits, y, params.top_logprobs)
        return to_token_logprobs(y.tolist(), chosen.tolist(), top_ids.tolist(), top_lp.tolist())
