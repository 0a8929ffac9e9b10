"""Schemathesis over the live /openapi.json (vLLM's test_openai_schema): positive and negative bodies,
paths and query strings on every route of a real uvicorn over the tiny model. No 5xx, every error is
OpenAI-shaped JSON, every stream ends with [DONE] and carries no error event."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from live_server import free_port
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
    app = create_app(config, AsyncEngine(lambda: tiny_serving, max_waiting=64))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="fuzz-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES, deterministic=True)
    return schema


def openai_shaped(ctx: Any, response: Any, case: Any) -> None:
    """Errors are {"error": {message, type, param, code}}; streams end with [DONE] and no error event."""
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str), body
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        assert not any('"error"' in e and "error" in json.loads(e) for e in events[:-1]), response.text[-300:]
    else:
        assert isinstance(json.loads(response.text), dict)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_openapi_fuzz(case: Any) -> None:
    case.call_and_validate(checks=[not_a_server_error, openai_shaped], timeout=60)
