"""Reasoning and tool-call parsers on scripted text, split at every boundary."""

from __future__ import annotations

import json

import pytest

from server.chat_output import ChatOutput
from server.reasoning import ReasoningParser
from server.tag_stream import TagStream, partial_tag_length
from server.tool_calls import ToolCallParser

THOUGHT = "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4."
CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def splits(text: str) -> list[list[str]]:
    """The text whole, in single characters, and cut in two and three at every position."""
    out = [[text], list(text)]
    out += [[text[:i], text[i:]] for i in range(1, len(text))]
    out += [[text[:i], text[i:j], text[j:]] for i in range(1, len(text), 3) for j in range(i + 1, len(text), 5)]
    return out


def run_reasoning(pieces: list[str], **kw: bool) -> tuple[str, str]:
    parser = ReasoningParser(**kw)
    got = [parser.feed(p) for p in pieces] + [parser.finish()]
    return "".join(r for r, _ in got), "".join(c for _, c in got)


def test_partial_tag_length() -> None:
    assert partial_tag_length("abc<thi", "<think>") == 4
    assert partial_tag_length("abc", "<think>") == 0
    assert partial_tag_length("<think", "<think>") == 6


def test_tag_stream_closed_flag() -> None:
    stream = TagStream("<a>", "</a>")
    assert stream.feed("x<a></a>y") == [(False, "x", False), (True, "", True), (False, "y", False)]


@pytest.mark.parametrize("pieces", splits(THOUGHT))
def test_reasoning_split_anywhere(pieces: list[str]) -> None:
    assert run_reasoning(pieces) == ("The user wants 2+2. That is 4.\n", "The answer is 4.")


@pytest.mark.parametrize("pieces", splits("Okay, so 4.\n</think>\n\nFour."))
def test_reasoning_opened_by_the_prompt(pieces: list[str]) -> None:
    assert run_reasoning(pieces, thinking=True) == ("Okay, so 4.\n", "Four.")


@pytest.mark.parametrize("text", ["Plain answer, no thoughts.", "a < b <thin", "<think>cut off mid-thou"])
def test_reasoning_edge_cases(text: str) -> None:
    want = {"<think>cut off mid-thou": ("cut off mid-thou", "")}.get(text, ("", text))
    for pieces in splits(text):
        assert run_reasoning(pieces) == want


@pytest.mark.parametrize("pieces", splits(CALLS))
def test_tool_calls_split_anywhere(pieces: list[str]) -> None:
    parser = ToolCallParser()
    got = [parser.feed(p) for p in pieces] + [parser.finish()]
    content = "".join(c for c, _ in got)
    calls = [call for _, cs in got for call in cs]
    assert content == "Let me check."
    assert [c["index"] for c in calls] == [0, 1] and all(c["type"] == "function" for c in calls)
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("text", ["<tool_call>{not json}</tool_call>", "<tool_call>{\"name\": \"f\", \"argu"])
def test_bad_or_cut_tool_calls_stay_content(text: str) -> None:
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    assert content + tail == text and calls == more == [] and parser.num_calls == 0


def test_chat_output_message_with_reasoning_and_tools() -> None:
    output = ChatOutput(reasoning=True, tools=True)
    message = output.message("<think>Need weather.</think>\n\n" + CALLS.split("\n", 1)[1])
    assert message["reasoning_content"] == message["reasoning"] == "Need weather."
    assert message["content"] is None and len(message["tool_calls"]) == 2
    assert "index" not in message["tool_calls"][0] and output.num_tool_calls == 2


def test_chat_output_streamed_deltas() -> None:
    output = ChatOutput(reasoning=True)
    deltas = [output.feed(ch).as_delta() for ch in THOUGHT] + [output.finish().as_delta()]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == "".join(d.get("reasoning", "") for d in deltas) == "The user wants 2+2. That is 4.\n"
    assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."
