"""--chat-template: a file or an inline Jinja string that replaces the model's template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_chat_template(spec: str | None) -> str | None:
    """The template text for a config value: None keeps the model's own."""
    if spec is None:
        return None
    if "{{" in spec or "{%" in spec:  # a template inline, as vLLM and llama.cpp accept it
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template {spec!r} is neither a file nor a Jinja template")
    return path.read_text()


def thinks(template: str | None) -> bool:
    """Whether the template's model reasons in `<think>` blocks."""
    return "<think>" in (template or "")


def supports_tools(template: str | None) -> bool:
    return "tools" in (template or "")


def tool_history_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A tool exchange in plain chat turns, for a template that cannot render one.

    Assistant tool calls become text on the assistant turn and tool results become user turns:
    templates that check roles strictly (user/assistant alternation) accept that, and the model
    still sees what was called and what came back.
    """
    out = []
    for message in messages:
        content = message.get("content") or ""
        if message["role"] == "tool":
            label = message.get("name") or message.get("tool_call_id") or "a tool"
            out.append({"role": "user", "content": f"Result from {label}:\n{content}"})
            continue
        if message.get("tool_calls"):
            calls = "\n".join(describe_call(call) for call in message["tool_calls"])
            content = f"{content}\n{calls}".strip()
        out.append({"role": message["role"], "content": content})
    return out


def describe_call(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f"Called {function.get('name', 'a tool')}({arguments})"
