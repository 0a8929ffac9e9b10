"""SIGTERM drains a live server (vLLM's test_shutdown): in-flight requests finish or end with "abort",
new requests are refused, and the process exits 0 within the drain timeout. An abort ends Responses
and Messages streams in their own shapes."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from collections.abc import Generator
from typing import Any

import httpx
from fastapi.testclient import TestClient
from live_server import LiveServer

from engine.decode.decoder import DecodeStep
from engine.decode.sampling import SamplingParams, TokenRng
from engine.model.gguf import read_gguf
from engine.model.tokenizer import Tokenizer
from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app
from server.responses_api import ABORTED
from tests.conftest import embedded_gguf_path
from tests.server.test_chat_template import ScriptedDecoder

MSG = [{"role": "user", "content": "Tell me a long story about the sea."}]
ENDLESS = {"temperature": 1.0, "logit_bias": {"2": -100}, "max_tokens": 3000}  # never EOS: runs until aborted
DRAIN_SECONDS = 8  # the short stream's last tokens must fit in it even on a busy 2-core machine


def stream_chat(url: str, body: dict, started: threading.Event | None = None) -> dict:
    """The last finish_reason, whether usage and [DONE] arrived, and the content received."""
    result = {"finish": None, "usage": None, "done": False, "text": ""}
    body = {"messages": MSG, "stream": True, "stream_options": {"include_usage": True}, **body}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result["done"] = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result["usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                result["text"] += choice["delta"].get("content") or ""
                result["finish"] = choice["finish_reason"] or result["finish"]
                if started is not None and choice["delta"].get("content"):
                    started.set()
    return result


def sigterm_and_wait(live: LiveServer) -> tuple[int, float, int | str]:
    """Send SIGTERM; return the exit code, seconds to exit, and what a request sent just after got."""
    t0 = time.monotonic()
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        refused: int | str = httpx.get(f"{live.url}/v1/models", timeout=5).status_code
    except httpx.TransportError as e:  # the listener may already be closed: also a refusal
        refused = type(e).__name__
    code = live.proc.wait(150)
    return code, time.monotonic() - t0, refused


def test_sigterm_aborts_what_the_timeout_cuts_off() -> None:
    live = LiveServer("--no-draft", "--drain-timeout", str(DRAIN_SECONDS), "--max-batch", "2")
    started = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        # the short stream runs first, the two endless ones next (a batch of two); the last one waits
        short = pool.submit(stream_chat, live.url, {"temperature": 0, "max_tokens": 4}, started)
        assert started.wait(60)
        endless: list[Future] = [pool.submit(stream_chat, live.url, ENDLESS) for _ in range(2)]
        time.sleep(0.3)
        plain = pool.submit(httpx.post, f"{live.url}/v1/completions", json={"prompt": "Once", **ENDLESS}, timeout=60)
        time.sleep(0.5)
        code, seconds, refused = sigterm_and_wait(live)
        results = [short.result(), *(f.result() for f in endless)]
        body = plain.result().json()
    assert code == 0 and seconds < DRAIN_SECONDS + 15, (code, seconds)
    assert refused in (503, "ConnectError", "RemoteProtocolError"), refused
    assert results[0]["finish"] == "length" and results[0]["usage"]["completion_tokens"] == 4
    assert [r["finish"] for r in results[1:]] == ["abort", "abort"]
    assert all(r["done"] and r["usage"] for r in results)
    assert body["choices"][0]["finish_reason"] == "abort" and body["usage"]["completion_tokens"] == 0
    assert "drain timeout: aborting 3 requests" in live.logs()


def test_sigterm_lets_short_requests_finish() -> None:
    live = LiveServer("--no-draft", "--drain-timeout", "120")
    started = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream_chat, live.url, {"temperature": 0, "max_tokens": 8}, started) for _ in range(3)]
        assert started.wait(60)
        code, seconds, refused = sigterm_and_wait(live)
        results = [f.result() for f in futures]
    assert code == 0 and seconds < 110, (code, seconds)
    assert refused in (503, "ConnectError", "RemoteProtocolError"), refused
    assert [r["finish"] for r in results] == ["length"] * 3 and all(r["done"] for r in results)
    assert "aborting" not in live.logs()


class FakeEngine:
    def __init__(self) -> None:
        self.aborted = 0

    def abort_all(self) -> int:
        self.aborted += 1
        return 1


def test_second_signal_aborts_at_once() -> None:
    from server.drain import Drain

    async def main() -> float:
        engine = FakeEngine()
        drain = Drain(engine, timeout=60)  # type: ignore[arg-type]
        drain.in_flight = 1
        drain.close()
        task = asyncio.create_task(drain.run())
        await asyncio.sleep(0.2)
        assert engine.aborted == 0 and not task.done()
        t0 = time.monotonic()
        drain.close()  # a second SIGTERM / Ctrl-C
        await asyncio.sleep(0.2)
        assert engine.aborted == 1
        drain.in_flight = 0  # the aborted request sent its final chunk
        await asyncio.wait_for(task, 2)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 2


class SlowDecoder(ScriptedDecoder):
    """One token every 20 ms until max_tokens: a stream still running when the test aborts it."""

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 rng: TokenRng) -> Generator[DecodeStep, None, None]:
        word = self.tokenizer.encode(" sea")[0]
        for _ in range(max_tokens):
            time.sleep(0.02)
            yield DecodeStep([word], None)


def aborted_stream(path: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Stream `body` on a fresh app and abort everything (a drain timeout's abort) after the first delta."""
    _, meta = read_gguf(embedded_gguf_path())
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    serving = ServingModel(model_id="slow", tokenizer=tokenizer, context_length=1024, plain=SlowDecoder(tokenizer),
                           speculative=None, drafter="none", backend="test", description="slow")
    engine = AsyncEngine(lambda: serving, max_waiting=4)
    events: list[tuple[str, dict[str, Any]]] = []
    with TestClient(create_app(ServerConfig(), engine), base_url="http://localhost") as client:
        with client.stream("POST", path, json={**body, "stream": True, "max_tokens": 500}) as r:
            name, aborted = "", 0
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if name.endswith("delta") and not aborted:  # the first delta: the stream is running
                        aborted = engine.abort_all()
    assert aborted == 1
    return events


def test_an_abort_ends_responses_and_messages_streams_in_their_shapes() -> None:
    events = aborted_stream("/v1/responses", {"input": "Hi", "max_output_tokens": 500})
    name, last = events[-1]
    assert name == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"] == {"code": "server_error", "message": ABORTED}
    assert last["response"]["usage"]["output_tokens"] < 500
    events = aborted_stream("/v1/messages", {"messages": MSG, "max_tokens": 500})
    assert [name for name, _ in events[-2:]] == ["content_block_stop", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": ABORTED}}
