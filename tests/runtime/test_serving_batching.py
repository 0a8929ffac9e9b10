"""The served embedded model with its shipped draft: concurrent requests return their solo output.

Alone, a greedy request decodes speculatively (the shipped DFlash draft, adaptive width); together,
requests decode in batched plain steps (4- and 8-row products). Each request's output must equal its
solo output token for token, or part from it only at a near-tie: a batched row's attention rounds
differently from a lone row's in the last bits (and in float32, MKL's products too), which the
quantized CPU kernel's activation codes can carry to ~1e-4 of a logit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import pytest

from engine.decode.sampling import SamplingParams
from engine.decode.verify_width import CostCurve
from engine.runtime.async_engine import AsyncEngine
from engine.runtime.batch_scheduler import BatchScheduler
from engine.runtime.config import EngineConfig
from engine.runtime.cost_cache import CACHE_ENV as COST_CACHE_ENV
from engine.runtime.request import FinishReason, Request
from engine.runtime.serving_model import ServingModel

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Repeat after me: one two three, one two three, one two three.",
    "Explain photosynthesis to a child.",
    "List three prime numbers.",
    "Write a haiku about the sea.",
    "Why is the sky blue? Answer in two sentences.",
]
GREEDY = SamplingParams(temperature=0.0)
PENALISED = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
CANCELLED = 3  # this request's client leaves after 4 tokens
NEAR_TIE = 0.02  # logits this close may swap order under rounding; a wrong row or cache is far from it


@pytest.fixture(scope="module")
def served() -> ServingModel:
    model = ServingModel.load(EngineConfig(max_batch=8))
    assert model.batch is not None and model.speculative is not None and model.batching == "up to 8 requests"
    return model


def requests(served: ServingModel, n: int, params: dict[int, SamplingParams], tag: str) -> list[Request]:
    """Mixed prompt lengths and max_tokens (16 to 40)."""
    tokenizer = served.tokenizer
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    return [Request(f"{tag}{i}", ids[i], params.get(i, GREEDY), 16 + (i * 9) % 25) for i in range(n)]


async def collect(engine: AsyncEngine, request: Request, leave_after: int | None = None) -> tuple[list[int], Any]:
    tokens, last = [], None
    stream = engine.submit(request)
    async for out in stream:
        tokens += out.token_ids
        last = out
        if leave_after is not None and len(tokens) >= leave_after:
            await stream.aclose()  # what a client disconnect does
            break
    return tokens, last


def run_all(served: ServingModel, reqs: list[Request], together: bool, leave: dict[int, int] | None = None
            ) -> tuple[list[tuple[list[int], Any]], AsyncEngine]:
    leave = leave or {}

    async def main() -> tuple[list[tuple[list[int], Any]], AsyncEngine]:
        engine = AsyncEngine(lambda: served, max_waiting=16)
        await engine.start()
        try:
            if together:
                outs = await asyncio.gather(*(collect(engine, r, leave.get(i)) for i, r in enumerate(reqs)))
            else:
                outs = [await collect(engine, r) for r in reqs]
            return list(outs), engine
        finally:
            await engine.stop()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def solo(served: ServingModel) -> list[tuple[list[int], Any]]:
    outs, _ = run_all(served, requests(served, 8, {1: PENALISED}, "solo"), together=False)
    assert outs[0][1].usage.decoder == "speculative-dflash" and outs[1][1].usage.decoder == "plain"
    return outs


def parts_at_a_near_tie(served: ServingModel, prompt: list[int], want: list[int], got: list[int]) -> bool:
    """Whether two greedy outputs first differ where the target's logits for both tokens are a near-tie."""
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if at is None:
        return len(want) == len(got)
    logits = served.plain.model(mx.array([prompt + want[:at]]))[0, -1]
    gap = abs(logits[want[at]] - logits[got[at]]).item()
    print(f"parted at token {at} of {len(want)}: logit gap {gap:.2e}")
    return gap < NEAR_TIE


