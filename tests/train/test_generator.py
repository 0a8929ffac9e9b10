"""The response generator's running batch: refill joins, per-row modes, forward steps, time limit, resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache
from tiny_models import build_target, plain_greedy, target_config

from engine.model.tokenizer import Tokenizer
from engine.train import generator as generator_module
from engine.train.dataset import finished_jobs, read_shard, shard_paths
from engine.train.generator import GenerationConfig, Job, ResponseGenerator, generate_responses
from engine.train.prompts import Prompt

VOCAB = 96


def mixed_jobs(n: int, seed: int, modes: tuple[int, ...] = (0,)) -> list[Job]:
    """Prompts of 3..14 tokens (rows differ in left padding; every prefill is wider than one column)."""
    rng = np.random.default_rng(seed)
    return [Job(rng.integers(0, VOCAB - 1, size=int(rng.integers(3, 15))).tolist(), i, modes[i % len(modes)])
            for i in range(n)]


def cut_at_eos(ref: list[int], eos: set[int]) -> list[int]:
    cut = next((i for i, t in enumerate(ref) if t in eos), None)
    return ref if cut is None else ref[: cut + 1]


@pytest.fixture
def joins(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows in the running cache at each BatchKVCache.extend (one entry per layer per join)."""
    seen: list[int] = []
    extend = BatchKVCache.extend

    def spy(self: BatchKVCache, other: BatchKVCache) -> None:
        seen.append(self.offset.shape[0])
        extend(self, other)

    monkeypatch.setattr(BatchKVCache, "extend", spy)
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_refill_matches_one_sequence_at_a_time(family: str, joins: list[int]) -> None:
    """Rows end at different steps and new jobs join the running cache (different prompt widths, so
    extend shifts one side's left padding): every greedy answer is still the one-at-a-time answer."""
    model = build_target(target_config(family, vocab_size=VOCAB))
    jobs = mixed_jobs(23, seed=1)
    refs = [plain_greedy(model, j.prompt_ids, 16)[0] for j in jobs]
    eos = {refs[0][2], refs[3][6], refs[5][10], refs[9][4]}
    generator = ResponseGenerator(model, eos, GenerationConfig(max_new_tokens=16, batch_size=6, prefill_chunk=4))
    outs, ended = generator.decode(jobs)
    assert outs == [cut_at_eos(ref, eos) for ref in refs]
    assert ended == [cut_at_eos(ref, eos)[-1] in eos for ref in refs]
    assert 3 <= sum(ended) < len(jobs) and len({len(o) for o in outs}) >= 3  # rows end at several steps
    assert joins and min(joins) >= 1  # refills joined rows still decoding


def count_decode_calls(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch rows of each one-token forward of `model` (the prefill's chunks are wider here)."""
    calls: list[int] = []
    call = type(model).__call__

    def counted(self: Any, inputs: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if inputs.shape[1] == 1:
            calls.append(inputs.shape[0])
        return call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", counted)
    return calls


def test_refill_takes_fewer_forward_steps_than_waves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same jobs, same answers; refill's batches stay fuller, so fewer one-token forwards (125 for
    5 waves of 8 rows here, each as long as its longest answer, against 110 with refill)."""
    model = build_target(target_config("llama", vocab_size=VOCAB))
    jobs = mixed_jobs(40, seed=2)
    refs = [plain_greedy(model, j.prompt_ids, 24)[0] for j in jobs]
    eos = {t for t, _ in Counter(t for ref in refs for t in ref).most_common(4)}  # this model repeats tokens
    assert len({len(cut_at_eos(ref, eos)) for ref in refs}) >= 5  # answer lengths spread from 1 to 24
    calls = count_decode_calls(model, monkeypatch)
    answers, steps = [], []
    for refill in (False, True):
        calls.clear()
        config = GenerationConfig(max_new_tokens=24, batch_size=8, prefill_chunk=64, refill=refill)
        generator = ResponseGenerator(model, eos, config)
        answers.append(generator.decode(jobs)[0])
        steps.append(len(calls))
        assert generator.steps == len(calls) and max(calls) <= 8
    assert answers[0] == answers[1] == [cut_at_eos(ref, eos) for ref in refs]
    waves, refill = steps
    assert refill < waves, steps


def test_sampled_rows_mix_with_greedy_rows_and_follow_the_seed(joins: list[int]) -> None:
    """Greedy and sampled jobs share one running batch: greedy rows keep their one-at-a-time answers,
    sampled rows give valid tokens, and a seed fixes the whole run."""
    model = build_target(target_config("qwen3", vocab_size=VOCAB))
    jobs = mixed_jobs(17, seed=3, modes=(0, 1, 1))
    config = GenerationConfig(mode="both", max_new_tokens=12, batch_size=5, prefill_chunk=4, temperature=1.0, top_p=0.9)

    def run(seed: int) -> list[list[int]]:
        mx.random.seed(seed)
        return ResponseGenerator(model, {7}, config).decode(jobs)[0]

    first, again, other = run(0), run(0), run(1)
    assert first == again and first != other
    for job, out in zip(jobs, first):
        assert 1 <= len(out) <= 12 and all(0 <= t < VOCAB for t in out)
        if job.mode == 0:
            assert out == cut_at_eos(plain_greedy(model, job.prompt_ids, 12)[0], {7})
    sampled = [out for job, out in zip(jobs, first) if job.mode == 1]
    greedy_again = [plain_greedy(model, j.prompt_ids, 12)[0] for j in jobs if j.mode == 1]
    assert sampled != [cut_at_eos(g, {7}) for g in greedy_again]  # sampled rows really sample
    assert joins


def test_no_job_is_admitted_after_the_limit_and_a_rerun_finishes_the_rest(
        tmp_path: Path, gguf_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first admission is inside the limit, the next is not: that batch's rows run to the end and
    are written; a rerun without a limit answers only the jobs left, with the same greedy answers."""
    from tests.conftest import tiny_llama

    class Clock:  # one second per reading: start, then the first admission check, then past the limit
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            cls.now += 1.0
            return cls.now

    model = tiny_llama(gguf_tokenizer.vocab_size)
    prompts = [Prompt(f"p{i}", f"Tell me about {i}" + " please" * (i % 4)) for i in range(11)]
    config = GenerationConfig(max_new_tokens=5, batch_size=4, prefill_chunk=8, time_limit=1.5)
    monkeypatch.setattr(generator_module, "time", Clock)
    cut = generate_responses(model, gguf_tokenizer, prompts, tmp_path / "cut", config)
    monkeypatch.undo()
    assert cut["last_run"]["sequences"] == 4 and len(finished_jobs(tmp_path / "cut")) == 4
    rest = generate_responses(model, gguf_tokenizer, prompts, tmp_path / "cut", GenerationConfig(
        max_new_tokens=5, batch_size=4, prefill_chunk=8))
    assert rest["last_run"]["sequences"] == 7 and rest["totals"]["sequences"] == 11
    whole = generate_responses(model, gguf_tokenizer, prompts, tmp_path / "whole", GenerationConfig(
        max_new_tokens=5, batch_size=4, prefill_chunk=8))

    def answers(out: Path) -> dict[int, list[int]]:
        return {s.key: s.tokens for p in shard_paths(out) for s in read_shard(p)}

    assert whole["last_run"]["sequences"] == 11 and answers(tmp_path / "cut") == answers(tmp_path / "whole")
    again = generate_responses(model, gguf_tokenizer, prompts, tmp_path / "whole", config)
    assert again["last_run"] == {}
