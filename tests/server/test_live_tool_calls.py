"""Function-call round trips through the official openai and anthropic SDKs against a live uvicorn (real
sockets, SSE and the API key check) over the scripted decoder behind the Qwen3-like tool template: the
model calls a tool, the client runs it and sends the result back, the model answers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import pytest
from live_server import ThreadedServer
from openai import OpenAI

from tests.server.conftest import RecordingDecoder, scripted_app

KEY = "sk-live"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is 18 degrees in Paris."
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[str, RecordingDecoder]]:
    app, decoder = scripted_app(api_key=KEY)
    server = ThreadedServer(app)
    yield server.url, decoder
    server.stop()


@pytest.fixture(scope="module")
def openai_sdk(live: tuple[str, RecordingDecoder]) -> OpenAI:
    return OpenAI(base_url=f"{live[0]}/v1", api_key=KEY, max_retries=0, timeout=60)  # Authorization: Bearer


@pytest.fixture(scope="module")
def anthropic_sdk(live: tuple[str, RecordingDecoder]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live[0], api_key=KEY, max_retries=0, timeout=60)  # x-api-key


def weather(city: str) -> str:
    return f"18 C in {city}"


def test_responses_function_call_round_trip(openai_sdk: OpenAI, live: tuple[str, RecordingDecoder]) -> None:
    decoder = live[1]
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS}]
    decoder.script = CALL
    first = openai_sdk.responses.create(model="scripted", input=QUESTION, tools=tools)
    (call,) = first.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    assert first.usage.model_extra["speculative"]["decoder"] == "plain"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": weather(**json.loads(call.arguments))}
    decoder.script = ANSWER
    second = openai_sdk.responses.create(model="scripted", previous_response_id=first.id, input=[result], tools=tools)
    assert second.output_text == ANSWER and second.status == "completed"
    assert "<|im_start|>tool\n18 C in Paris<|im_end|>" in decoder.tokenizer.decode(decoder.prompts[-1])

    # streamed: the call arrives as an item with its arguments, then the answer to the whole history sent back
    decoder.script = CALL
    events = list(openai_sdk.responses.create(model="scripted", input=QUESTION, tools=tools, stream=True))
    names = [e.type for e in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    (args,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    (call,) = events[-1].response.output
    assert call.type == "function_call" and json.loads(args.arguments) == json.loads(call.arguments) == {"city": "Paris"}
    history = [{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": weather("Paris")}]
    decoder.script = ANSWER
    events = list(openai_sdk.responses.create(model="scripted", input=history, tools=tools, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == ANSWER


def test_messages_tool_use_round_trip(anthropic_sdk: anthropic.Anthropic, live: tuple[str, RecordingDecoder]) -> None:
    decoder = live[1]
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": PARAMETERS}]
    messages: list[dict] = [{"role": "user", "content": QUESTION}]
    decoder.script = CALL
    first = anthropic_sdk.messages.create(model="scripted", max_tokens=100, messages=messages, tools=tools)
    (use,) = first.content
    assert (use.type, use.name, use.input, first.stop_reason) == ("tool_use", "get_weather", {"city": "Paris"}, "tool_use")
    assert first.usage.model_extra["speculative"]["decoder"] == "plain"
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": weather(**use.input)}]}]
    decoder.script = ANSWER
    second = anthropic_sdk.messages.create(model="scripted", max_tokens=100, messages=messages, tools=tools)
    assert second.content[0].text == ANSWER and second.stop_reason == "end_turn"
    assert "<|im_start|>tool\n18 C in Paris<|im_end|>" in decoder.tokenizer.decode(decoder.prompts[-1])

    # streamed: the SDK accumulates the call's input_json_delta into the tool_use block's input
    decoder.script = CALL
    with anthropic_sdk.messages.stream(model="scripted", max_tokens=100, messages=messages[:1], tools=tools) as stream:
        final = stream.get_final_message()
    (use,) = final.content
    assert (use.type, use.input, final.stop_reason) == ("tool_use", {"city": "Paris"}, "tool_use")
    decoder.script = ANSWER
    with anthropic_sdk.messages.stream(model="scripted", max_tokens=100, messages=messages, tools=tools) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == ANSWER and final.usage.output_tokens == second.usage.output_tokens


def test_the_live_key_check(live: tuple[str, RecordingDecoder]) -> None:
    wrong = anthropic.Anthropic(base_url=live[0], api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model="scripted", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": "invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"}}
