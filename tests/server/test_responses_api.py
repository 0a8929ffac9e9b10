"""POST /v1/responses through the official OpenAI SDK (pointed at the app) and raw SSE: output items,
the streamed event sequence against the SDK's own types, function calls both ways, previous_response_id
and the store, and every bad input as an OpenAI error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, get_args

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from openai.types.responses import Response, ResponseStreamEvent

from engine.runtime.serving_model import ServingModel
from server.response_store import ResponseStore, StoredResponse
from tests.server.conftest import RecordingDecoder, named_events
from tests.server.test_app import assert_openai_400, make_client

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINK = "<think>\nTwo and two make four.\n</think>\n\n"
EVENT_TYPES = {get_args(cls.model_fields["type"].annotation)[0]: cls for cls in get_args(get_args(ResponseStreamEvent)[0])}


@pytest.fixture(scope="module")
def sdk(tool_app: tuple[TestClient, RecordingDecoder]) -> OpenAI:
    return OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=tool_app[0], max_retries=0)


def checked(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Each event against the SDK's type for it (required fields, literals), numbered 0, 1, 2...; the names."""
    for number, (name, data) in enumerate(events):
        assert data["type"] == name and data["sequence_number"] == number, (name, data)
        EVENT_TYPES[name].model_validate(data)
    return [name for name, _ in events]