@pytest.mark.parametrize("n", [4, 8])
def test_concurrent_greedy_requests_equal_their_solo_output(served: ServingModel, solo: list, n: int) -> None:
    reqs = requests(served, n, {1: PENALISED}, f"b{n}-")
    outs, engine = run_all(served, reqs, together=True, leave={CANCELLED: 4})
    assert isinstance(engine.scheduler, BatchScheduler)
    for i, ((got, last), (want, _)) in enumerate(zip(outs, solo)):
        if i == CANCELLED:
            assert got == want[: len(got)] and len(got) >= 4
            assert reqs[i].finish_reason is FinishReason.ABORT
        elif i == 1:  # penalised: its logits are not the model's alone
            assert got == want, f"request {i}: batched output differs from its solo output"
        else:
            assert got == want or parts_at_a_near_tie(served, reqs[i].prompt_ids, want, got), \
                f"request {i}: batched output differs from its solo output away from a near-tie"
    assert sum(last.usage.batched_tokens for _, last in outs) > 0
    assert outs[1][1].usage.batched_tokens > 0  # the penalised request decoded in the batch
    assert engine.scheduler.stats.batch_size.snapshot().count > 0


def test_seeded_sampled_requests_return_their_solo_text(served: ServingModel) -> None:
    seeded = {i: SamplingParams(temperature=0.8, top_p=0.95, seed=40 + i) for i in range(4)}
    want, _ = run_all(served, requests(served, 4, seeded, "ss"), together=False)
    got, _ = run_all(served, requests(served, 4, seeded, "sb"), together=True)
    text = served.tokenizer.decode
    assert [text(t) for t, _ in got] == [text(t) for t, _ in want]
    assert all(last.usage.batched_tokens > 0 for _, last in got[1:])


def test_no_verify_kernel_is_decided_inside_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded GGUF kept quantized (float16 scales, float32 norms, so float32 activations) on a
    stand-in GPU kernel: every decision is made at load, none by solo, speculative or batched requests."""
    from engine.backend import verify_matmul as vm

    def exact(x: Any, w: Any, s: Any, b: Any, spec: vm.QuantSpec, bucket: int, tiling: vm.Tiling) -> Any:
        return vm.reference_qmm(x, w, s, b, spec.group_size, spec.bits)

    def timer(fn: Any) -> float:  # injected: a kernel always wins, so every decision is a real check
        return {"bucket_reference": 1.0, "one_row_reference": 0.3}.get(fn.__name__, 0.5)

    verify = vm.VerifyMatmul(backend="cuda", kernel=exact, enabled=True, timer=timer)
    checked: list[tuple[vm.QuantSpec, int]] = []
    check = verify._check
    monkeypatch.setattr(verify, "_check", lambda spec, bucket: checked.append((spec, bucket)) or check(spec, bucket))
    monkeypatch.setattr(vm, "_DEFAULT", verify)

    def one_forward(cls: type, forward: Callable[[int], None], max_rows: int, **_: Any) -> CostCurve:
        forward(max_rows)  # the widest shape still runs (its kernels decided); timing every width would take
        return CostCurve.linear(0.05, 0.002, max_rows)  # minutes on the reference kernel

    monkeypatch.setattr(CostCurve, "measure", classmethod(one_forward))
    monkeypatch.setenv(COST_CACHE_ENV, "off")  # a made-up curve must not be kept for later loads
    served = ServingModel.load(EngineConfig(max_batch=4, dequantize="no"))
    assert served.batch is not None and served.speculative is not None
    assert served.speculative.cost_curve is not None  # warmed up at load, not in the first request
    at_load = len(checked)
    assert at_load and {spec.x_dtype for spec, _ in checked} == {mx.float32}
    run_all(served, requests(served, 2, {1: PENALISED}, "solo"), together=False)
    outs, _ = run_all(served, requests(served, 4, {1: PENALISED}, "kb"), together=True)
    assert sum(last.usage.batched_tokens for _, last in outs) > 0
    assert len(checked) == at_load
