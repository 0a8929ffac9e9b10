"""Scheduler and async engine with scripted decoders: FIFO, EOS, limits, cancel, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator

import pytest

from engine.decode.decoder import DecodeStep
from engine.decode.sampling import SamplingParams, TokenRng
from engine.runtime.async_engine import AsyncEngine, EngineDead
from engine.runtime.request import FinishReason, Request
from engine.runtime.scheduler import EngineBusy
from engine.runtime.serving_model import ServingModel

EOS = 0


class CharTokenizer:
    """id n -> chr(ord('a') + n - 1); id 0 is EOS."""

    eos_token_ids = frozenset({EOS})

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


class ScriptedDecoder:
    """Yields the prompt's tokens back in blocks, optionally slowly or failing."""

    def __init__(self, name: str = "plain", block: int = 1, delay: float = 0.0, fail_at: int | None = None,
                 refuse: str | None = None) -> None:
        self.name, self.block, self.delay, self.fail_at, self.refuse = name, block, delay, fail_at, refuse
        self.closed = 0
        self.started: list[list[int]] = []

    def supports(self, params: SamplingParams) -> str | None:
        return self.refuse

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 rng: TokenRng) -> Generator[DecodeStep, None, None]:
        self.started.append(prompt_ids)
        try:
            produced = 0
            script = prompt_ids * 100
            while produced < max_tokens:
                if self.fail_at is not None and produced >= self.fail_at:
                    raise RuntimeError("boom")
                time.sleep(self.delay)
                n = min(self.block, max_tokens - produced)
                tokens = script[produced : produced + n]
                produced += n
                drafted = self.block - 1 if self.name != "plain" else 0
                yield DecodeStep(tokens, None, drafted, max(n - 1, 0), tuple(range(max(n - 1, 0))))
        finally:
            self.closed += 1


def engine_with(plain: ScriptedDecoder, spec: ScriptedDecoder | None = None, max_waiting: int = 8) -> AsyncEngine:
    model = ServingModel(model_id="m", tokenizer=CharTokenizer(), context_length=1000, plain=plain,
                         speculative=spec, drafter="none", backend="test", description="test")
    return AsyncEngine(lambda: model, max_waiting=max_waiting)


def req(prompt: list[int], max_tokens: int = 5, stop: tuple[str, ...] = (), rid: str = "r") -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0), max_tokens, stop)


async def drain(engine: AsyncEngine, request: Request) -> tuple[str, FinishReason | None, int]:
    text, last = "", None
    async for out in engine.submit(request):
        text += out.text
        last = out
    return text, last.finish_reason, last.usage.completion_tokens


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_length_eos_and_stop() -> None:
    async def main() -> None:
        engine = engine_with(ScriptedDecoder())
        await engine.start()
        assert await drain(engine, req([1, 2, 3], 5)) == ("abcab", FinishReason.LENGTH, 5)
        assert await drain(engine, req([1, 2, EOS, 3], 9, rid="e")) == ("ab", FinishReason.STOP, 2)
        assert await drain(engine, req([1, 2, 3], 9, stop=("ca",), rid="s")) == ("ab", FinishReason.STOP, 4)
        await engine.stop()

    run(main())


def test_speculative_counters_and_block_truncation() -> None:
    async def main() -> None:
        spec = ScriptedDecoder("dflash", block=4)
        engine = engine_with(ScriptedDecoder(), spec)
        await engine.start()
        text, reason, n = "", None, 0
        async for out in engine.submit(req([1, 2, 3], 6)):
            text += out.text
            usage, reason = out.usage, out.finish_reason
        assert text == "abcabc" and reason is FinishReason.LENGTH
        assert usage.decoder == "dflash" and usage.verify_steps == 2
        assert usage.drafted_tokens == 6 and usage.accepted_tokens == 3 + 1
        await engine.stop()

    run(main())


def test_fallback_reason_is_reported() -> None:
    async def main() -> None:
        engine = engine_with(ScriptedDecoder(), ScriptedDecoder("dflash", 4, refuse="penalties"))
        await engine.start()
        last = None
        async for out in engine.submit(req([1], 2)):
            last = out
        assert last.usage.decoder == "plain" and last.usage.fallback_reason == "penalties"
        await engine.stop()

    run(main())


def test_fifo_order() -> None:
    async def main() -> None:
        plain = ScriptedDecoder(delay=0.01)
        engine = engine_with(plain)
        await engine.start()
        results = await asyncio.gather(*(drain(engine, req([i], 3, rid=str(i))) for i in range(1, 5)))
        assert [r[0] for r in results] == ["aaa", "bbb", "ccc", "ddd"]
        assert plain.started == [[1], [2], [3], [4]]
        await engine.stop()

    run(main())


