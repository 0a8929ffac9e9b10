"""The prefix cache through the HTTP app: chat templates' turn boundaries, usage, /health, /metrics.

Tiny random targets over the real SmolLM2 vocabulary (attention-only llama, hybrid qwen3_5) with its
ChatML template and a Qwen3-style template whose generation prompt holds an empty <think> block that
the next turn does not re-render; then the embedded model with its shipped draft.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlx_lm.models.cache import make_prompt_cache

from engine.decode.cache_snapshot import has_recurrent_layers
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.prefix_cache import PrefixCache, common_prefix
from engine.model.tokenizer import Tokenizer
from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import EngineConfig, ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app
from tests.conftest import tiny_llama
from tests.model.test_hybrid import hybrid_config
from tests.server.test_app import sse_events
from tests.server.test_chat_template import QWEN3_LIKE
from tests.tiny_models import build_target

QUESTIONS = [
    "Tell me about the history of the bicycle in a few sentences.",
    "Which of those inventions mattered most, and why?",
    "Summarise our conversation so far in one line.",
]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def tiny_models(gguf_tokenizer: Tokenizer) -> dict[str, Any]:
    vocab = gguf_tokenizer.vocab_size
    return {"attention": tiny_llama(vocab, seed=3), "hybrid": build_target(hybrid_config("qwen3_5", vocab_size=vocab), seed=2)}


def client_for(model: Any, tokenizer: Tokenizer, *, prefix: bool, **config: Any) -> TestClient:
    store = PrefixCache(1 << 30, needs_boundaries=has_recurrent_layers(make_prompt_cache(model))) if prefix else None
    serving = ServingModel(model_id="tiny", tokenizer=tokenizer, context_length=4096,
                           plain=PlainDecoder(model, prefill_chunk=64), speculative=None, drafter="none",
                           backend="test", description="tiny", prefix_cache=store)
    app = create_app(ServerConfig(**config), AsyncEngine(lambda: serving, max_waiting=4))
    return TestClient(app, base_url="http://localhost")


def converse(client: TestClient, **body: Any) -> list[tuple[list[dict], str, dict]]:
    """Three turns; each sends back the previous replies as the client got them."""
    messages: list[dict] = []
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        turns.append((list(messages), content, r.json()["usage"]))
        messages.append({"role": "assistant", "content": content})
    return turns


def render(tokenizer: Tokenizer, messages: list[dict], template: str | None, generation: bool, **kwargs: Any) -> list[int]:
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation, **kwargs)


@pytest.mark.parametrize("kind", ["attention", "hybrid"])
@pytest.mark.parametrize("template", ["chatml", "think"])
def test_turns_reuse_the_previous_turn_less_what_the_template_rewrites(
    kind: str, template: str, tiny_models: dict[str, Any], gguf_tokenizer: Tokenizer
) -> None:
    chat_template = QWEN3_LIKE if template == "think" else None
    body = NO_THINKING if template == "think" else {}
    kwargs = body.get("chat_template_kwargs", {})
    runs = []
    for prefix in (True, False):
        with client_for(tiny_models[kind], gguf_tokenizer, prefix=prefix, chat_template=chat_template) as client:
            runs.append(converse(client, **body))
    warm, cold = runs
    assert [t[1] for t in warm] == [t[1] for t in cold]
    assert [t[2]["prompt_tokens_details"]["cached_tokens"] for t in cold] == [0, 0, 0]
    for (before, _, _), (messages, _, usage) in zip(warm, warm[1:]):
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        previous = render(gguf_tokenizer, before, chat_template, True, **kwargs)
        boundary = len(render(gguf_tokenizer, before, chat_template, False, **kwargs))  # before the header
        prompt = render(gguf_tokenizer, messages, chat_template, True, **kwargs)
        assert usage["prompt_tokens"] == len(prompt)
        if template == "think":  # the next turn re-renders the header without the primed empty <think> block
            shared = common_prefix(np.asarray(prompt), np.asarray(previous))
            assert boundary < shared < len(previous)
            assert cached == (boundary if kind == "hybrid" else shared)
        elif kind == "attention":  # ChatML keeps the whole previous prompt, and the reply as far as it re-tokenizes
            assert cached >= len(previous)
        else:  # a hybrid's state at the reply's end serves only if the reply re-tokenizes exactly
            assert cached >= boundary


def test_usage_reports_cached_tokens_everywhere(tiny_models: dict[str, Any], gguf_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0}
    with client_for(tiny_models["attention"], gguf_tokenizer, prefix=True) as client:
        first = client.post("/v1/chat/completions", json=body).json()["usage"]
        assert first["prompt_tokens_details"] == {"cached_tokens": 0}
        again = client.post("/v1/chat/completions", json=body).json()["usage"]
        assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1
        data = sse_events(client, "/v1/chat/completions",
                          {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert json.loads(data[-2])["usage"]["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1
        prompt = gguf_tokenizer.decode(render(gguf_tokenizer, messages, None, True))
        text = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}).json()["usage"]
        assert text["prompt_tokens_details"]["cached_tokens"] > 0
        # the engine thread stores a reply's cache entry just after the reply is out: read once it settled
        for _ in range(100):
            health = client.get("/health").json()["prefix_cache"]
            metrics = client.get("/metrics").text
            if f'dflash:prefix_cache_bytes{{model_name="tiny"}} {float(health["bytes"])}' in metrics:
                break
            time.sleep(0.05)
        assert health["entries"] >= 1 and 0 < health["bytes"] <= health["max_bytes"]
        assert 'dflash:prefix_cache_hits_total{model_name="tiny"} 3.0' in metrics
        assert 'dflash:prefix_cache_misses_total{model_name="tiny"} 1.0' in metrics
        assert f'dflash:prefix_cache_bytes{{model_name="tiny"}} {float(health["bytes"])}' in metrics
        assert "dflash:prefix_cache_evictions_total" in metrics and "dflash:prefix_cache_reused_tokens_total" in metrics
    with client_for(tiny_models["attention"], gguf_tokenizer, prefix=False) as client:
        assert client.get("/health").json()["prefix_cache"] is None
        assert "prefix_cache" not in client.get("/metrics").text
        usage = client.post("/v1/chat/completions", json=body).json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_previous_response_id_reuses_the_cache_as_a_resent_chat_does(tiny_models: dict[str, Any],
                                                                     gguf_tokenizer: Tokenizer) -> None:
    """A Responses conversation chained by previous_response_id renders the stored turns as the chat
    route renders them resent, so each turn restores what the chat's same turn restores."""
    for kind in ("attention", "hybrid"):
        with client_for(tiny_models[kind], gguf_tokenizer, prefix=True) as client:
            chat = converse(client)
        with client_for(tiny_models[kind], gguf_tokenizer, prefix=True) as client:
            previous, turns = None, []
            for question in QUESTIONS:
                r = client.post("/v1/responses", json={"input": question, "max_output_tokens": 12, "temperature": 0,
                                                       "previous_response_id": previous})
                assert r.status_code == 200, r.text
                previous = r.json()["id"]
                turns.append((r.json()["output"][0]["content"][0]["text"], r.json()["usage"]))
        assert [text for text, _ in turns] == [text for _, text, _ in chat]
        assert [u["input_tokens"] for _, u in turns] == [u["prompt_tokens"] for _, _, u in chat]
        cached = [u["input_tokens_details"]["cached_tokens"] for _, u in turns]
        assert cached == [u["prompt_tokens_details"]["cached_tokens"] for _, _, u in chat], kind
        assert cached[0] == 0 and all(n > 0 for n in cached[1:])


