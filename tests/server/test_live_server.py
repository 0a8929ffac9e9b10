"""The real embedded model behind a real uvicorn process, driven by the OpenAI SDK and raw HTTP."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import anthropic
import httpx
import pytest
from live_server import LiveServer
from openai import OpenAI

GREEDY = {"temperature": 0, "max_tokens": 12}
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer("--no-draft")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]


def test_chat_non_stream_answers(client: OpenAI) -> None:
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=HELLO, **GREEDY)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5


def test_chat_stream_with_usage_matches_non_stream(client: OpenAI) -> None:
    full = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=HELLO, **GREEDY)
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=HELLO, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_and_stop(client: OpenAI) -> None:
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=10, temperature=0)
    assert r.choices[0].text.startswith(" 5")
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                  stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text and "6" in r.choices[0].text


def test_seed(client: OpenAI) -> None:
    kw = dict(model="SmolLM2-135M-Instruct", messages=HELLO, max_tokens=10, temperature=1.0, seed=42)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content


def test_tools_get_a_normal_answer_from_the_embedded_model(server: LiveServer) -> None:
    """Open WebUI's default (native function calling) sends its tools with every chat."""
    tools = [{"type": "function", "function": {"name": "search_web", "description": "Search the web",
                                               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
    body = {"messages": HELLO, "tools": tools, **GREEDY}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["x-dflash-tools-ignored"] == "true"
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    # a forced call: the tools go into a system message and the reply is constrained to the call
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "tool_choice": "required", "max_tokens": 100},
                   timeout=60)
    assert r.status_code == 200 and "x-dflash-tools-ignored" not in r.headers
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "search_web" and isinstance(json.loads(call["function"]["arguments"]), dict)
    assert server.logs().count("does not support tools") == 1  # logged once per process


def test_seeded_requests_return_one_text_with_the_draft_equal_to_no_draft(server: LiveServer) -> None:
    drafted = LiveServer()  # the default: the embedded model with its shipped DFlash draft
    try:
        body = {"messages": [{"role": "user", "content": "Write a short poem about the sea."}], "temperature": 0.9,
                "top_p": 0.95, "seed": 1234, "max_tokens": 64}
        # generous timeouts: a loaded 2-core CI machine has stalled a 64-token request for minutes
        replies = [httpx.post(f"{drafted.url}/v1/chat/completions", json=body, timeout=300).json() for _ in range(4)]
        # the same request on the Responses and Messages routes: the same path, text and counters
        response = httpx.post(f"{drafted.url}/v1/responses", timeout=300, json={
            "input": body["messages"], **{k: body[k] for k in ("temperature", "top_p", "seed")}, "max_output_tokens": 64,
        }).json()
        message = httpx.post(f"{drafted.url}/v1/messages", json=body, timeout=300).json()
    finally:
        drafted.stop()
    texts = {r["choices"][0]["message"]["content"] for r in replies}
    assert len(texts) == 1, texts
    assert {response["output"][0]["content"][0]["text"], message["content"][0]["text"]} == texts
    for usage in (response["usage"], message["usage"]):
        assert usage["speculative"]["decoder"] == "speculative-dflash" and usage["speculative"]["verify_steps"] > 0
    assert all(r["usage"]["speculative"]["decoder"] == "speculative-dflash" for r in replies)
    assert sum(r["usage"]["speculative"]["verify_steps"] for r in replies) > 0  # drafts were verified
    plain = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
    assert plain["choices"][0]["message"]["content"] in texts


def test_responses_sdk(client: OpenAI) -> None:
    """The OpenAI SDK's Responses API, as the Agents SDK and Codex-style CLIs use it."""
    kw = dict(model="SmolLM2-135M-Instruct", input=HELLO[0]["content"], temperature=0, max_output_tokens=12)
    r = client.responses.create(**kw)
    assert "Paris" in r.output_text and r.usage.output_tokens <= 12
    assert r.usage.model_extra["speculative"]["decoder"] == "plain"
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response() if r.status == "completed" else None
    assert "".join(deltas) == r.output_text
    assert final is None or final.output_text == r.output_text
    follow = client.responses.create(**{**kw, "input": "And of Italy?"}, previous_response_id=r.id)
    assert follow.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens
    # the stored turn renders as it was prompted and generated: the prefix cache restores it
    assert follow.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens


def test_anthropic_sdk(server: LiveServer) -> None:
    """The Anthropic SDK's Messages API, as coding CLIs that take a base URL use it."""
    sdk = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    kw = dict(model="SmolLM2-135M-Instruct", max_tokens=12, messages=HELLO, extra_body={"temperature": 0})
    m = sdk.messages.create(**kw)
    assert "Paris" in m.content[0].text and m.stop_reason in ("end_turn", "max_tokens")
    with sdk.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text and final.usage.output_tokens == m.usage.output_tokens
    count = sdk.messages.count_tokens(model="SmolLM2-135M-Instruct", messages=HELLO).input_tokens
    assert count == m.usage.input_tokens + m.usage.cache_read_input_tokens  # input_tokens: those not cached


def test_no_progress_bars_in_a_log_file(server: LiveServer) -> None:
    logs = server.logs()  # stderr is a file here, not a terminal
    assert "dflash-server ready on" in logs
    assert "\r" not in logs and "layer/s" not in logs


def test_raw_sse_framing(server: LiveServer) -> None:
    body = {"messages": HELLO, "stream": True, "max_tokens": 4, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    for block in raw.strip().split("\n\n"):
        assert block.startswith("data: ") or block.startswith(":"), block
        if block != "data: [DONE]" and block.startswith("data: "):
            json.loads(block[6:])


def test_bad_input_is_400(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=HELLO, temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)


def _quick_request_seconds(server: LiveServer) -> float:
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    return time.monotonic() - t0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 3000}),
    ("/v1/responses", {"input": "Tell me a story.", "max_output_tokens": 3000}),
    ("/v1/messages", {"messages": HELLO, "max_tokens": 3000}),
])
def test_disconnect_mid_stream_frees_engine(server: LiveServer, path: str, body: dict) -> None:
    body = {**body, "stream": True, "temperature": 1.0, "logit_bias": {"2": -100}}  # never EOS: minutes unless cancelled
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(l.startswith("data: ") for l in got)
    assert _quick_request_seconds(server) < 10


