"""The assistant's reply as a sequence of blocks (reasoning, text, tool call), each opened, extended and
closed as the text streams: the shape both the Responses API (output items) and the Messages API (content
blocks) send, where chat completions send flat deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from server.chat_output import ChatDelta, ChatOutput

Kind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    kind: Kind
    index: int  # position in the reply
    text: str = ""  # reasoning or answer text; a tool call's arguments (JSON)
    name: str = ""  # a tool call's function
    call_id: str = ""


class BlockEvent(NamedTuple):
    type: Literal["start", "delta", "stop"]
    block: Block
    delta: str = ""


class BlockStream:
    """Fed the engine's text deltas; returns block events. A change of kind closes the open block.

    A tool call arrives whole (the parser holds it until its closing tag): start, one delta, stop.
    """

    def __init__(self, output: ChatOutput) -> None:
        self.output = output
        self.blocks: list[Block] = []
        self._open: Block | None = None

    def feed(self, text: str) -> list[BlockEvent]:
        return self._route(self.output.feed(text))

    def finish(self) -> list[BlockEvent]:
        """The parser's tail, then the open block closed; a reply with nothing in it is one empty text block."""
        events = self._route(self.output.finish())
        if not self.blocks:
            events += self._start("text")
        return events + self._close()

    @property
    def num_tool_calls(self) -> int:
        return sum(block.kind == "tool_call" for block in self.blocks)

    def _route(self, delta: ChatDelta) -> list[BlockEvent]:
        events = self._extend("reasoning", delta.reasoning) + self._extend("text", delta.content)
        for call in delta.tool_calls:
            function = call["function"]
            events += self._close() + self._start("tool_call", function["name"], call["id"])
            events += self._extend("tool_call", function["arguments"]) + self._close()
        return events

    def _extend(self, kind: Kind, text: str) -> list[BlockEvent]:
        if not text:
            return []
        events = [] if self._open is not None and self._open.kind == kind else self._close() + self._start(kind)
        assert self._open is not None
        self._open.text += text
        return events + [BlockEvent("delta", self._open, text)]

    def _start(self, kind: Kind, name: str = "", call_id: str = "") -> list[BlockEvent]:
        self._open = Block(kind, len(self.blocks), name=name, call_id=call_id)
        self.blocks.append(self._open)
        return [BlockEvent("start", self._open)]

    def _close(self) -> list[BlockEvent]:
        block, self._open = self._open, None
        return [] if block is None else [BlockEvent("stop", block)]
