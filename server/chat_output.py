"""The assistant's text, split into reasoning, content and tool calls as it streams."""

from __future__ import annotations

from typing import Any, NamedTuple

from server.reasoning import ReasoningParser
from server.tool_calls import ToolCallParser


class ChatDelta(NamedTuple):
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]]

    def as_delta(self) -> dict[str, Any]:
        """The streamed `delta` object; reasoning goes under both names clients read."""
        delta: dict[str, Any] = {}
        if self.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = self.reasoning
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = self.tool_calls
        return delta


class ChatOutput:
    def __init__(self, *, reasoning: bool = False, thinking: bool = False, tools: bool = False) -> None:
        self.reasoning = ReasoningParser(thinking=thinking) if reasoning else None
        self.tools = ToolCallParser() if tools else None

    @property
    def num_tool_calls(self) -> int:
        return self.tools.num_calls if self.tools else 0

    def feed(self, text: str) -> ChatDelta:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        content, calls = self.tools.feed(content) if self.tools else (content, [])
        return ChatDelta(reasoning, content, calls)

    def finish(self) -> ChatDelta:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        content, calls = self.tools.feed(content) if self.tools else (content, [])
        if self.tools:
            tail, more = self.tools.finish()
            content, calls = content + tail, calls + more
        return ChatDelta(reasoning, content, calls)

    def message(self, text: str) -> dict[str, Any]:
        """The non-streamed `message` for the whole text."""
        a, b = self.feed(text), self.finish()
        content, calls = a.content + b.content, a.tool_calls + b.tool_calls
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if self.reasoning:
            reasoning = a.reasoning + b.reasoning
            message["reasoning_content"] = message["reasoning"] = reasoning or None
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return message
