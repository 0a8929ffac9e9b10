"""POST /v1/messages through the official Anthropic SDK (pointed at the app) and raw SSE: content blocks,
the streamed event sequence against the SDK's own types, stop reasons, tool use both ways, prefill,
count_tokens, and Anthropic-shaped errors from the route, the validation and the middleware."""

from __future__ import annotations

import json
from typing import Any, get_args

import anthropic
import pytest
from anthropic import Anthropic
from anthropic.types import Message, RawMessageStreamEvent
from fastapi.testclient import TestClient

from engine.runtime.serving_model import ServingModel
from tests.server.conftest import RecordingDecoder, named_events
from tests.server.test_app import make_client

HI = [{"role": "user", "content": "Hi"}]
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINK = "<think>\nTwo and two make four.\n</think>\n\n"
EVENT_TYPES = {get_args(cls.model_fields["type"].annotation)[0]: cls for cls in get_args(get_args(RawMessageStreamEvent)[0])}


@pytest.fixture(scope="module")
def sdk(tool_client: TestClient) -> Anthropic:
    return Anthropic(base_url="http://localhost", api_key="unused", http_client=tool_client, max_retries=0)


def checked(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Each event against the SDK's type for it (pings have none); the names."""
    for name, data in events:
        assert data["type"] == name, (name, data)
        if name != "ping":
            EVENT_TYPES[name].model_validate(data)
    return [name for name, _ in events]


def test_create(sdk: Anthropic, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "Hello there."
    m = sdk.messages.create(model="scripted", max_tokens=50, messages=HI, system="Be brief.", metadata={"user_id": "u1"},
                            extra_body={"temperature": 0, "top_p": 0.9, "top_k": 5})  # this SDK has no such arguments
    Message.model_validate(m.model_dump())
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "scripted"
    assert [(b.type, b.text) for b in m.content] == [("text", "Hello there.")]
    assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)
    assert m.usage.output_tokens == 3 and m.usage.cache_read_input_tokens == 0
    assert m.usage.input_tokens == len(tool_decoder.prompts[-1]) and m.usage.model_extra["speculative"]["decoder"] == "plain"
    prompt = tool_decoder.tokenizer.decode(tool_decoder.prompts[-1])
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")


def key_field(name: str, data: dict[str, Any]) -> Any:
    """What an event carries: a block's type and index, a delta, the stop reason."""
    if name == "content_block_start":
        return data["content_block"]["type"], data["index"]
    if name == "content_block_delta":
        delta = data["delta"]
        return delta["type"], delta.get("text", delta.get("thinking", delta.get("partial_json")))
    if name == "content_block_stop":
        return data["index"]
    if name == "message_delta":
        return data["delta"]["stop_reason"], data["usage"]["output_tokens"]
    return data["message"]["content"] if name == "message_start" else None


def golden(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Any]]:
    """The sequence after checking each event; pings past the second event are keep-alives and timing-dependent."""
    checked(events)
    return [(name, key_field(name, data)) for i, (name, data) in enumerate(events) if i < 2 or name != "ping"]


