"""Schemathesis over the live /openapi.json (vLLM's test_openai_schema): positive and negative bodies,
paths and query strings on every route of a real uvicorn over the tiny model. No 5xx, every error is
JSON in its route's shape (OpenAI's, Anthropic's on /v1/messages), every stream ends as its clients
expect and carries no error event."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from live_server import ThreadedServer
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import EngineConfig, ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app

MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))  # per route and mode: about 15 s on two idle CPU cores


@pytest.fixture(scope="module")
def live_url(tiny_serving: ServingModel) -> Iterator[str]:
    config = ServerConfig(engine=EngineConfig(default_max_tokens=16))
    live = ThreadedServer(create_app(config, AsyncEngine(lambda: tiny_serving, max_waiting=64)))
    yield live.url
    live.stop()


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES, deterministic=True)
    return schema


def route_shaped(ctx: Any, response: Any, case: Any) -> None:
    """Errors in the route's shape: Anthropic's on /v1/messages, else {"error": {message, type, param, code}}.
    Streams end as the route's clients expect, with no error event: chat and completions with [DONE],
    Responses with a completed or incomplete response, Messages with message_stop."""
    anthropic = case.path.startswith("/v1/messages")
    if response.status_code >= 400:
        body = json.loads(response.text)
        if anthropic:
            assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}, body
        else:
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str), body
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        names = [line[7:] for line in response.text.split("\n") if line.startswith("event: ")]
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        if case.path == "/v1/responses":
            assert names and names[-1] in ("response.completed", "response.incomplete"), response.text[-300:]
        elif anthropic:
            assert names and names[-1] == "message_stop" and "error" not in names, response.text[-300:]
        else:
            assert events and events[-1] == "[DONE]", response.text[-300:]
            assert not any('"error"' in e and "error" in json.loads(e) for e in events[:-1]), response.text[-300:]
    else:
        assert isinstance(json.loads(response.text), dict)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_openapi_fuzz(case: Any) -> None:
    case.call_and_validate(checks=[not_a_server_error, route_shaped], timeout=60)
