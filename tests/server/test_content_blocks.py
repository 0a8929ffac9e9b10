"""BlockStream: a streamed reply as reasoning, text and tool-call blocks, opened, extended and closed."""

from __future__ import annotations

import json

from server.chat_output import ChatOutput
from server.content_blocks import BlockEvent, BlockStream

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def run(text: str, pieces: int = 3, **output: bool) -> tuple[BlockStream, list[BlockEvent]]:
    """Feed `text` in chunks of `pieces` characters (tags split across chunks), then finish."""
    stream = BlockStream(ChatOutput(**output))
    events = [e for i in range(0, len(text), pieces) for e in stream.feed(text[i:i + pieces])]
    return stream, events + stream.finish()


def shape(events: list[BlockEvent]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for e in events:
        if not out or out[-1] != (e.type, e.block.kind) or e.type != "delta":  # runs of deltas as one
            out.append((e.type, e.block.kind))
    return out


def test_reasoning_then_text_then_calls() -> None:
    stream, events = run(f"<think>\nTwo and two.\n</think>\n\nChecking.\n{CALL}\n{CALL}", reasoning=True, tools=True)
    assert shape(events) == [("start", "reasoning"), ("delta", "reasoning"), ("stop", "reasoning"),
                             ("start", "text"), ("delta", "text"), ("stop", "text"),
                             ("start", "tool_call"), ("delta", "tool_call"), ("stop", "tool_call"),
                             ("start", "tool_call"), ("delta", "tool_call"), ("stop", "tool_call")]
    reasoning, text, first, second = stream.blocks
    assert (reasoning.text, text.text) == ("Two and two.\n", "Checking.")
    assert [b.index for b in stream.blocks] == [0, 1, 2, 3] and stream.num_tool_calls == 2
    assert first.name == "get_weather" and json.loads(first.text) == {"city": "Paris"}
    assert first.call_id.startswith("call_") and first.call_id != second.call_id


def test_every_block_closes_once_and_deltas_add_up() -> None:
    _, events = run(f"<think>a</think>b{CALL}c", pieces=1, reasoning=True, tools=True)
    starts = [e.block.index for e in events if e.type == "start"]
    stops = [e.block.index for e in events if e.type == "stop"]
    assert starts == stops == sorted(set(starts))
    for index in starts:
        block = next(e.block for e in events if e.block.index == index)
        assert "".join(e.delta for e in events if e.type == "delta" and e.block.index == index) == block.text


def test_an_empty_reply_is_one_empty_text_block() -> None:
    stream, events = run("")
    assert [(e.type, e.block.kind, e.block.text) for e in events] == [("start", "text", ""), ("stop", "text", "")]
    assert len(stream.blocks) == 1


def test_without_parsers_everything_is_text() -> None:
    stream, events = run(f"<think>x</think>{CALL}")
    assert shape(events) == [("start", "text"), ("delta", "text"), ("stop", "text")]
    assert stream.blocks[0].text == f"<think>x</think>{CALL}"