def test_stream_golden_sequence(tool_client: TestClient, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "Hello there."
    events = named_events(tool_client, "/v1/messages", {"max_tokens": 50, "messages": HI, "stream": True})
    assert golden(events) == [
        ("message_start", []),
        ("ping", None),
        ("content_block_start", ("text", 0)),
        ("content_block_delta", ("text_delta", "Hello")),
        ("content_block_delta", ("text_delta", " there")),
        ("content_block_delta", ("text_delta", ".")),
        ("content_block_stop", 0),
        ("message_delta", ("end_turn", 3)),
        ("message_stop", None)]
    start = events[0][1]["message"]
    assert start["stop_reason"] is None and start["usage"]["output_tokens"] == 0 and start["id"].startswith("msg_")
    assert start["usage"]["input_tokens"] == len(tool_decoder.prompts[-1])
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["input_tokens"] == len(tool_decoder.prompts[-1]) and delta["usage"]["cache_read_input_tokens"] == 0
    assert delta["usage"]["speculative"]["decoder"] == "plain"


def test_stream_golden_sequence_with_thinking_and_tool_use(tool_client: TestClient, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = f"{THINK}Checking.\n{CALL}"
    events = named_events(tool_client, "/v1/messages", {"max_tokens": 99, "messages": HI, "stream": True, "tools": TOOLS})
    thought = ["Two", " and", " two", " make", " four", ".", "\n"]
    assert golden(events) == [
        ("message_start", []),
        ("ping", None),
        ("content_block_start", ("thinking", 0)),
        *[("content_block_delta", ("thinking_delta", piece)) for piece in thought],
        ("content_block_stop", 0),
        ("content_block_start", ("text", 1)),
        *[("content_block_delta", ("text_delta", piece)) for piece in ("Che", "cking", ".")],
        ("content_block_stop", 1),
        ("content_block_start", ("tool_use", 2)),
        ("content_block_delta", ("input_json_delta", '{"city": "Paris"}')),
        ("content_block_stop", 2),
        ("message_delta", ("tool_use", len(tool_decoder.tokenizer.encode(tool_decoder.script)))),
        ("message_stop", None)]
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}
    assert starts[2]["name"] == "get_weather" and starts[2]["input"] == {} and starts[2]["id"].startswith("toolu_")
    assert all(d["index"] == 2 for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")


def test_sdk_stream_helper(sdk: Anthropic, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = f"{THINK}It is 4."
    with sdk.messages.stream(model="scripted", max_tokens=50, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "It is 4." and [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Two and two make four.\n" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_stop_reasons(sdk: Anthropic, tool_client: TestClient, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "one two three four five six"
    m = sdk.messages.create(model="scripted", max_tokens=3, messages=HI)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
    m = sdk.messages.create(model="scripted", max_tokens=50, messages=HI, stop_sequences=["five", " two"])
    assert (m.stop_reason, m.stop_sequence, m.content[0].text) == ("stop_sequence", " two", "one")
    events = named_events(tool_client, "/v1/messages", {"max_tokens": 50, "messages": HI, "stream": True,
                                                   "stop_sequences": ["four"]})
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "four"}
    tool_decoder.script = "no stop here"
    m = sdk.messages.create(model="scripted", max_tokens=50, messages=HI, stop_sequences=["zebra"])
    assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)


def test_tool_use_round_trip(sdk: Anthropic, tool_client: TestClient, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = CALL
    first = sdk.messages.create(model="scripted", max_tokens=99, messages=[{"role": "user", "content": "Weather?"}],
                                tools=TOOLS)
    (use,) = first.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    assert first.stop_reason == "tool_use"
    tool_decoder.script = "It is 18 degrees."
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"},
                                            {"type": "text", "text": "Thanks."}]}]
    second = sdk.messages.create(model="scripted", max_tokens=99, messages=history, tools=TOOLS)
    assert second.content[0].text == "It is 18 degrees." and second.stop_reason == "end_turn"
    # the chat route renders the same conversation to the same prompt
    tool_prompt = tool_decoder.prompts[-1]
    chat = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": use.id, "content": "18 C"}, {"role": "user", "content": "Thanks."}]
    chat_tools = [{"type": "function", "function": {"name": "get_weather", "description": TOOLS[0]["description"],
                                                     "parameters": TOOLS[0]["input_schema"]}}]
    assert tool_client.post("/v1/chat/completions", json={"messages": chat, "tools": chat_tools}).status_code == 200
    assert tool_decoder.prompts[-1] == tool_prompt


def test_prefill_and_count_tokens(sdk: Anthropic, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = " a fox."
    prefilled = [*HI, {"role": "assistant", "content": "Once upon"}]
    m = sdk.messages.create(model="scripted", max_tokens=20, messages=prefilled)
    assert m.content[0].text == " a fox."
    assert tool_decoder.tokenizer.decode(tool_decoder.prompts[-1]).endswith("<|im_start|>assistant\nOnce upon")
    count = sdk.messages.count_tokens(model="scripted", messages=prefilled)
    assert count.input_tokens == len(tool_decoder.prompts[-1])
    count = sdk.messages.count_tokens(model="scripted", messages=HI, system=[{"type": "text", "text": "Be brief."}])
    sdk.messages.create(model="scripted", max_tokens=20, messages=HI, system="Be brief.")
    assert count.input_tokens == len(tool_decoder.prompts[-1])


def test_tools_on_a_template_without_tools(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving) as c:
        history = [*HI, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"tz": "UTC"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}]}]
        r = c.post("/v1/messages", json={"max_tokens": 2, "messages": history, "tools": TOOLS})
        assert r.status_code == 200 and r.headers["x-dflash-tools-ignored"] == "true"
        turns = [*HI, {"role": "assistant", "content": 'Called get_time({"tz": "UTC"})'},
                 {"role": "user", "content": "Result from get_time:\n12:00"}]
        same = c.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 2})
        assert r.json()["usage"]["input_tokens"] == same.json()["usage"]["prompt_tokens"]
        # a forced call: described in a system message, the reply constrained to it (a random model: it may
        # not finish inside max_tokens, and then the cut call is text)
        r = c.post("/v1/messages", json={"max_tokens": 150, "messages": HI, "tools": TOOLS, "temperature": 0,
                                         "tool_choice": {"type": "any"}})
        assert r.status_code == 200 and "x-dflash-tools-ignored" not in r.headers
        if r.json()["stop_reason"] == "tool_use":
            assert r.json()["content"][-1]["type"] == "tool_use"


