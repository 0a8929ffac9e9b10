"""Acceptance of a trained draft, measured with the server's own SpeculativeDecoder.

Greedy by default; with a temperature, sampled through position-keyed (Gumbel) or rejection sampling.

τ (mean acceptance length) = (Σ accepted + #cycles) / #cycles over verify cycles, bonus included;
per block position we report how often that draft token was accepted when it was drafted.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.decode.decoder import Decoder
from engine.decode.sampling import SamplingParams, TokenRng
from engine.train import progress_bar
from engine.train.prompts import Prompt


@dataclass
class DomainResult:
    domain: str
    prompts: int = 0
    cycles: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0
    drafted_by_position: list[int] = field(default_factory=list)  # cycles that drafted position i
    accepted_by_position: list[int] = field(default_factory=list)  # cycles that accepted it

    @property
    def acceptance_length(self) -> float:
        return (self.accepted + self.cycles) / max(self.cycles, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / max(d, 1) for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def record(self, drafted: int, accepted: int) -> None:
        grow = drafted - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        self.cycles += 1
        self.accepted += accepted
        for i in range(drafted):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < accepted

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "acceptance_length": self.acceptance_length,
            "acceptance_by_position": self.acceptance_by_position,
            "tokens_per_second": self.tokens_per_second,
        }


GREEDY = SamplingParams(temperature=0.0)


def run_prompt(
    decoder: Decoder, prompt_ids: list[int], eos: frozenset[int], max_tokens: int, result: DomainResult,
    params: SamplingParams = GREEDY, rng: TokenRng | None = None, depth: int | None = None,
) -> list[int]:
    """Decode one prompt to EOS or max_tokens, recording every verify cycle (trees: to `depth` positions)."""
    depth = depth or max_tokens
    out: list[int] = []
    steps = decoder.generate(prompt_ids, params, max_tokens, rng or TokenRng(0))
    try:
        for step in steps:
            if step.drafted:  # a tree's nodes span at most its depth: columns are depths reached
                result.record(min(step.drafted, depth), step.accepted)
            stop = next((i for i, t in enumerate(step.tokens) if t in eos), None)
            out.extend(step.tokens if stop is None else step.tokens[: stop + 1])
            if stop is not None:
                break
    finally:
        steps.close()
    return out


def interleave(prompts: dict[str, list[Prompt]]) -> list[tuple[str, Prompt]]:
    """Round-robin over domains, so a run cut short by its time limit still covers each one."""
    longest = max((len(p) for p in prompts.values()), default=0)
    return [(d, ps[i]) for i in range(longest) for d, ps in prompts.items() if i < len(ps)]


def evaluate_domains(
    decoder: Decoder,
    tokenizer: Any,
    prompts: dict[str, list[Prompt]],
    max_tokens: int,
    *,
    time_limit: float | None = None,
    params: SamplingParams = GREEDY,
    by_position: bool = True,
) -> list[DomainResult]:
    """by_position: sampled runs use position-keyed noise (else rejection sampling); each prompt has its
    own seed (its index), so two runs of one setting draw the same noise."""
    if getattr(decoder, "adaptive", False):
        raise ValueError("acceptance is measured at a fixed verify width: build the decoder with adaptive=False")
    results = {domain: DomainResult(domain) for domain in prompts}
    depth = getattr(decoder, "block_size", max_tokens + 1) - 1
    order = interleave(prompts)
    start = time.perf_counter()
    bar = progress_bar(total=len(order), desc="eval", unit="prompt")
    try:
        for index, (domain, prompt) in enumerate(order):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
            result = results[domain]
            ids = tokenizer.apply_chat_template(prompt.messages(), add_generation_prompt=True)
            clock = time.perf_counter()
            rng = TokenRng(index, by_position=by_position)
            out = run_prompt(decoder, ids, tokenizer.eos_token_ids, max_tokens, result, params, rng, depth)
            result.tokens += len(out)
            result.seconds += time.perf_counter() - clock
            result.prompts += 1
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{r.domain} {r.acceptance_length:.2f}" for r in results.values()))
    finally:
        bar.close()
    return list(results.values())


def format_table(results: list[DomainResult]) -> str:
    """Mean acceptance length per domain, then acceptance % per block position (1 = first draft)."""
    width = max((len(r.drafted_by_position) for r in results), default=0)
    head = f"{'domain':<8}{'prompts':>8}{'cycles':>8}{'tau':>7}{'tok/s':>8}  " + "".join(
        f"{i + 1:>4}" for i in range(width)
    )
    lines = [head, "-" * len(head)]
    for r in results:
        rates = "".join(f"{100 * a:>4.0f}" for a in r.acceptance_by_position)
        lines.append(
            f"{r.domain:<8}{r.prompts:>8}{r.cycles:>8}{r.acceptance_length:>7.2f}{r.tokens_per_second:>8.0f}  {rates}"
        )
    lines.append("per-position columns: % of cycles whose draft token at that block position was accepted")
    return "\n".join(lines)


def write_results(path: Path, results: list[DomainResult], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "domains": {r.domain: r.to_dict() for r in results}}
    path.write_text(json.dumps(payload, indent=1))