def open_request(server: LiveServer, body: dict) -> socket.socket:
    """POST /v1/completions on a raw socket, so that closing it is a plain client disconnect."""
    data = json.dumps({"prompt": "Tell me a story.", "max_tokens": 3000, "temperature": 1.0,
                       "logit_bias": {"2": -100}, **body}).encode()  # never EOS: runs for minutes unless cancelled
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_disconnect_non_stream_frees_engine(server: LiveServer) -> None:
    with open_request(server, {}):
        time.sleep(1.5)
    assert _quick_request_seconds(server) < 10


def _waiting(server: LiveServer) -> int:
    return httpx.get(f"{server.url}/health", timeout=10).json()["waiting"]


def test_health_and_models_do_not_queue_and_waiters_that_leave_never_run(server: LiveServer) -> None:
    running = httpx.get(f"{server.url}/health", timeout=10).json()["max_batch"]
    sockets = [open_request(server, {"stream": i % 2 == 1}) for i in range(running + 4)]  # a batch runs, four wait
    try:
        deadline = time.monotonic() + 60  # the batch fills (eight prefills: seconds on a busy CPU), four wait
        while _waiting(server) != 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _waiting(server) == 4
        for path in ("/health", "/v1/models"):  # served by the event loop, never by the engine's queue
            t0 = time.monotonic()
            assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 2.0, path
        for s in sockets[running:]:
            s.close()
        deadline = time.monotonic() + 10
        while _waiting(server) and time.monotonic() < deadline:  # they leave the queue while the batch still runs
            time.sleep(0.1)
        assert _waiting(server) == 0
    finally:
        for s in sockets:
            s.close()
    assert _quick_request_seconds(server) < 10  # had the four run, this would take minutes