BAD = [
    {"messages": HI},  # max_tokens is required
    {"max_tokens": 0, "messages": HI},
    {"max_tokens": 5, "messages": []},
    {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
    {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
    {"max_tokens": 5, "messages": HI, "temperature": -1},
    {"max_tokens": 5, "messages": HI, "stop_sequences": ["a"] * 40},
    {"max_tokens": 5, "messages": HI, "tool_choice": {"type": "tool"}},
    {"max_tokens": 5000, "messages": HI},
    {"max_tokens": 5, "messages": HI, "stream": "yes"},
    {"max_tokens": 5, "messages": HI, "output_config": {"format": {"type": "json_schema", "schema": {}}}},
]


@pytest.mark.parametrize("body", BAD)
def test_bad_input_is_an_anthropic_400(tool_client: TestClient, body: dict) -> None:
    r = tool_client.post("/v1/messages", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and set(r.json()["error"]) == {"type", "message"}
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_error_shapes(tool_client: TestClient, sdk: Anthropic) -> None:
    r = tool_client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = tool_client.post("/v1/messages", json={"model": "claude-9", "max_tokens": 5, "messages": HI})
    assert r.status_code == 404 and r.json() == {"type": "error", "error": {
        "type": "not_found_error", "message": "model 'claude-9' is not served here; this server serves 'scripted'"}}
    assert tool_client.get("/v1/messages").json()["error"]["type"] == "invalid_request_error"  # 405
    with pytest.raises(anthropic.BadRequestError) as e:
        sdk.messages.create(model="scripted", max_tokens=5, messages=[])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.create(model="claude-9", max_tokens=5, messages=HI)
    assert "error" in tool_client.post("/v1/chat/completions", json={}).json()  # other routes keep OpenAI's shape
    assert 'route="/v1/messages",status="404"' in tool_client.get("/metrics").text


def test_api_key_and_body_limit_in_anthropic_shape(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving, api_key="sk-test", max_body_bytes=1000) as c:
        body = {"max_tokens": 1, "messages": HI}
        r = c.post("/v1/messages", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and r.json()["type"] == "error"
        for header in ({"x-api-key": "sk-test"}, {"Authorization": "Bearer sk-test"}):
            assert c.post("/v1/messages", json=body, headers={**header, "anthropic-version": "2023-06-01"}).status_code == 200
        keyed = Anthropic(base_url="http://localhost", api_key="sk-test", http_client=c, max_retries=0)
        assert keyed.messages.create(model="tiny", max_tokens=1, messages=HI).usage.output_tokens == 1
        with pytest.raises(anthropic.AuthenticationError):
            Anthropic(base_url="http://localhost", api_key="wrong", http_client=c, max_retries=0).messages.create(
                model="tiny", max_tokens=1, messages=HI)
        r = c.post("/v1/messages", json={"max_tokens": 1, "messages": [{"role": "user", "content": "x" * 2000}]},
                   headers={"x-api-key": "sk-test"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
