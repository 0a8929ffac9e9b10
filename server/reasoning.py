"""Reasoning (`<think>...</think>`) split from the answer, incrementally, for reasoning_content/reasoning."""

from __future__ import annotations

from server.tag_stream import TagStream

OPEN, CLOSE = "<think>", "</think>"


class ReasoningParser:
    """Fed text deltas; returns (reasoning, content) deltas.

    `thinking` says the prompt already opened `<think>` (templates that start the reasoning themselves).
    Whitespace right after either tag is dropped: models write `<think>\\n` and `</think>\\n\\n`.
    """

    def __init__(self, *, thinking: bool = False) -> None:
        self._tags = TagStream(OPEN, CLOSE, inside=thinking)
        self._strip = {True: True, False: False}  # per part: drop leading whitespace (after a tag)

    def feed(self, text: str) -> tuple[str, str]:
        return self._split(self._tags.feed(text))

    def finish(self) -> tuple[str, str]:
        return self._split(self._tags.finish())

    def _split(self, segments: list) -> tuple[str, str]:
        parts = {True: "", False: ""}
        for seg in segments:
            text = seg.text.lstrip() if self._strip[seg.inside] else seg.text
            if text:
                self._strip[seg.inside] = False
            parts[seg.inside] += text
            if seg.closed:
                self._strip[False] = True  # the answer starts after "</think>\n\n"
        return parts[True], parts[False]
