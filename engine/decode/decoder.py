"""The contract between the scheduler and a decoding strategy (plain or speculative)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, NamedTuple, Protocol

from engine.decode.sampling import SamplingParams, TokenLogprob, TokenRng

if TYPE_CHECKING:
    from engine.decode.prefix_cache import PrefixLease


class DecodeStep(NamedTuple):
    """What one decoding step commits: one token for plain decoding, a+1 for a speculative cycle."""

    tokens: list[int]
    logprobs: list[TokenLogprob] | None  # one per token, only when requested
    drafted: int = 0  # draft tokens proposed for verification in this step
    accepted: int = 0  # of those, how many the target accepted
    accepted_positions: tuple[int, ...] = ()  # draft indices (0-based) that were accepted


class Decoder(Protocol):
    """Turns a prompt into a stream of committed tokens.

    The generator stops by itself after `max_tokens` tokens; the caller closes it early on
    EOS, stop strings or cancellation, so cleanup belongs in a `finally`.
    Each step must launch the device work of the next step before yielding (sync elision),
    so that the caller's host bookkeeping overlaps with it. With a `prefix` lease the decoder
    restores the longest cached prefix of the prompt, prefills the rest, and offers its cache
    when it ends (engine/decode/prefix_cache.py).
    """

    name: str

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        rng: TokenRng,
        prefix: PrefixLease | None = None,
    ) -> Generator[DecodeStep, None, None]: ...

    def supports(self, params: SamplingParams) -> str | None:
        """None when this decoder honours `params` exactly, else the reason it cannot."""
        ...
