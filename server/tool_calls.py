"""Hermes/Qwen tool calls (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) -> OpenAI tool_calls."""

from __future__ import annotations

import json
import uuid
from typing import Any

from server.tag_stream import Segment, TagStream

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class ToolCallParser:
    """Fed content deltas; returns the content to show and the tool calls completed so far.

    Trailing whitespace is held until real text follows: the newlines around calls are not content.
    """

    def __init__(self) -> None:
        self._tags = TagStream(OPEN, CLOSE)
        self._call = ""  # the body of the call being read
        self._blank = ""
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        return self._route(self._tags.feed(text))

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        content, calls = self._route(self._tags.finish())
        if not self.num_calls:
            content, self._blank = content + self._blank, ""
        if self._call:  # cut off inside a call (max_tokens): show the raw text rather than lose it
            content += OPEN + self._call
            self._call = ""
        return content, calls

    def _route(self, segments: list[Segment]) -> tuple[str, list[dict[str, Any]]]:
        content, calls = "", []
        for seg in segments:
            if not seg.inside:
                content += self._shown(seg.text)
                continue
            self._call += seg.text
            if seg.closed:
                call = self._parse(self._call)
                if call is None:
                    content += OPEN + self._call + CLOSE
                else:
                    calls.append(call)
                    self._blank = ""
                self._call = ""
        return content, calls

    def _shown(self, text: str) -> str:
        self._blank += text
        body = self._blank.rstrip()
        self._blank = self._blank[len(body):]
        return body

    def _parse(self, body: str) -> dict[str, Any] | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        arguments = data.get("arguments", data.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = {"index": self.num_calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": data["name"], "arguments": arguments}}
        self.num_calls += 1
        return call
