"""OpenAI Responses API request (`POST /v1/responses`), read into the chat request it renders as.

Unknown fields are ignored, like the chat route's (clients send `include`, `reasoning`, `truncation`...);
what this server cannot do (images, files, hosted tools forced by tool_choice) is a 400; `text.format` json_schema
and json_object become chat's response_format (structured outputs).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from server.protocol import SamplingFields, chat_tool

TEXT_PARTS = ("input_text", "output_text")


class InputContent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def text_only(self) -> InputContent:
        if self.type not in TEXT_PARTS:
            raise ValueError(f"content part type {self.type!r} is not supported: this model reads text only")
        if self.text is None:
            raise ValueError(f"an {self.type} part needs 'text'")
        return self


def joined(content: str | list[InputContent] | None) -> str:
    if isinstance(content, list):
        return "".join(part.text or "" for part in content)
    return content or ""


class InputItem(BaseModel):
    """A message, a function call the model made, its output, or a reasoning item (sent back, not rendered)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[InputContent] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputContent] | None = None

    @model_validator(mode="before")
    @classmethod
    def reasoning_unread(cls, data: Any) -> Any:
        # a reasoning item sent back (its reasoning_text or encrypted content) is not rendered: keep none of it
        return {"type": "reasoning"} if isinstance(data, dict) and data.get("type") == "reasoning" else data

    @model_validator(mode="after")
    def required_fields(self) -> InputItem:
        needed = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                  "function_call_output": ("call_id", "output"), "reasoning": ()}[self.type]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(repr(k) for k in missing)}")
        return self


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @model_validator(mode="after")
    def named(self) -> FunctionTool:
        if self.type == "function" and not self.name:
            raise ValueError('a function tool is flat in the Responses API: {"type": "function", "name": ..., '
                             '"parameters": {...}}')
        return self

    def for_chat(self) -> dict[str, Any]:
        assert self.name is not None
        return chat_tool(self.name, self.description, self.parameters)


class TextFormat(BaseModel):
    """`text`, `json_object`, or `json_schema` with its fields flat: {"type", "name", "schema", "strict"}."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: str = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def known(self) -> TextFormat:
        if self.type not in ("text", "json_object", "json_schema"):
            raise ValueError(f"format type {self.type!r} is not supported: use text, json_object or json_schema")
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('a json_schema format needs its "schema"')
        return self

    def response_format(self) -> dict[str, Any] | None:
        """As chat's response_format."""
        if self.type == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": self.name or "schema", "schema": self.json_schema,
                                                           "strict": self.strict}}
        return {"type": self.type} if self.type != "text" else None

    def echo(self) -> dict[str, Any]:
        """The format as the response object shows it."""
        return self.model_dump(by_alias=True, exclude_none=True)


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(SamplingFields):
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    previous_response_id: str | None = None
    store: StrictBool = True
    metadata: dict[str, str] | None = None
    parallel_tool_calls: StrictBool = True

    @field_validator("tool_choice")
    @classmethod
    def check_tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(choice, str) and choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be \"auto\", \"none\", \"required\" or a function, got {choice!r}")
        if isinstance(choice, dict) and (choice.get("type") != "function" or not isinstance(choice.get("name"), str)):
            raise ValueError('a tool_choice object names a function: {"type": "function", "name": ...}')
        return choice

    @model_validator(mode="after")
    def has_input(self) -> ResponsesRequest:
        if self.input is None and self.previous_response_id is None:
            raise ValueError("input is required")
        if isinstance(self.input, list) and not self.input and self.previous_response_id is None:
            raise ValueError("input must not be empty")
        return self

    @property
    def items(self) -> list[InputItem]:
        if isinstance(self.input, str):
            return [InputItem(role="user", content=self.input)]
        return list(self.input or [])

    @property
    def function_tools(self) -> list[FunctionTool]:
        """Hosted tools (web search, file search...) cannot run here: only functions reach the prompt."""
        return [tool for tool in self.tools or [] if tool.type == "function"]

    def chat_fields(self, history: list[InputItem]) -> dict[str, Any]:
        """The chat completion request this renders as: `history` is the whole conversation's items."""
        fields = self.model_dump(include=set(SamplingFields.model_fields))
        choice = self.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice["name"]}}
        tools = [tool.for_chat() for tool in self.function_tools]
        return {**fields, "messages": chat_messages(self.instructions, history), "tools": tools or None,
                "tool_choice": choice, "max_completion_tokens": self.max_output_tokens,
                "response_format": self.text.format.response_format()}


def chat_messages(instructions: str | None, items: list[InputItem]) -> list[dict[str, Any]]:
    """Items as chat messages: a function call joins the assistant turn before it (the text the model
    wrote with it, or the calls it made alongside); reasoning items are dropped, as chat templates drop
    earlier turns' reasoning."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}  # call_id -> function, so a tool result says which tool it came from
    for item in items:
        if item.type == "message":
            messages.append({"role": item.role, "content": joined(item.content)})
        elif item.type == "function_call":
            assert item.call_id is not None and item.name is not None
            names[item.call_id] = item.name
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif item.type == "function_call_output":
            assert item.call_id is not None
            messages.append({"role": "tool", "tool_call_id": item.call_id, "name": names.get(item.call_id),
                             "content": joined(item.output)})
    return messages
