"""--chat-template, chat_template_kwargs, assistant prefill, and reasoning/tool-call output on a Qwen3-like template."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.decode.decoder import DecodeStep
from engine.decode.sampling import SamplingParams, TokenRng
from engine.model.gguf import read_gguf
from engine.model.tokenizer import Tokenizer
from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import ServerConfig
from engine.runtime.serving_model import ServingModel
from server.__main__ import build_config, parse_args
from server.app import create_app
from server.chat_template import load_chat_template
from tests.conftest import embedded_gguf_path
from tests.server.test_app import sse_events

QWEN3_LIKE = """\
{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call a function as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
MSG = [{"role": "user", "content": "Hi"}]
LOCAL = "http://localhost"  # a Host the allowlist accepts


class ScriptedDecoder:
    """Says `script`, one token a step, then the end of turn: real scheduler and detokenizer, known text."""

    name = "plain"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.script = ""

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 rng: TokenRng, constraint: object = None) -> Generator[DecodeStep, None, None]:
        ids = self.tokenizer.encode(self.script) + [self.tokenizer.hf.convert_tokens_to_ids("<|im_end|>")]
        for token in ids[:max_tokens]:
            yield DecodeStep([token], None)

    def supports(self, params: SamplingParams) -> str | None:
        return None


@pytest.fixture(scope="module")
def qwen_tokenizer() -> Tokenizer:
    _, meta = read_gguf(embedded_gguf_path())
    return Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template": QWEN3_LIKE})


@pytest.fixture(scope="module")
def scripted(qwen_tokenizer: Tokenizer) -> Iterator[tuple[TestClient, ScriptedDecoder]]:
    decoder = ScriptedDecoder(qwen_tokenizer)
    serving = ServingModel(model_id="scripted", tokenizer=qwen_tokenizer, context_length=1024, plain=decoder,
                           speculative=None, drafter="none", backend="test", description="scripted replies")
    app = create_app(ServerConfig(), AsyncEngine(lambda: serving, max_waiting=4))
    with TestClient(app, base_url=LOCAL) as client:
        yield client, decoder


def prompt_tokens(client: TestClient, **body: object) -> int:
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1, **body})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_override_and_chat_template_kwargs(tiny_serving: ServingModel, tmp_path: Path) -> None:
    tokenizer = tiny_serving.tokenizer
    path = tmp_path / "qwen3.jinja"
    path.write_text(QWEN3_LIKE)
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for spec in (QWEN3_LIKE, str(path)):
        engine = AsyncEngine(lambda: tiny_serving, max_waiting=4)
        with TestClient(create_app(ServerConfig(chat_template=spec), engine), base_url=LOCAL) as client:
            assert prompt_tokens(client) == len(tokenizer.encode(rendered))
            no_think = prompt_tokens(client, chat_template_kwargs={"enable_thinking": False})
            assert no_think == len(tokenizer.encode(rendered + "<think>\n\n</think>\n\n"))


def test_bad_chat_template_spec() -> None:
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template("/no/such/template.jinja")
    config = build_config(parse_args(["--chat-template", "{{ messages }}", "--reasoning", "off"]))
    assert (config.chat_template, config.reasoning) == ("{{ messages }}", "off")
    run = subprocess.run([sys.executable, "-m", "server", "--chat-template", "/no/such.jinja"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1 and "neither a file nor a Jinja template" in run.stderr.splitlines()[-1]


def test_continue_final_message(scripted: tuple[TestClient, ScriptedDecoder], qwen_tokenizer: Tokenizer) -> None:
    client, decoder = scripted
    decoder.script = " there was a fox."
    messages = [*MSG, {"role": "assistant", "content": "Once upon a time"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "continue_final_message": True,
                                                  "add_generation_prompt": False})
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nOnce upon a time"
    assert r.json()["usage"]["prompt_tokens"] == len(qwen_tokenizer.encode(rendered))
    assert r.json()["choices"][0]["message"]["content"] == " there was a fox."
    r = client.post("/v1/chat/completions", json={"messages": MSG, "continue_final_message": True})
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]


def test_reasoning_non_stream(scripted: tuple[TestClient, ScriptedDecoder]) -> None:
    client, decoder = scripted
    decoder.script = "<think>\nTwo and two make four.\n</think>\n\nIt is 4."
    message = client.post("/v1/chat/completions", json={"messages": MSG}).json()["choices"][0]["message"]
    assert message["content"] == "It is 4."
    assert message["reasoning_content"] == message["reasoning"] == "Two and two make four.\n"


def test_reasoning_stream(scripted: tuple[TestClient, ScriptedDecoder]) -> None:
    client, decoder = scripted
    decoder.script = "<think>\nTwo and two make four.\n</think>\n\nIt is 4."
    data = sse_events(client, "/v1/chat/completions", {"messages": MSG, "stream": True})
    deltas = [json.loads(d)["choices"][0]["delta"] for d in data[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two and two make four.\n"
    assert "".join(d.get("reasoning", "") for d in deltas) == "Two and two make four.\n"
    assert "".join(d.get("content", "") for d in deltas) == "It is 4."
    assert not any("<think>" in d.get("content", "") for d in deltas)


def test_tool_calls_non_stream(scripted: tuple[TestClient, ScriptedDecoder]) -> None:
    client, decoder = scripted
    decoder.script = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    choice = client.post("/v1/chat/completions", json={"messages": MSG, "tools": TOOLS}).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_tool_calls_stream(scripted: tuple[TestClient, ScriptedDecoder]) -> None:
    client, decoder = scripted
    decoder.script = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    data = sse_events(client, "/v1/chat/completions", {"messages": MSG, "tools": TOOLS, "stream": True})
    choices = [json.loads(d)["choices"][0] for d in data[:-1]]
    calls = [c for ch in choices for c in ch["delta"].get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1] and all(c["type"] == "function" and c["id"] for c in calls)
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert "".join(ch["delta"].get("content", "") for ch in choices) == "Checking."
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_tool_markup_is_plain_text_without_tools(scripted: tuple[TestClient, ScriptedDecoder]) -> None:
    client, decoder = scripted
    decoder.script = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    choice = client.post("/v1/chat/completions", json={"messages": MSG}).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == decoder.script
