"""Batched response generation: the target answers each training prompt through its chat template.

Uses mlx-lm's continuous-batching `BatchGenerator` (right-padded prefill, batched KV cache) and
streams finished sequences into shards, so a run stopped at any point loses only what was in flight.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from engine.train.dataset import MODES, Sample, ShardWriter, finished_jobs, write_manifest
from engine.train import progress_bar
from engine.train.prompts import Prompt

GENERATION_MODES = ("greedy", "sampled", "mixed", "both")


@dataclass(frozen=True)
class GenerationConfig:
    mode: str = "greedy"  # greedy | sampled | mixed (one response, sampled w.p. sample_fraction) | both
    temperature: float = 0.8
    top_p: float = 0.95
    sample_fraction: float = 0.5
    max_new_tokens: int = 512
    max_prompt_tokens: int = 512
    batch_size: int = 256
    prefill_batch_size: int = 32
    shard_size: int = 2048
    seed: int = 0
    time_limit: float | None = None  # seconds; stop taking new prompts after this, then drain

    def __post_init__(self) -> None:
        if self.mode not in GENERATION_MODES:
            raise ValueError(f"mode must be one of {GENERATION_MODES}, got {self.mode!r}")
        if self.temperature <= 0 and self.mode != "greedy":
            raise ValueError("sampled modes need temperature > 0")
        if not 0 <= self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in [0, 1], got {self.sample_fraction}")

    def modes_for(self, key: int) -> tuple[int, ...]:
        if self.mode == "mixed":
            # Bits 20+ of the key, so the choice is independent of the validation split (key % 1000).
            return (1,) if (key >> 20) % 1000 < self.sample_fraction * 1000 else (0,)
        return {"greedy": (0,), "sampled": (1,), "both": (0, 1)}[self.mode]


class Job(NamedTuple):
    prompt_ids: list[int]
    key: int
    mode: int


def plan_jobs(
    prompts: Iterable[Prompt], tokenizer: Any, config: GenerationConfig, done: set[tuple[int, int]]
) -> tuple[list[Job], int]:
    """Jobs still to run (greedy first, then sampled) and the number of prompts skipped as too long.

    Within each mode, windows of 512 jobs are sorted by prompt length so prefill batches pad little.
    """
    jobs: list[Job] = []
    too_long = 0
    for prompt in prompts:
        modes = [m for m in config.modes_for(prompt.key) if (prompt.key, m) not in done]
        if not modes:
            continue
        ids = tokenizer.apply_chat_template(prompt.messages(), add_generation_prompt=True)
        if len(ids) > config.max_prompt_tokens:
            too_long += 1
            continue
        jobs.extend(Job(ids, prompt.key, m) for m in modes)
    ordered: list[Job] = []
    for mode in range(len(MODES)):
        same = [j for j in jobs if j.mode == mode]
        for start in range(0, len(same), 512):
            ordered.extend(sorted(same[start : start + 512], key=lambda j: len(j.prompt_ids)))
    return ordered, too_long


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class ResponseGenerator:
    """Runs jobs through one BatchGenerator, keeping about `batch_size` sequences in flight."""

    def __init__(self, model: nn.Module, eos_token_ids: Iterable[int], config: GenerationConfig) -> None:
        self.config = config
        self.samplers = (greedy, make_sampler(temp=config.temperature, top_p=config.top_p))
        self.batch = BatchGenerator(
            model,
            max_tokens=config.max_new_tokens,
            stop_tokens=[[t] for t in sorted(eos_token_ids)],
            completion_batch_size=config.batch_size,
            prefill_batch_size=config.prefill_batch_size,
        )

    def run(self, jobs: list[Job], writer: ShardWriter) -> dict[str, float]:
        """Generate every job (or until the time limit), handing finished samples to `writer`."""
        cfg = self.config
        queue, active = deque(jobs), {}
        start, new_tokens, done = time.perf_counter(), 0, 0
        bar = progress_bar(total=len(jobs), desc="generate", unit="seq")
        try:
            while queue or active:
                if cfg.time_limit is not None and time.perf_counter() - start > cfg.time_limit:
                    queue.clear()  # drain what is in flight, take nothing new
                self._top_up(queue, active)
                responses = self.batch.next_generated()
                assert responses or not active, "BatchGenerator stalled with sequences in flight"
                for r in responses:
                    job, out = active[r.uid]
                    out.append(r.token)  # an EOS is kept: the draft must learn to propose it
                    if r.finish_reason is not None:
                        del active[r.uid]
                        writer.add(Sample(job.prompt_ids + out, len(job.prompt_ids), job.key, job.mode,
                                          r.finish_reason == "stop"))
                        done += 1
                        bar.update(1)
                new_tokens += len(responses)
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} tok/s")
        finally:
            bar.close()
            writer.flush()
            self.batch.close()
        elapsed = time.perf_counter() - start
        return {"sequences": done, "new_tokens": new_tokens, "seconds": elapsed,
                "tokens_per_second": new_tokens / max(elapsed, 1e-9)}

    def _top_up(self, queue: deque[Job], active: dict[int, tuple[Job, list[int]]]) -> None:
        # A little over one batch in flight: enough to refill freed slots, little to drain at a stop.
        room = self.config.batch_size + self.config.prefill_batch_size - len(active)
        take = [queue.popleft() for _ in range(min(room, len(queue)))]
        if not take:
            return
        uids = self.batch.insert(
            [j.prompt_ids for j in take], samplers=[self.samplers[j.mode] for j in take]
        )
        for uid, job in zip(uids, take):
            active[uid] = (job, [])


def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[Prompt],
    out_dir: Path,
    config: GenerationConfig,
    *,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer `prompts` with the target into shards under `out_dir`; resumes from what is there."""
    out_dir = Path(out_dir)
    done = finished_jobs(out_dir)
    jobs, too_long = plan_jobs(prompts, tokenizer, config, done)
    print(f"generate: {len(jobs)} jobs to run ({len(done)} already on disk, {too_long} prompts too long)")
    mx.random.seed(config.seed + len(done))
    writer = ShardWriter(out_dir, tokenizer.vocab_size, config.shard_size)
    stats = ResponseGenerator(model, tokenizer.eos_token_ids, config).run(jobs, writer) if jobs else {}
    info = {**(meta or {}), "config": asdict(config), "last_run": stats, "prompts_too_long": too_long}
    return write_manifest(out_dir, info)