def test_cancel_frees_engine_within_a_step() -> None:
    async def main() -> None:
        plain = ScriptedDecoder(delay=0.02)
        engine = engine_with(plain)
        await engine.start()
        stream = engine.submit(req([1], 10_000))
        await stream.__anext__()
        await stream.aclose()  # what a disconnect does
        t0 = time.monotonic()
        while plain.closed == 0 and time.monotonic() - t0 < 2:
            await asyncio.sleep(0.01)
        assert plain.closed == 1 and time.monotonic() - t0 < 0.5
        assert await drain(engine, req([2], 2, rid="next")) == ("bb", FinishReason.LENGTH, 2)
        await engine.stop()

    run(main())


def test_full_queue_is_busy() -> None:
    async def main() -> None:
        engine = engine_with(ScriptedDecoder(delay=0.05), max_waiting=1)
        await engine.start()
        first = engine.submit(req([1], 50, rid="a"))
        await first.__anext__()  # running, so the waiting queue is empty
        second = engine.submit(req([1], 5, rid="b"))
        with pytest.raises(EngineBusy):
            engine.submit(req([1], 5, rid="c"))
        await first.aclose()
        assert len([o async for o in second]) > 0
        await engine.stop()

    run(main())


def test_request_failure_does_not_stop_server() -> None:
    async def main() -> None:
        engine = engine_with(ScriptedDecoder(fail_at=2))
        await engine.start()
        with pytest.raises(RuntimeError, match="boom"):
            await drain(engine, req([1], 5))
        assert engine.is_alive
        assert await drain(engine, req([1], 2, rid="ok")) == ("aa", FinishReason.LENGTH, 2)
        await engine.stop()

    run(main())


def test_dead_engine_fails_waiters() -> None:
    async def main() -> None:
        engine = engine_with(ScriptedDecoder(delay=0.05))
        await engine.start()
        stream = engine.submit(req([1], 1000))
        await stream.__anext__()

        def broken_step() -> bool:
            raise SystemError("scheduler bug")

        engine.scheduler.step = broken_step
        with pytest.raises(EngineDead):
            async for _ in stream:
                pass
        with pytest.raises(EngineDead):
            engine.submit(req([1], 1, rid="after"))

    run(main())


def test_load_failure_surfaces() -> None:
    def boom() -> ServingModel:
        raise ValueError("no such model")

    async def main() -> None:
        engine = AsyncEngine(boom, max_waiting=1)
        with pytest.raises(ValueError, match="no such model"):
            await engine.start()

    run(main())


def test_waiting_requests_that_disconnect_never_run() -> None:
    async def main() -> None:
        plain = ScriptedDecoder(delay=0.02)
        engine = engine_with(plain, max_waiting=8)
        await engine.start()
        running = engine.submit(req([1], 10_000, rid="long"))
        await running.__anext__()
        waiters = [engine.submit(req([2], 5, rid=f"w{i}")) for i in range(8)]
        with pytest.raises(EngineBusy):
            engine.submit(req([2], 5, rid="full"))
        tasks = [asyncio.ensure_future(w.__anext__()) for w in waiters]
        await asyncio.sleep(0.05)
        for task, waiter in zip(tasks, waiters):  # what a disconnect does to a waiting stream
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await waiter.aclose()
        assert engine.scheduler.num_waiting == 0  # their slots are free while the long request still runs
        await running.aclose()
        assert await drain(engine, req([3], 2, rid="after")) == ("cc", FinishReason.LENGTH, 2)
        assert plain.started == [[1], [3]]  # none of the eight ran
        await engine.stop()


def test_abort_all_ends_running_and_waiting_with_abort() -> None:
    async def main() -> None:
        engine = engine_with(ScriptedDecoder(delay=0.02))
        await engine.start()
        running = engine.submit(req([1], 10_000, rid="long"))
        await running.__anext__()
        waiting = engine.submit(req([2], 5, rid="queued"))
        assert engine.abort_all() == 2
        with pytest.raises(EngineBusy, match="shutting down"):
            engine.submit(req([3], 1, rid="late"))
        finals = []
        for stream in (running, waiting):  # (an async comprehension inside a list one needs Python 3.11)
            finals.append([o async for o in stream][-1])
        assert [f.finish_reason for f in finals] == [FinishReason.ABORT, FinishReason.ABORT]
        assert finals[0].usage.completion_tokens > 0 and finals[1].usage.completion_tokens == 0
        await engine.stop()

    run(main())

    run(main())
