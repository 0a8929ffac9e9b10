"""Structured outputs on the real embedded model (SmolLM2-135M, its shipped DFlash draft): 3 schemas (a flat
object, a nested one with an array and an enum, a forced tool call's arguments), greedy on 7 prompts and at
temperature 0.8 on 5 others. Every reply parses and validates against its schema (jsonschema), and greedy
replies with the draft are those without it, token for token. (All 20 prompts took 13.6 minutes of CI's 2 cores.)"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import EngineConfig, ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app

PROMPTS = [
    "Describe a fictional person.",
    "Tell me about a character from a fantasy novel.",
    "Invent a customer for a bakery.",
    "Describe a scientist who lives in Paris.",
    "Make up a football player.",
    "Give me details about a teacher.",
    "Describe your best friend.",
    "Who is a famous painter? Describe them.",
    "Create a profile for a new employee.",
    "Describe a pirate captain.",
    "Invent a musician from Tokyo.",
    "Describe an astronaut.",
    "Make up a chef who cooks Italian food.",
    "Describe a doctor in a small town.",
    "Tell me about a student who loves math.",
    "Describe a detective from London.",
    "Invent a gardener.",
    "Describe a software engineer.",
    "Make up a farmer from Kansas.",
    "Describe a librarian.",
]
FLAT = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
                   "city": {"type": "string", "maxLength": 16}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "priority": {"enum": ["low", "medium", "high"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 2},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                   "active": {"type": "boolean"}},
                  "required": ["name", "active"], "additionalProperties": False},
    },
    "required": ["title", "priority", "tags", "owner"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer"}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather forecast for a city",
                                           "parameters": WEATHER}}]
GREEDY_PROMPTS = PROMPTS[::3]
SAMPLED_PROMPTS = PROMPTS[1::4]
MAX_TOKENS = 128  # the schemas bound every reply below this (strings have a maxLength, arrays a maxItems)


def body(kind: str, prompt: str, temperature: float) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                           "temperature": temperature, "seed": 7}
    if kind == "tool":
        return {**out, "messages": [{"role": "user", "content": f"{prompt} Then get the weather where they live."}],
                "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    schema = FLAT if kind == "flat" else NESTED
    return {**out, "response_format": {"type": "json_schema", "json_schema": {"name": kind, "schema": schema,
                                                                              "strict": True}}}


def reply(client: TestClient, kind: str, prompt: str, temperature: float) -> tuple[Any, dict[str, Any]]:
    r = client.post("/v1/chat/completions", json=body(kind, prompt, temperature))
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    message = choice["message"]
    if kind == "tool":
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = message["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        value = json.loads(call["function"]["arguments"])
        jsonschema.validate(value, WEATHER)
    else:
        assert choice["finish_reason"] == "stop", choice
        value = json.loads(message["content"])
        jsonschema.validate(value, FLAT if kind == "flat" else NESTED)
    return value, usage


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[TestClient, TestClient]]:
    """The served embedded model with its draft, and the same loaded model without it. The draft verifies a fixed
    width (blocks of 4): the adaptive width turns to plain steps where drafts are not kept, and this is a test of
    the constrained verify path."""
    served = ServingModel.load(EngineConfig(block_size=4))
    assert served.speculative is not None
    served.speculative.adaptive = False
    bare = dataclasses.replace(served, speculative=None, drafter="none", prefix_cache=None)
    apps = [create_app(ServerConfig(), AsyncEngine(lambda s=s: s, max_waiting=4)) for s in (served, bare)]
    with TestClient(apps[0], base_url="http://localhost") as drafted, \
            TestClient(apps[1], base_url="http://localhost") as plain:
        yield drafted, plain


@pytest.mark.parametrize("kind", ["flat", "nested", "tool"])
def test_greedy_replies_validate_and_the_draft_changes_nothing(clients: tuple[TestClient, TestClient],
                                                               kind: str) -> None:
    drafted, plain = clients
    accepted = 0
    for prompt in GREEDY_PROMPTS:
        with_draft, usage = reply(drafted, kind, prompt, 0.0)
        without, plain_usage = reply(plain, kind, prompt, 0.0)
        assert with_draft == without, prompt
        assert usage["completion_tokens"] == plain_usage["completion_tokens"]
        assert usage["speculative"]["decoder"].startswith("speculative") and plain_usage["speculative"]["decoder"] == "plain"
        accepted += usage["speculative"]["accepted_tokens"]
    assert accepted > 0  # the draft's tokens were kept under the constraint


@pytest.mark.parametrize("kind", ["flat", "nested", "tool"])
def test_sampled_replies_validate(clients: tuple[TestClient, TestClient], kind: str) -> None:
    drafted, _ = clients
    values = [reply(drafted, kind, prompt, 0.8)[0] for prompt in SAMPLED_PROMPTS]
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 1


def test_json_mode_streams_and_max_tokens_cuts_with_length(clients: tuple[TestClient, TestClient]) -> None:
    drafted, _ = clients
    request = {"messages": [{"role": "user", "content": "Describe a cat as JSON."}], "temperature": 0,
               "response_format": {"type": "json_object"}, "stream": True, "max_tokens": MAX_TOKENS}
    for max_tokens in (MAX_TOKENS, 6):
        with drafted.stream("POST", "/v1/chat/completions", json={**request, "max_tokens": max_tokens}) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
        if max_tokens == 6:  # the object is cut: the client is told it is incomplete
            assert finish == "length"
            with pytest.raises(ValueError):
                json.loads(text)
        elif finish == "stop":  # a free-form object may also run past max_tokens
            assert isinstance(json.loads(text), dict)


def test_a_bad_schema_is_a_400_naming_the_keyword(clients: tuple[TestClient, TestClient]) -> None:
    drafted, _ = clients
    bad = {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}
    request = body("flat", PROMPTS[0], 0.0)
    request["response_format"]["json_schema"]["schema"] = bad
    r = drafted.post("/v1/chat/completions", json=request)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    assert "'pattern'" in error["message"] and "/properties/zip" in error["message"]
