"""Split streamed text at an open/close tag pair, holding back any tail that may be a split tag."""

from __future__ import annotations

from typing import NamedTuple


class Segment(NamedTuple):
    inside: bool  # between the open and the close tag
    text: str
    closed: bool = False  # an inside segment that ended at its close tag


class TagStream:
    def __init__(self, open_tag: str, close_tag: str, *, inside: bool = False) -> None:
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.inside = inside
        self._buffer = ""

    def feed(self, text: str) -> list[Segment]:
        self._buffer += text
        segments: list[Segment] = []
        while True:
            tag = self.close_tag if self.inside else self.open_tag
            at = self._buffer.find(tag)
            if at < 0:
                break
            if at or self.inside:  # an empty inside segment still says "closed"
                segments.append(Segment(self.inside, self._buffer[:at], closed=self.inside))
            self._buffer = self._buffer[at + len(tag):]
            self.inside = not self.inside
        keep = partial_tag_length(self._buffer, tag)
        if len(self._buffer) > keep:
            segments.append(Segment(self.inside, self._buffer[: len(self._buffer) - keep]))
            self._buffer = self._buffer[len(self._buffer) - keep:]
        return segments

    def finish(self) -> list[Segment]:
        """What is held back at the end, unclosed."""
        text, self._buffer = self._buffer, ""
        return [Segment(self.inside, text)] if text else []


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
