"""The HTTP layer in-process over a tiny random model: shapes, SSE framing, every bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app

MSG = [{"role": "user", "content": "Hi"}]


def make_client(serving: ServingModel, **config: object) -> TestClient:
    engine = AsyncEngine(lambda: serving, max_waiting=4)
    return TestClient(create_app(ServerConfig(**config), engine), base_url="http://localhost")  # Host allowlist


@pytest.fixture(scope="module")
def client(tiny_serving: ServingModel) -> Iterator[TestClient]:
    with make_client(tiny_serving) as c:
        yield c


def sse_events(client: TestClient, path: str, body: dict) -> list[str]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [block for block in raw.split("\n\n") if block.strip()]
    data = []
    for block in events:
        lines = [l for l in block.split("\n") if not l.startswith(":")]
        if lines:
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            data.append(lines[0][6:])
    return data


def test_models_and_health(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["drafter"] == "none"


def test_chat_non_stream(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 5, "temperature": 0})
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"] == {"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    assert usage["speculative"]["decoder"] == "plain"


def test_chat_stream_shape(client: TestClient) -> None:
    data = sse_events(client, "/v1/chat/completions", {"messages": MSG, "max_tokens": 6, "stream": True,
                                                       "temperature": 0, "stream_options": {"include_usage": True}})
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_options_empty_and_no_usage(client: TestClient) -> None:
    data = sse_events(client, "/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "stream": True,
                                                       "stream_options": {}})
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_greedy_stream_equals_non_stream(client: TestClient) -> None:
    body = {"messages": MSG, "max_tokens": 12, "temperature": 0}
    text = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    data = sse_events(client, "/v1/chat/completions", {**body, "stream": True})
    streamed = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert streamed == text


def test_seed_reproducible(client: TestClient) -> None:
    body = {"messages": MSG, "max_tokens": 12, "temperature": 1.0, "seed": 123}
    a = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    b = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    c = client.post("/v1/chat/completions", json={**body, "seed": 124}).json()["choices"][0]["message"]["content"]
    assert a == b and a != c


def test_completions(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 4, "temperature": 0, "echo": True})
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"].startswith("Once upon")
    assert body["usage"]["completion_tokens"] == 4
    data = sse_events(client, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3, "stream": True})
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_default_completions_max_tokens_is_16(client: TestClient) -> None:
    body = client.post("/v1/completions", json={"prompt": "a", "temperature": 0, "logit_bias": {"2": -100}}).json()
    assert body["usage"]["completion_tokens"] == 16


def test_logprobs_are_real(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3, "temperature": 0,
                                                     "logprobs": True, "top_logprobs": 3}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and entry["logprob"] <= 0
        assert tops[0]["logprob"] >= tops[1]["logprob"] >= tops[2]["logprob"]
        assert entry["token"] == tops[0]["token"] and entry["logprob"] == pytest.approx(tops[0]["logprob"])  # greedy
        assert isinstance(entry["bytes"], list)
    text = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "logprobs": 2, "temperature": 0}).json()
    lp = text["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 2 and len(lp["top_logprobs"][0]) == 2 and lp["text_offset"][0] == 0


def test_logit_bias_forces_token(client: TestClient, tiny_serving: ServingModel) -> None:
    token = tiny_serving.tokenizer.encode(" hello")[0]
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0,
                                                "logit_bias": {str(token): 100}}).json()
    assert body["choices"][0]["text"] == " hello" * 3


def test_stop_string(client: TestClient, tiny_serving: ServingModel) -> None:
    token = tiny_serving.tokenizer.encode(" hello")[0]
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "temperature": 0, "stop": "llo h",
                                                "logit_bias": {str(token): 100}}).json()
    assert body["choices"][0]["text"] == " he" and body["choices"][0]["finish_reason"] == "stop"


BAD = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": MSG, "temperature": -1}, "temperature"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 10**6}, "max_tokens"),
    ({"messages": MSG, "n": 2}, "n"),
    ({"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"1" * 5000: 1}}, "logit_bias"),  # int() refuses over 4300 digits
    ({"messages": MSG, "logit_bias": {"\u00b2": 1}}, "logit_bias"),  # '²'.isdigit() is True
    ({"messages": MSG, "logit_bias": {"--5": 1}}, "logit_bias"),
    ({"messages": MSG, "top_logprobs": 5}, None),
    ({"messages": MSG, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "stop": ["a"] * 40}, "stop"),
    ({"messages": MSG, "response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "a+"}}}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"oneOf": []}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
     "tool_choice"),
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
]


def assert_openai_400(r: Any, param: str | None) -> None:
    """An OpenAI-shaped invalid_request_error whose param starts with `param` (when given)."""
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] and err["param"].startswith(param), err


@pytest.mark.parametrize("body,param", BAD)
def test_bad_chat_input_is_400(client: TestClient, body: dict, param: str | None) -> None:
    assert_openai_400(client.post("/v1/chat/completions", json=body), param)


@pytest.mark.parametrize("body", [{"prompt": []}, {"prompt": ["a", "b"]}, {"prompt": [1, -5]}, {"prompt": "x", "suffix": "y"},
                                  {"prompt": "x", "best_of": 3}, {"prompt": "x", "logprobs": 99}])
def test_bad_completion_input_is_400(client: TestClient, body: dict) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text


def test_tools_on_a_template_without_tools_are_left_out(client: TestClient) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    plain = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, "temperature": 0})
    for choice in (None, "auto", "none"):
        body = {"messages": MSG, "tools": tools, "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body if choice is None else {**body, "tool_choice": choice})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
        assert r.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]  # the same prompt
        assert r.headers.get("x-dflash-tools-ignored") == ("true" if choice != "none" else None)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-dflash-tools-ignored"] == "true"
        assert r.read().decode().rstrip().endswith("data: [DONE]")
    assert plain.headers.get("x-dflash-tools-ignored") is None


def test_a_forced_tool_call_on_a_template_without_tools_is_constrained_to_the_call(client: TestClient) -> None:
    """The tools go into a system message and the reply is constrained to the call (tests/server/
    test_structured_outputs.py checks the real model's arguments against the schema)."""
    parameters = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                  "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}},
             {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {},
                                                                             "additionalProperties": False}}}]
    calls = 0
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        body = {"messages": MSG, "tools": tools, "tool_choice": choice, "max_tokens": 110, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert "x-dflash-tools-ignored" not in r.headers
        choice_ = r.json()["choices"][0]
        if choice_["finish_reason"] == "length":  # the random model may not finish inside max_tokens
            continue
        (call,) = choice_["message"]["tool_calls"]
        assert choice_["finish_reason"] == "tool_calls" and choice_["message"]["content"] is None
        assert call["function"]["name"] in ("f", "g") and isinstance(json.loads(call["function"]["arguments"]), dict)
        calls += 1
    assert calls


def test_a_tool_exchange_in_history_renders_as_text_without_tool_support(client: TestClient) -> None:
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    r = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    text_turns = [*MSG, {"role": "assistant", "content": 'Called get_time({"tz": "UTC"})'},
                  {"role": "user", "content": "Result from call_1:\n12:00"}]
    same = client.post("/v1/chat/completions", json={"messages": text_turns, "max_tokens": 2, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] == same.json()["usage"]["prompt_tokens"]


def test_malformed_json_and_non_object(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400


def test_context_overflow_names_both_counts(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 250})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "256" in err["message"] and "250" in err["message"]


def test_unknown_model_is_404_and_unknown_fields_ignored(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSG})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1, "frobnicate": True, "user": "u",
                                                  "metadata": {"a": 1}, "parallel_tool_calls": False})
    assert r.status_code == 200


