"""OpenAI response, chunk, usage and logprobs objects, built as plain dicts."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.decode.sampling import TokenLogprob
from engine.model.tokenizer import byte_decoder
from engine.runtime.request import FinishReason, Usage


@dataclass(frozen=True)
class Envelope:
    """What every chunk of one response shares."""

    kind: str  # "chat" | "text"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}


def speculative_dict(usage: Usage) -> dict[str, Any]:
    """Our counters, carried in every API's usage object."""
    speculative: dict[str, Any] = {
        "decoder": usage.decoder,
        "verify_steps": usage.verify_steps,
        "drafted_tokens": usage.drafted_tokens,
        "accepted_tokens": usage.accepted_tokens,
    }
    if usage.fallback_reason:
        speculative["fallback_reason"] = usage.fallback_reason
    if usage.batched_tokens:
        speculative["batched_tokens"] = usage.batched_tokens
    return speculative


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": usage.accepted_tokens,
            "rejected_prediction_tokens": usage.drafted_tokens - usage.accepted_tokens,
        },
        "speculative": speculative_dict(usage),
    }


class TokenText:
    """Token strings and bytes for logprobs; byte-level BPE tokens may be partial characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            text = self.tokenizer.decode([token])
            self._cache[token] = (text, list(token_bytes(self.tokenizer, token, text)))
        return self._cache[token]


def token_bytes(tokenizer: Any, token: int, text: str) -> bytes:
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.hf.convert_ids_to_tokens(token)
    decoder = byte_decoder()
    if all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece)
    return text.encode()


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text, raw = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
        ]
    }


def text_logprobs(entries: list[TokenLogprob], text_of: TokenText, offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        text = text_of(e.token)[0]
        tokens.append(text)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text_of(t)[0]: lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def finish_value(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value
