"""Batched response generation: the target answers each training prompt through its chat template.

Jobs are left-padded, prefilled together into a batched KV cache and decoded in lock-step. When a
quarter of the rows have finished, the next jobs are prefilled as a group and joined to the running cache
(`refill`; without it, waves: the next group starts when the whole batch has finished), so the batch
stays nearly full instead of ending each wave with a long tail of few rows. mlx-lm's continuous
BatchGenerator re-pads and copies the whole cache whenever one sequence ends or starts, which on an
H200 ran at 2.8k tok/s at batch 256 against 21k for plain batched decoding.
On CUDA a decoding step's attention goes through the padded block-attention kernel
(engine/backend/attention_kernel.py) where its runtime check adopts it: mx.fast's attention with the
left-padding mask cost 0.99 ms per layer at batch 1024 over 320 keys on an H200, 30 of a 31 ms step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import base as mlx_lm_base
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from engine.backend import attention_kernel
from engine.model import attention
from engine.train import progress_bar
from engine.train.dataset import MODES, Sample, ShardWriter, finished_jobs, write_manifest
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
    batch_size: int = 256  # sequences decoded together
    refill: bool = True  # new jobs join once a quarter of the batch is free; False: waves that drain first
    prefill_chunk: int = 256  # prompt columns per prefill forward
    shard_size: int = 8192
    seed: int = 0
    time_limit: float | None = None  # seconds; no new job is admitted after this

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
    """Jobs still to run and the number of prompts skipped as too long.

    Within each mode, windows of four batches are sorted by prompt length so a prefill pads little; the
    modes' windows alternate, so a run cut short by its time limit still holds both kinds.
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
    window = 4 * config.batch_size
    per_mode = []
    for mode in range(len(MODES)):
        same = [j for j in jobs if j.mode == mode]
        per_mode.append([sorted(same[i : i + window], key=lambda j: len(j.prompt_ids)) for i in range(0, len(same), window)])
    ordered = [job for windows in zip_longest(*per_mode, fillvalue=[]) for chunk in windows for job in chunk]
    return ordered, too_long


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@contextmanager
def padded_decode_attention(model: nn.Module, kernel: attention_kernel.BlockAttentionKernel | None = None
                            ) -> Iterator[bool]:
    """While open, `model`'s one-token steps on a BatchKVCache attend through the padded CUDA kernel
    (key start = cache.left_padding) where the kernel's runtime check adopts it; yields whether it is on.
    Off on the CPU, under DFLASH_ATTENTION=fused/unfused, and for models with no mlx-lm attention."""
    kernel = kernel or attention_kernel.default_kernel()
    original = mlx_lm_base.scaled_dot_product_attention
    # mlx-lm's model modules bind base's function at import and call it with the cache (so its
    # left_padding): swap that name per module; base's own name is not looked up, mx.fast's sees no cache.
    modules = [m for m in {sys.modules[type(layer).__module__] for layer in model.modules()}
               if getattr(m, "scaled_dot_product_attention", None) is original]
    if kernel.kernel is None or attention.mode() != "auto" or not modules:
        yield False
        return

    def hooked(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float,
               mask: mx.array | str | None, sinks: mx.array | None = None) -> mx.array:
        # at one query row the model's mask is exactly `key >= left_padding` (BatchKVCache.make_mask)
        if sinks is None and isinstance(cache, BatchKVCache) and queries.shape[2] == 1:
            if (warps := kernel.padded_warps_for(queries, keys)) is not None:
                return kernel(queries, keys, values, scale, False, warps, start=cache.left_padding)
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    for module in modules:
        module.scaled_dot_product_attention = hooked
    try:
        yield True
    finally:
        for module in modules:
            module.scaled_dot_product_attention = original


