"""A model's body and output head apart, so that a prefill chunk's head runs on its last row only.

A prefill needs logits for its last token alone. Calling the model on a chunk computes the head over
every row (for a 49k vocabulary on a CPU, ~100 ms for 512 rows), so decoders used to run the chunk
without its last token and then the last token alone: a second forward and a second host sync in
every request's time to first token. The split runs the body over the whole chunk and the head over
the last row. It is used only where a probe at load shows that the model's forward is exactly
"body, then head" (no logit scaling or soft-capping after the head); elsewhere decoders keep the
separate last-token forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

_PROBE_IDS = (1, 2, 3)


def output_head(model: nn.Module, body: nn.Module) -> Callable[[mx.array], mx.array]:
    """The LM head: the model's own, a VLM wrapper's (qwen3_5 keeps it on language_model), or the tied embedding."""
    language_model = getattr(model, "language_model", None)
    return getattr(model, "lm_head", None) or getattr(language_model, "lm_head", None) or body.embed_tokens.as_linear


class SplitHead:
    """`last_logits(tokens, cache)` = the model's logits of the chunk's last row, (b, 1, V)."""

    def __init__(self, body: nn.Module, head: Callable[[mx.array], mx.array]) -> None:
        self.body = body
        self.head = head

    def last_logits(self, tokens: mx.array, cache: list[Any] | None) -> mx.array:
        hidden = self.body(tokens, cache=cache)  # (b, L, H), after the final norm
        return self.head(hidden[:, -1:])

    @classmethod
    def probe(cls, model: nn.Module) -> SplitHead | None:
        """The split when the model's forward is its body then its head (checked on 3 tokens), else None.

        Cached on the model: the speculative, plain and batch decoders of one load share it."""
        if "_dflash_split_head" in model.__dict__:
            return model.__dict__["_dflash_split_head"]
        split = cls._find(model)
        model.__dict__["_dflash_split_head"] = split
        return split

    @classmethod
    def _find(cls, model: nn.Module) -> SplitHead | None:
        from engine.model.target import inner_model  # target.py builds on this module

        try:
            body = inner_model(model)
        except ValueError:
            return None
        head = output_head(model, body)
        ids = mx.array([_PROBE_IDS], dtype=mx.int32)
        try:
            whole = model(ids, cache=make_prompt_cache(model))[:, -1:]
            split = cls(body, head)
            part = split.last_logits(ids, make_prompt_cache(model))
        except Exception:  # a body that needs more than tokens and a cache; a broken model fails later, in its own words
            return None
        if whole.shape != part.shape:
            return None
        # the same function up to rounding (a 3-row head against a 1-row one); a soft-cap or a
        # logit scale after the head moves logits by far more than this
        scale = float(mx.max(mx.abs(whole.astype(mx.float32))).item()) or 1.0
        gap = float(mx.max(mx.abs((whole - part).astype(mx.float32))).item())
        return split if gap <= 1e-2 * scale else None