def test_unknown_route_and_method_are_openai_errors(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_body_limit_413(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving, max_body_bytes=1000) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 2000}]})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_api_key(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving, api_key="sk-test") as c:
        assert c.get("/health").status_code == 200
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "sk-test"}).status_code == 200


def test_full_queue_is_503_with_retry_after(tiny_serving: ServingModel) -> None:
    engine = AsyncEngine(lambda: tiny_serving, max_waiting=0)  # every request finds the queue full
    with TestClient(create_app(ServerConfig(), engine), base_url="http://localhost") as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "stream": stream})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_busy"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", '{"prompt": "a\\ud800", "echo": true}'),  # a lone surrogate: valid JSON, not Unicode
    ("/v1/completions", '{"prompt": "a\\ud800", "echo": true, "stream": true}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\udfffb"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "stop": ["\\ud83d"]}'),
])
def test_lone_surrogate_is_400(client: TestClient, path: str, body: str) -> None:
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


def test_overflowing_penalty_keeps_logprobs_finite(client: TestClient) -> None:
    body = {"messages": MSG, "max_tokens": 3, "repetition_penalty": 1e-300, "logprobs": True, "top_logprobs": 5}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    values = [e["logprob"] for e in r.json()["choices"][0]["logprobs"]["content"]]
    assert all(-9999.0 <= v <= 0 for v in values)  # OpenAI's floor instead of -inf / NaN, which JSON lacks
    data = sse_events(client, "/v1/chat/completions", {**body, "stream": True})
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} is not JSON")}  # Python's json reads -Infinity and NaN
    assert data[-1] == "[DONE]" and all(json.loads(d, **strict) for d in data[:-1])