class ResponseGenerator:
    """Decodes jobs in lock-step with one left-padded batched KV cache that new jobs keep joining."""

    def __init__(self, model: nn.Module, eos_token_ids: Iterable[int], config: GenerationConfig) -> None:
        if not all(type(c) is KVCache for c in make_prompt_cache(model)):
            raise ValueError("batched generation needs a model with plain KV caches (no sliding or recurrent layers)")
        self.model, self.config = model, config
        self.eos = frozenset(eos_token_ids)
        self.samplers: tuple[Callable[[mx.array], mx.array], ...] = (
            greedy, make_sampler(temp=config.temperature, top_p=config.top_p)
        )
        self.steps = 0  # one-token forwards of the batch (prefill not counted)

    def run(self, jobs: list[Job], writer: ShardWriter) -> dict[str, float]:
        """Generate every job (or those admitted before the time limit), handing finished samples to `writer`."""
        start, new_tokens, done, steps = time.perf_counter(), 0, 0, self.steps
        limit = self.config.time_limit
        bar = progress_bar(total=len(jobs), desc="generate", unit="seq")
        try:
            for index, out, finished in self.stream(jobs, lambda: limit is None or time.perf_counter() - start <= limit):
                job = jobs[index]
                writer.add(Sample(job.prompt_ids + out, len(job.prompt_ids), job.key, job.mode, finished))
                new_tokens += len(out)
                done += 1
                bar.update(1)
                if done % 256 == 0:  # a terminal bar redraws on every postfix; rows finish hundreds a second
                    bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} tok/s")
        finally:
            bar.close()
            writer.flush()
        elapsed = time.perf_counter() - start
        return {"sequences": done, "new_tokens": new_tokens, "seconds": elapsed,
                "tokens_per_second": new_tokens / max(elapsed, 1e-9), "decode_steps": self.steps - steps}

    def decode(self, jobs: list[Job]) -> tuple[list[list[int]], list[bool]]:
        """Each job's response (EOS included when reached) and whether it ended with EOS, in job order."""
        outs: list[list[int]] = [[] for _ in jobs]
        ended = [False] * len(jobs)
        for index, out, finished in self.stream(jobs):
            outs[index], ended[index] = out, finished
        return outs, ended

    def stream(self, jobs: list[Job], admitting: Callable[[], bool] = lambda: True
               ) -> Iterator[tuple[int, list[int], bool]]:
        """(job index, response, ended with EOS) as each row finishes; jobs join while `admitting()` holds."""
        with padded_decode_attention(self.model):
            yield from self._stream(jobs, admitting)

    def _stream(self, jobs: list[Job], admitting: Callable[[], bool]) -> Iterator[tuple[int, list[int], bool]]:
        size, most = self.config.batch_size, self.config.max_new_tokens
        outs: dict[int, list[int]] = {}
        rows: list[int] = []  # the job each batch row decodes
        cache: list[BatchKVCache] = []
        nxt = mx.array([], dtype=mx.int32)  # each row's sampled token, not yet in the cache
        queued = 0  # jobs[:queued] have been admitted
        while True:
            live = [i for i, job in enumerate(rows) if job in outs]
            # Refill once a quarter of the batch is free: the next jobs are prefilled together and joined
            # with one filter + extend of the cache, amortized over the steps until the next join
            # (mlx-lm's BatchGenerator copies the cache at every single admission, hence its 2.8k tok/s).
            # Joining at half instead took more steps than waves in a simulation with 40% of answers
            # capped: rows joined late outlive the rest; a quarter beat waves for every length mix.
            free = size - len(live)
            refill = free >= max(1, size // 4) if self.config.refill else not live
            if queued < len(jobs) and refill and admitting():
                new = list(range(queued, min(len(jobs), queued + free)))
                queued = new[-1] + 1
                cache, nxt = self.join(cache, live, nxt, [jobs[i] for i in new])
                rows = [rows[i] for i in live] + new
                outs.update((i, []) for i in new)
                sampler = self.sampler_for([jobs[job].mode for job in rows])
            elif not live:
                return
            elif len(live) <= len(rows) // 2:
                # compact when half the rows are done: few cache copies, little wasted compute
                keep = mx.array(live, dtype=mx.int32)
                for c in cache:
                    c.filter(keep)
                rows, nxt = [rows[i] for i in live], nxt[keep]
                sampler = self.sampler_for([jobs[job].mode for job in rows])
            y = nxt
            nxt = self.step(cache, y, sampler)
            mx.async_eval(nxt)  # the device runs ahead while the host books this step
            for job, token in zip(rows, y.tolist()):
                if (out := outs.get(job)) is not None:
                    out.append(token)
                    if token in self.eos or len(out) >= most:
                        yield job, outs.pop(job), token in self.eos

    def join(self, cache: list[BatchKVCache], live: list[int], y: mx.array, jobs: list[Job]
             ) -> tuple[list[BatchKVCache], mx.array]:
        """The cache's `live` rows followed by `jobs`' prefilled rows, and each row's next token to feed."""
        new, last = self.prefill([j.prompt_ids for j in jobs])
        first = self.step(new, last, self.sampler_for([j.mode for j in jobs]))
        if not live:
            return new, first
        keep = mx.array(live, dtype=mx.int32)
        for c, n in zip(cache, new):
            c.filter(keep)
            c.extend(n)  # right-aligns both parts at the longer one; left_padding grows by the shift
        return cache, mx.concatenate([y[keep], first])

    def prefill(self, prompts: list[list[int]]) -> tuple[list[BatchKVCache], mx.array]:
        """Left-pad and run all prompts but their last token; returns the cache and the last tokens (b,)."""
        width = max(map(len, prompts))
        padding = [width - len(p) for p in prompts]
        tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts)], dtype=mx.int32)  # (b, P)
        cache = [BatchKVCache(padding) for _ in make_prompt_cache(self.model)]
        for start in range(0, width - 1, self.config.prefill_chunk):
            self.model(tokens[:, start : min(start + self.config.prefill_chunk, width - 1)], cache=cache)
            mx.eval([c.state for c in cache])  # logits of the prompt are never evaluated
        return cache, tokens[:, -1]

    def step(self, cache: list[BatchKVCache], tokens: mx.array, sampler: Callable[[mx.array], mx.array]
             ) -> mx.array:
        """Feed one token per row; the next token of each row (b,)."""
        self.steps += 1
        logits = self.model(tokens[:, None], cache=cache)[:, -1].astype(mx.float32)  # (b, V)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    def sampler_for(self, modes: list[int]) -> Callable[[mx.array], mx.array]:
        """Greedy rows take the argmax and sampled rows the top-p sampler: modes mix in one batch, so one
        running batch and one refill path serve every mode (the sort is skipped when no row samples)."""
        if len(set(modes)) == 1:
            return self.samplers[modes[0]]
        sampled = mx.array(modes, dtype=mx.bool_)
        return lambda logprobs: mx.where(sampled, self.samplers[1](logprobs), greedy(logprobs))


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
