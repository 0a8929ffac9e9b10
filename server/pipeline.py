"""The request path every generating route shares: model check, chat rendering, sampling, the engine
request, submission, SSE framing and cancellation. Chat completions, Responses and Messages differ only
in how they read a request and shape what comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from engine.decode.sampling import SamplingParams
from engine.grammar.constraint import compile_spec, json_object_spec, json_schema_spec, tool_call_spec
from engine.grammar.schema import SchemaError
from engine.runtime.async_engine import AsyncEngine, EngineDead
from engine.runtime.config import ServerConfig
from engine.runtime.request import Request as EngineRequest
from engine.runtime.request import RequestOutput
from engine.runtime.scheduler import EngineBusy
from server.chat_output import ChatOutput
from server.chat_template import (
    load_chat_template,
    supports_tools,
    thinks,
    tool_history_as_text,
)
from server.errors import OpenAIError
from server.protocol import ChatCompletionRequest, SamplingFields
from server.responses import TokenText

log = logging.getLogger("dflash.server")
T = TypeVar("T")

TOOLS_IGNORED_HEADER = "x-dflash-tools-ignored"
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"  # what server/tool_calls.py parses


class ChatRun(NamedTuple):
    """A chat request submitted to the engine: its deltas, their parser, and what the response says of it."""

    outputs: AsyncIterator[RequestOutput]
    output: ChatOutput
    num_prompt_tokens: int
    headers: dict[str, str]


class Pipeline:
    def __init__(self, config: ServerConfig, engine: AsyncEngine) -> None:
        self.config = config
        self.engine = engine
        self._token_text: TokenText | None = None
        self._chat_template = load_chat_template(config.chat_template)
        self._warned_tools = False  # the tools-left-out warning is logged once per process

    @property
    def served(self) -> Any:
        if self.engine.model is None:
            raise OpenAIError(503, "the model is still loading", headers={"Retry-After": "1"})
        return self.engine.model

    @property
    def chat_template(self) -> str | None:
        return self._chat_template or self.served.tokenizer.chat_template

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.served.model_id

    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.served.tokenizer)
        return self._token_text

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, self.served.model_id):
            raise OpenAIError(404, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")

    def sampling_params(self, body: SamplingFields, logprobs: bool, top_logprobs: int) -> SamplingParams:
        vocab = self.served.tokenizer.vocab_size
        bias = []
        for key, value in (body.logit_bias or {}).items():
            if not 0 <= int(key) < vocab:
                raise OpenAIError(400, f"logit_bias token id {key} is outside the vocabulary [0, {vocab})", param="logit_bias")
            bias.append((int(key), float(value)))
        temperature = body.temperature if body.temperature is not None else self.config.engine.default_temperature
        return SamplingParams(
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else 1.0,
            top_k=max(body.top_k or 0, 0),
            min_p=body.min_p or 0.0,
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            logit_bias=tuple(bias),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    def make_request(self, body: SamplingFields, prompt_ids: list[int], limit: int | None, default_limit: int,
                     params: SamplingParams, limit_param: str = "max_tokens") -> EngineRequest:
        """`limit_param`: the request field `limit` came from, as the client named it."""
        context = self.served.context_length
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if limit is not None and num_prompt + limit > context:
            raise OpenAIError(
                400,
                f"this model's maximum context length is {context} tokens, but {num_prompt} prompt tokens "
                f"+ {limit} {limit_param} = {num_prompt + limit} were requested; reduce the prompt or {limit_param}",
                param=limit_param, code="context_length_exceeded",
            )
        if num_prompt >= context:
            raise OpenAIError(400, f"the prompt has {num_prompt} tokens but this model's maximum context length is "
                                   f"{context} tokens", param="messages", code="context_length_exceeded")
        max_tokens = limit if limit is not None else min(default_limit, context - num_prompt)
        return EngineRequest(uuid.uuid4().hex, prompt_ids, params, max_tokens, body.stop_strings())

    def submit(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        try:
            return self.engine.submit(request)
        except EngineBusy as e:
            raise OpenAIError(503, str(e), type="server_busy", headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise OpenAIError(503, f"the engine is down: {e}", type="server_error") from None

    # --- chat ----------------------------------------------------------------------------
    def start_chat(self, body: ChatCompletionRequest, limit_param: str = "max_tokens",
                   format_param: str = "response_format") -> ChatRun:
        """Render, check and submit a chat request; raises OpenAIError before anything is sent."""
        self.check_model(body.model)
        grammar = self.grammar(body, format_param)
        prompt_ids, renders_tools = self.prompt(body)
        params = self.sampling_params(body, body.logprobs, body.top_logprobs or 0)
        params = dataclasses.replace(params, grammar=grammar)
        request = self.make_request(body, prompt_ids, body.token_limit, self.config.engine.default_max_tokens, params,
                                    limit_param)
        request.num_stable_prompt_tokens = self.stable_prefix(body, renders_tools, prompt_ids)
        output = self.chat_output(prompt_ids, renders_tools or body.forces_tool_call, constrained=grammar is not None)
        # the client sent tools that this template cannot show the model: say so, as a header
        headers = {TOOLS_IGNORED_HEADER: "true"} if body.uses_tools and not renders_tools and not body.forces_tool_call else {}
        return ChatRun(self.submit(request), output, len(prompt_ids), headers)

    # --- structured outputs ----------------------------------------------------------------
    def grammar(self, body: ChatCompletionRequest, format_param: str = "response_format") -> str | None:
        """The grammar the reply must follow (engine/grammar), compiled here so a bad schema is a 400 before
        anything runs: a forced tool call's, else response_format's, else None."""
        if body.forces_tool_call:
            spec, param, what = self.tool_grammar(body), "tool_choice", "the tool's parameters"
        else:
            fmt = body.response_format
            if fmt is None:
                return None
            kind = fmt.get("type", "text")
            if kind not in RESPONSE_FORMATS:
                raise OpenAIError(400, f"response_format type {kind!r} is not supported: use one of "
                                  f"{', '.join(RESPONSE_FORMATS)}", param=format_param)
            if kind == "text":
                return None
            if kind == "json_object":
                spec, what = json_object_spec(), "JSON mode"
            else:
                inner = fmt.get("json_schema")
                if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                    raise OpenAIError(400, 'response_format json_schema needs {"type": "json_schema", "json_schema": '
                                      '{"name": ..., "schema": {...}}}', param=format_param)
                spec, what = json_schema_spec(inner["schema"]), f"response_format {inner.get('name', 'schema')!r}"
            param = format_param
        try:
            compile_spec(spec)
        except SchemaError as e:
            raise OpenAIError(400, f"invalid schema for {what}: {e}", param=param, code="invalid_schema") from None
        except RecursionError:
            raise OpenAIError(400, f"invalid schema for {what}: it nests too deeply", param=param,
                              code="invalid_schema") from None
        return spec

    def tool_grammar(self, body: ChatCompletionRequest) -> str:
        """A forced call: `<tool_call>{"name": ..., "arguments": ...}</tool_call>` of the named tool, or of any
        of the tools for "required"; the arguments follow the tool's parameters schema."""
        tools = []
        for tool in body.tools or []:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or tool.get("type", "function") != "function" \
                    or not isinstance(function.get("name"), str):
                raise OpenAIError(400, 'a tool is {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                                  param="tools")
            tools.append((function["name"], function.get("parameters")))
        if isinstance(body.tool_choice, dict):
            name = body.tool_choice["function"]["name"]
            tools = [tool for tool in tools if tool[0] == name]
            if not tools:
                raise OpenAIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return tool_call_spec(tools[:1] if isinstance(body.tool_choice, dict) else tools, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

    def prompt(self, body: ChatCompletionRequest) -> tuple[list[int], bool]:
        """The prompt's token ids, and whether the request's tools are in it."""
        renders_tools = self.renders_tools(body)
        return self.render_chat(body, renders_tools), renders_tools

    def renders_tools(self, body: ChatCompletionRequest) -> bool:
        """Whether the template renders the request's tools into the prompt.

        Chat UIs (Open WebUI's native mode) send their tools with every chat whatever the model, as
        mlx_lm.server and llama.cpp answer them: with tool_choice auto or none they are left out here. A
        forced call on such a template is described in a system message instead (render_chat), and the
        reply is constrained to the call.
        """
        if not body.uses_tools:
            return False
        if supports_tools(self.chat_template):
            return True
        if body.forces_tool_call:
            return False
        if not self._warned_tools:
            self._warned_tools = True
            log.warning("this model's chat template does not support tools: requests' tools are left out of the "
                        "prompt (responses carry %s: true); --chat-template can supply one that renders them",
                        TOOLS_IGNORED_HEADER)
        return False

    def render_chat(self, body: ChatCompletionRequest, renders_tools: bool, generation_prompt: bool | None = None) -> list[int]:
        tokenizer = self.served.tokenizer
        if generation_prompt is None:
            generation_prompt = body.generation_prompt
        kwargs = dict(body.chat_template_kwargs or {})
        messages = [m.for_template() for m in body.messages]
        if renders_tools:
            kwargs["tools"] = body.tools
        elif not supports_tools(self.chat_template):  # an earlier tool exchange, as plain turns
            messages = tool_history_as_text(messages)
            if body.forces_tool_call:  # the template cannot show tools: a system message does
                messages = with_tool_instructions(messages, body)
        if body.continue_final_message:  # assistant prefill: the reply continues the last message
            kwargs["continue_final_message"] = True
        try:
            return tokenizer.apply_chat_template(messages, chat_template=self._chat_template,
                                                 add_generation_prompt=generation_prompt, **kwargs)
        except Exception as e:  # a template error is the request's fault (roles, kwargs)
            raise OpenAIError(400, f"cannot apply the chat template: {e}", param="messages") from None

    def stable_prefix(self, body: ChatCompletionRequest, renders_tools: bool, prompt_ids: list[int]) -> int | None:
        """The prompt's tokens before its generation header, where the next turn of the chat diverges (a
        re-rendered reply drops what the header primed, e.g. <think>): a hybrid target's prefix cache
        keeps its recurrent state there."""
        cache = self.served.prefix_cache
        if not body.generation_prompt or cache is None or not cache.needs_boundaries:
            return None
        head = self.render_chat(body, renders_tools, generation_prompt=False)
        return len(head) if 0 < len(head) < len(prompt_ids) and prompt_ids[: len(head)] == head else None

    def chat_output(self, prompt_ids: list[int], renders_tools: bool, constrained: bool = False) -> ChatOutput:
        """`constrained`: the grammar starts at the first generated token, so the reply has no reasoning part."""
        mode = self.config.reasoning
        reasoning = not constrained and (mode == "on" or (mode == "auto" and thinks(self.chat_template)))
        # some templates open <think> in the generation prompt: the reply starts mid-thought
        thinking = reasoning and self.served.tokenizer.decode(prompt_ids[-4:]).rstrip().endswith("<think>")
        return ChatOutput(reasoning=reasoning, thinking=thinking, tools=renders_tools)

    # --- streaming -----------------------------------------------------------------------
    def event_stream(self, frames: AsyncIterator[dict[str, str]], headers: dict[str, str] | None = None,
                     ping: Callable[[], ServerSentEvent] | None = None) -> EventSourceResponse:
        """SSE with keep-alives during long prefills (a comment unless `ping` makes an event)."""
        return EventSourceResponse(frames, ping=self.config.keepalive_seconds, sep="\n", ping_message_factory=ping,
                                   headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache", **(headers or {})})


def with_tool_instructions(messages: list[dict[str, Any]], body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """A forced tool call on a template without tools: the functions and the call's form, as a system message
    (joined to the first one if there is one). The reply is constrained to the call anyway; this tells the
    model what the arguments mean."""
    tools = body.tools or []
    if isinstance(body.tool_choice, dict):
        name = body.tool_choice["function"]["name"]
        tools = [t for t in tools if (t.get("function") or {}).get("name") == name]
    listed = "\n".join(json.dumps(t.get("function"), ensure_ascii=False) for t in tools)
    note = ("You call functions. Answer with one call, as JSON inside tags:\n"
            '<tool_call>\n{"name": <function name>, "arguments": <the arguments as a JSON object>}\n</tool_call>\n'
            f"Functions:\n{listed}")
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}".strip()}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def chat_request(fields: dict[str, Any]) -> ChatCompletionRequest:
    """The chat request another API's request renders as; what it refuses is the client's error (400)."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


async def collect(outputs: AsyncIterator[RequestOutput]) -> tuple[str, list, RequestOutput]:
    parts: list[str] = []
    entries: list = []
    last: RequestOutput | None = None
    async for out in outputs:
        parts.append(out.text)
        entries.extend(out.logprobs or [])
        last = out
    assert last is not None and last.finish_reason is not None
    return "".join(parts), entries, last


async def with_cancellation(raw: Request, work: Awaitable[T]) -> T | Response:
    """Race a non-streaming handler against the client's disconnect (vLLM's pattern)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(raw))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()  # closes the delta stream, which aborts the request in the engine
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    return Response(status_code=499)


async def _disconnected(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
