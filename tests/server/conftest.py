"""Fixtures for the Responses and Messages routes: the Qwen3-style template (tools, <think>) over a
scripted decoder that records its prompts, and named-event SSE parsing."""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.decode.decoder import DecodeStep
from engine.decode.sampling import SamplingParams, TokenRng
from engine.model.gguf import read_gguf
from engine.model.tokenizer import Tokenizer
from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app
from tests.conftest import embedded_gguf_path
from tests.server.test_chat_template import QWEN3_LIKE, ScriptedDecoder


class RecordingDecoder(ScriptedDecoder):
    """The scripted decoder, keeping each prompt it was given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.prompts: list[list[int]] = []

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 rng: TokenRng, constraint: object = None) -> Generator[DecodeStep, None, None]:
        """A constraint is ignored: the script is said as it is."""
        self.prompts.append(list(prompt_ids))
        self.params = params
        yield from super().generate(prompt_ids, params, max_tokens, rng)


def scripted_app(**config: Any) -> tuple[FastAPI, RecordingDecoder]:
    """The app over a scripted decoder, with the Qwen3-like template: it renders tools and <think>."""
    _, meta = read_gguf(embedded_gguf_path())
    tokenizer = Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template": QWEN3_LIKE})
    decoder = RecordingDecoder(tokenizer)
    serving = ServingModel(model_id="scripted", tokenizer=tokenizer, context_length=1024, plain=decoder,
                           speculative=None, drafter="none", backend="test", description="scripted replies")
    return create_app(ServerConfig(**config), AsyncEngine(lambda: serving, max_waiting=4)), decoder


@pytest.fixture(scope="module")
def tool_app() -> Iterator[tuple[TestClient, RecordingDecoder]]:
    app, decoder = scripted_app()
    with TestClient(app, base_url="http://localhost") as client:
        yield client, decoder


@pytest.fixture(scope="module")
def tool_client(tool_app: tuple[TestClient, RecordingDecoder]) -> TestClient:
    return tool_app[0]


@pytest.fixture
def tool_decoder(tool_app: tuple[TestClient, RecordingDecoder]) -> RecordingDecoder:
    return tool_app[1]


def named_events(client: TestClient, path: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A stream's (event, data) pairs: every event has exactly one `event:` and one `data:` line."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for block in raw.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][7:], json.loads(lines[1][6:])))
    return events
