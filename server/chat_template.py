"""--chat-template: a file or an inline Jinja string that replaces the model's template."""

from __future__ import annotations

from pathlib import Path


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