# --- the embedded model with its shipped draft ----------------------------------------------


def serve(**engine: Any) -> TestClient:
    config = ServerConfig(engine=EngineConfig(**engine))
    return TestClient(create_app(config, AsyncEngine(lambda: ServingModel.load(config.engine), max_waiting=4)),
                      base_url="http://localhost")


@pytest.fixture(scope="module")
def embedded_turns() -> Iterator[list[list]]:
    runs = []
    for prefix in (True, False):
        with serve(prefix_cache=prefix) as client:
            runs.append(converse(client))
    yield runs


def test_embedded_model_reuses_the_conversation_and_says_the_same(embedded_turns: list[list]) -> None:
    warm, cold = embedded_turns
    assert [t[1] for t in warm] == [t[1] for t in cold]
    assert all(t[2]["speculative"]["decoder"] == "speculative-dflash" for t in warm)
    cached = [t[2]["prompt_tokens_details"]["cached_tokens"] for t in warm]
    assert cached[0] == 0 and all(t[2]["prompt_tokens_details"]["cached_tokens"] == 0 for t in cold)
    for (_, _, before), (_, _, usage), n in zip(warm, warm[1:], cached[1:]):
        # the previous prompt and its reply (an English reply re-tokenizes as it was generated)
        assert n >= before["prompt_tokens"] + before["completion_tokens"] - 1, (n, before)
        assert n < usage["prompt_tokens"]