def test_create_text(sdk: OpenAI, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "Hello there."
    r = sdk.responses.create(model="scripted", input="Hi", instructions="Be brief.", temperature=0, top_p=0.5)
    Response.model_validate(r.model_dump())
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello there." and r.model == "scripted"
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert (r.instructions, r.temperature, r.top_p, r.store) == ("Be brief.", 0, 0.5, True)
    usage = r.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.output_tokens == 3  # not <|im_end|>
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert usage.model_extra["speculative"]["decoder"] == "plain"
    prompt = tool_decoder.tokenizer.decode(tool_decoder.prompts[-1])
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")


def key_field(name: str, data: dict[str, Any]) -> Any:
    """The field that says what an event carries: a delta, a done text, an item's type, a response's status."""
    if name.endswith(".delta"):
        return data["delta"]
    if name.endswith("_text.done"):
        return data["text"]
    if name.endswith("arguments.done"):
        return json.loads(data["arguments"])
    if name.startswith("response.content_part"):
        return data["part"]["text"]
    if name.startswith("response.output_item"):
        return data["item"]["type"], data["item"]["status"], data["output_index"]
    return data["response"]["status"]


def test_stream_golden_sequence(tool_client: TestClient, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "Hello there."
    events = named_events(tool_client, "/v1/responses", {"input": "Hi", "stream": True})
    checked(events)
    assert [(name, key_field(name, data)) for name, data in events] == [
        ("response.created", "in_progress"),
        ("response.in_progress", "in_progress"),
        ("response.output_item.added", ("message", "in_progress", 0)),
        ("response.content_part.added", ""),
        ("response.output_text.delta", "Hello"),
        ("response.output_text.delta", " there"),
        ("response.output_text.delta", "."),
        ("response.output_text.done", "Hello there."),
        ("response.content_part.done", "Hello there."),
        ("response.output_item.done", ("message", "completed", 0)),
        ("response.completed", "completed")]
    data = [d for _, d in events]
    assert data[0]["response"]["output"] == [] and data[0]["response"]["usage"] is None
    assert len({d["item_id"] for d in data if "item_id" in d} | {d["item"]["id"] for d in data if "item" in d}) == 1
    assert all(d["content_index"] == 0 for d in data if "content_index" in d)
    final = data[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello there."
    assert final["output"] == [data[-2]["item"]] and final["id"] == data[0]["response"]["id"]
    usage = final["usage"]
    assert (usage["output_tokens"], usage["input_tokens_details"]["cached_tokens"],
            usage["output_tokens_details"]["reasoning_tokens"]) == (3, 0, 0)
    assert usage["total_tokens"] == usage["input_tokens"] + 3 and usage["speculative"]["decoder"] == "plain"


def test_stream_golden_sequence_with_reasoning_and_a_call(tool_client: TestClient, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = f"{THINK}Checking.\n{CALL}"
    events = named_events(tool_client, "/v1/responses", {"input": "Hi", "stream": True, "tools": TOOLS})
    checked(events)
    thought = ["Two", " and", " two", " make", " four", ".", "\n"]
    assert [(name, key_field(name, data)) for name, data in events] == [
        ("response.created", "in_progress"),
        ("response.in_progress", "in_progress"),
        ("response.output_item.added", ("reasoning", "in_progress", 0)),
        ("response.content_part.added", ""),
        *[("response.reasoning_text.delta", piece) for piece in thought],
        ("response.reasoning_text.done", "Two and two make four.\n"),
        ("response.content_part.done", "Two and two make four.\n"),
        ("response.output_item.done", ("reasoning", "completed", 0)),
        ("response.output_item.added", ("message", "in_progress", 1)),
        ("response.content_part.added", ""),
        *[("response.output_text.delta", piece) for piece in ("Che", "cking", ".")],
        ("response.output_text.done", "Checking."),
        ("response.content_part.done", "Checking."),
        ("response.output_item.done", ("message", "completed", 1)),
        ("response.output_item.added", ("function_call", "in_progress", 2)),
        ("response.function_call_arguments.delta", '{"city": "Paris"}'),
        ("response.function_call_arguments.done", {"city": "Paris"}),
        ("response.output_item.done", ("function_call", "completed", 2)),
        ("response.completed", "completed")]
    added = [d["item"] for n, d in events if n == "response.output_item.added"]
    assert added[2]["name"] == "get_weather" and added[2]["arguments"] == ""
    reasoning, message, call = events[-1][1]["response"]["output"]
    assert [reasoning["type"], message["type"], call["type"]] == ["reasoning", "message", "function_call"]
    assert call["name"] == "get_weather" and call["call_id"].startswith("call_") and call["id"] == added[2]["id"]
    assert events[-1][1]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


def test_sdk_stream_helper_and_create_stream(sdk: OpenAI, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = f"{THINK}It is 4."
    with sdk.responses.stream(model="scripted", input="What is 2+2?") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "It is 4."
    assert [item.type for item in final.output] == ["reasoning", "message"]
    events = list(sdk.responses.create(model="scripted", input="What is 2+2?", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert events[-1].response.output_text == "It is 4."


def test_max_output_tokens_is_incomplete(tool_client: TestClient, sdk: OpenAI, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "one two three four five six"
    r = sdk.responses.create(model="scripted", input="Count", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3 and r.max_output_tokens == 3
    events = named_events(tool_client, "/v1/responses", {"input": "Count", "max_output_tokens": 3, "stream": True})
    names = checked(events)
    assert names[-1] == "response.incomplete" and events[-1][1]["response"]["status"] == "incomplete"
    assert events[-2][1]["item"]["status"] == "incomplete"


def test_function_call_round_trip_by_previous_response_id(sdk: OpenAI, tool_client: TestClient,
                                                          tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = CALL
    first = sdk.responses.create(model="scripted", input="Weather in Paris?", tools=TOOLS)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.status == "completed" and first.output_text == ""
    tool_decoder.script = "It is 18 degrees."
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}
    second = sdk.responses.create(model="scripted", previous_response_id=first.id, input=[result], tools=TOOLS)
    assert second.output_text == "It is 18 degrees." and second.previous_response_id == first.id
    by_id = tool_decoder.prompts[-1]
    # the same conversation sent whole, and as chat completions, renders the same prompt
    full = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(), result]
    sdk.responses.create(model="scripted", input=full, tools=TOOLS)
    assert tool_decoder.prompts[-1] == by_id
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function",
                                                                  "function": {"name": "get_weather", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "18 C"}]
    chat_tools = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
    r = tool_client.post("/v1/chat/completions", json={"messages": chat, "tools": chat_tools})
    assert r.status_code == 200 and tool_decoder.prompts[-1] == by_id
    assert "<|im_start|>tool\n18 C<|im_end|>" in tool_decoder.tokenizer.decode(by_id)


def test_conversation_chains_and_instructions_do_not_carry_over(sdk: OpenAI, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "Paris."
    first = sdk.responses.create(model="scripted", input="Capital of France?", instructions="Answer in one word.")
    tool_decoder.script = "Rome."
    second = sdk.responses.create(model="scripted", input="And Italy?", previous_response_id=first.id)
    third = sdk.responses.create(model="scripted", input="Thanks.", previous_response_id=second.id)
    prompt = tool_decoder.tokenizer.decode(tool_decoder.prompts[-1])
    assert "Answer in one word." not in prompt and third.instructions is None
    turns = ["user\nCapital of France?", "assistant\nParis.", "user\nAnd Italy?", "assistant\nRome.", "user\nThanks."]
    assert prompt.startswith("".join(f"<|im_start|>{t}<|im_end|>\n" for t in turns))


def test_retrieve_delete_and_store_false(sdk: OpenAI, tool_client: TestClient, tool_decoder: RecordingDecoder) -> None:
    tool_decoder.script = "Kept."
    kept = sdk.responses.create(model="scripted", input="Hi")
    assert sdk.responses.retrieve(kept.id).model_dump() == kept.model_dump()
    sdk.responses.delete(kept.id)
    for r in (tool_client.get(f"/v1/responses/{kept.id}"), tool_client.delete(f"/v1/responses/{kept.id}")):
        assert r.status_code == 404 and r.json()["error"]["message"] == f"Response with id '{kept.id}' not found."
    unstored = sdk.responses.create(model="scripted", input="Hi", store=False)
    assert unstored.store is False and tool_client.get(f"/v1/responses/{unstored.id}").status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        sdk.responses.create(model="scripted", input="Again", previous_response_id=unstored.id)
    assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"
    metrics = tool_client.get("/metrics").text
    assert 'route="/v1/responses"' in metrics and 'route="/v1/responses/{response_id}"' in metrics


def test_store_keeps_the_most_recently_used() -> None:
    store = ResponseStore(max_entries=2)
    for name in ("a", "b"):
        store.put(StoredResponse({"id": name}, []))
    assert store.get("a") is not None  # "b" is now the least recently used
    store.put(StoredResponse({"id": "c"}, []))
    assert len(store) == 2 and store.get("b") is None and store.get("a") and store.get("c")


def test_function_tools_on_a_template_without_tools(tiny_serving: ServingModel) -> None:
    """SmolLM2's template: tools are left out (and said so), an earlier call renders as plain turns."""
    with make_client(tiny_serving) as c:
        history = [{"role": "user", "content": "Hi"},
                   {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"tz": "UTC"}'},
                   {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]
        r = c.post("/v1/responses", json={"input": history, "tools": TOOLS, "max_output_tokens": 2})
        assert r.status_code == 200 and r.headers["x-dflash-tools-ignored"] == "true"
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 'Called get_time({"tz": "UTC"})'},
                 {"role": "user", "content": "Result from get_time:\n12:00"}]
        same = c.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 2})
        assert r.json()["usage"]["input_tokens"] == same.json()["usage"]["prompt_tokens"]
        r = c.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2, "tools": [{"type": "web_search"}]})
        assert r.status_code == 200 and r.headers["x-dflash-tools-ignored"] == "true"


BAD = [
    ({}, None),
    ({"input": []}, None),
    ({"input": 5}, "input"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}}, "text.format"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": "Hi", "temperature": 3}, "temperature"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "Hi", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": "Hi", "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "Hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"input": "Hi", "stream": "yes"}, "stream"),
    ({"input": "Hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_input_is_an_openai_400(tool_client: TestClient, body: dict, param: str | None) -> None:
    assert_openai_400(tool_client.post("/v1/responses", json=body), param)


def test_text_format_json_schema_constrains_the_reply(sdk: OpenAI, tool_decoder: RecordingDecoder) -> None:
    """json_schema and json_object become the chat route's response_format: the engine request carries the
    grammar (the scripted decoder says its script whatever it is), the response echoes the format, and a
    schema the server cannot enforce is a 400 naming text.format and the keyword."""
    from engine.grammar.constraint import json_object_spec, json_schema_spec

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    tool_decoder.script = '{"city": "Paris"}'
    fmt = {"type": "json_schema", "name": "city", "schema": schema, "strict": True}
    r = sdk.responses.create(model="scripted", input="Hi", text={"format": fmt})
    assert json.loads(r.output_text) == {"city": "Paris"}
    assert tool_decoder.params.grammar == json_schema_spec(schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"
    r = sdk.responses.create(model="scripted", input="Hi", text={"format": {"type": "json_object"}})
    assert tool_decoder.params.grammar == json_object_spec() and r.text.format.type == "json_object"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.responses.create(model="scripted", input="Hi", text={"format": {**fmt, "schema": {
            "type": "object", "properties": {"city": {"type": "string", "pattern": "^P"}}}}})
    assert e.value.param == "text.format" and "'pattern'" in e.value.body["message"]
    tool_decoder.script = "Plain."
    r = sdk.responses.create(model="scripted", input="Hi", text={"format": {"type": "text"}})
    assert r.output_text == "Plain." and r.text.format.type == "text" and tool_decoder.params.grammar is None


def test_sdk_errors(sdk: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        sdk.responses.create(model="gpt-9", input="Hi")
    assert e.value.code == "model_not_found"


@pytest.fixture
def keyed(tiny_serving: ServingModel) -> Iterator[TestClient]:
    with make_client(tiny_serving, api_key="sk-test") as c:
        yield c


def test_api_key(keyed: TestClient) -> None:
    body = {"input": "Hi", "max_output_tokens": 1}
    r = keyed.post("/v1/responses", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert keyed.post("/v1/responses", json=body, headers={"Authorization": "Bearer sk-test"}).status_code == 200
