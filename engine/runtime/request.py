"""A generation request as the scheduler sees it, and the values it sends back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from engine.decode.sampling import SamplingParams, TokenLogprob


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # cancelled by the client or cut off by shutdown


@dataclass(eq=False)
class Request:
    """Plain state with `num_*` counters; only the scheduler thread mutates it, except `cancelled`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    include_stop_token_ids: bool = False
    num_stable_prompt_tokens: int | None = None  # the prompt before its generation header (chat requests)
    num_cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    output_ids: list[int] = field(default_factory=list)
    num_verify_steps: int = 0
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    num_batched_tokens: int = 0  # produced by batched steps, next to other requests (plain decoding)
    decoder: str = ""
    fallback_reason: str | None = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False  # set from the asyncio side; a plain bool store is atomic under the GIL
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None  # for inter-token latency in /metrics
    constraint: object | None = None  # engine.grammar.constraint.Constraint of a structured-output request

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_completion_tokens,
            verify_steps=self.num_verify_steps,
            drafted_tokens=self.num_drafted_tokens,
            accepted_tokens=self.num_accepted_tokens,
            decoder=self.decoder,
            fallback_reason=self.fallback_reason,
            cached_tokens=self.num_cached_tokens,
            batched_tokens=self.num_batched_tokens,
        )


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    verify_steps: int
    drafted_tokens: int
    accepted_tokens: int
    decoder: str
    fallback_reason: str | None
    cached_tokens: int = 0
    batched_tokens: int = 0


class RequestOutput(NamedTuple):
    """One delta for one request, crossing from the MLX thread to asyncio."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    usage: Usage
