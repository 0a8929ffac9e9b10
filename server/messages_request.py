"""Anthropic Messages API request (`POST /v1/messages`, `/v1/messages/count_tokens`), read into the chat
request it renders as.

Unknown fields are ignored (`metadata`, `thinking`, `cache_control`, `service_tier`...). Sampling
fields the current SDK only sends through extra_body (`temperature`, `top_p`, `top_k`) are read, as are
the chat route's extensions (`seed`, `min_p`, penalties). Images, documents and structured output
(`output_config.format`) are a 400.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from server.protocol import MAX_STOP_SEQUENCES, SamplingFields, chat_tool

NEEDED = {"text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",), "thinking": ()}


class ContentBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def thinking_unread(cls, data: Any) -> Any:
        # earlier turns' thinking is not rendered (chat templates drop it): keep none of it
        if isinstance(data, dict) and data.get("type") in ("thinking", "redacted_thinking"):
            return {"type": "thinking"}
        return data

    @model_validator(mode="after")
    def required_fields(self) -> ContentBlock:
        if self.type not in NEEDED:
            raise ValueError(f"content block type {self.type!r} is not supported: this model reads text only")
        missing = [key for key in NEEDED[self.type] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"a {self.type} block needs {', '.join(repr(k) for k in missing)}")
        return self

    def result_text(self) -> str:
        text = joined(self.content)
        return f"Error: {text}" if self.is_error else text


def joined(content: str | list[ContentBlock] | None) -> str:
    # separate blocks are separate paragraphs (coding CLIs send reminders and the prompt as two blocks)
    if isinstance(content, list):
        return "\n".join(block.text for block in content if block.type == "text" and block.text is not None)
    return content or ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class SystemBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Tool(BaseModel):
    """A client tool (`input_schema`); server tools (`type` like "web_search_20250305") cannot run here."""

    model_config = ConfigDict(extra="ignore")
    name: str
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    @property
    def is_client_tool(self) -> bool:
        return self.type in (None, "custom")

    def for_chat(self) -> dict[str, Any]:
        return chat_tool(self.name, self.description, self.input_schema)


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None

    @model_validator(mode="after")
    def named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError('tool_choice {"type": "tool"} needs the tool\'s "name"')
        return self

    def for_chat(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def no_format(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        if fmt is not None:
            raise ValueError(f"format type {fmt.get('type')!r} is not supported: this server has no structured "
                             "outputs yet; leave output_config.format out")
        return fmt


class CountTokensRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    system: str | list[SystemBlock] | None = None
    stop_sequences: list[str] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None

    @field_validator("stop_sequences")
    @classmethod
    def check_stop_sequences(cls, stops: list[str] | None) -> list[str] | None:
        if stops is not None and len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        return stops

    @property
    def client_tools(self) -> list[Tool]:
        return [tool for tool in self.tools or [] if tool.is_client_tool]

    @property
    def prefills(self) -> bool:
        """A last assistant turn of text is a prefill: the reply continues it."""
        last = self.messages[-1]
        if last.role != "assistant":
            return False
        return isinstance(last.content, str) or not any(block.type == "tool_use" for block in last.content)

    def stop_strings(self) -> tuple[str, ...]:
        return super().stop_strings() + tuple(self.stop_sequences or ())

    def chat_fields(self) -> dict[str, Any]:
        """The chat completion request this renders as."""
        fields = self.model_dump(include=set(SamplingFields.model_fields))
        system = joined(self.system if isinstance(self.system, str) else
                        [ContentBlock(type="text", text=b.text) for b in self.system or []])
        tools = [tool.for_chat() for tool in self.client_tools]
        return {**fields, "messages": chat_messages(system, self.messages), "tools": tools or None,
                "tool_choice": self.tool_choice.for_chat() if self.tool_choice else None,
                "stop": list(self.stop_strings()) or None,
                "continue_final_message": self.prefills, "add_generation_prompt": not self.prefills}


class MessagesRequest(CountTokensRequest):
    max_tokens: StrictInt = Field(ge=1)


def chat_messages(system: str, messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as chat messages: tool_use blocks become the assistant turn's tool calls, and tool_result
    blocks tool messages ahead of the user's text (Anthropic puts them first in the user turn)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    names: dict[str, str] = {}  # tool_use id -> tool, so a result says which tool it came from
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        calls, num_results = [], 0
        for block in message.content:
            if block.type == "tool_use":
                assert block.id is not None and block.name is not None
                names[block.id] = block.name
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
            elif block.type == "tool_result":
                assert block.tool_use_id is not None
                num_results += 1
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "name": names.get(block.tool_use_id),
                            "content": block.result_text()})
        text = joined(message.content)
        if calls:
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif text or not num_results:  # a user turn of tool results only is those tool messages
            out.append({"role": message.role, "content": text})
    return out
