"""OpenAI Responses API: `POST /v1/responses` (streamed or not), `GET` and `DELETE /v1/responses/{id}`.

A thin layer over the chat request path: the input items render through the chat template as chat
messages would, and the reply's blocks (reasoning, text, function calls) become output items.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.runtime.request import FinishReason, RequestOutput, Usage
from server.content_blocks import Block, BlockEvent, BlockStream
from server.errors import OpenAIError
from server.pipeline import (
    TOOLS_IGNORED_HEADER,
    ChatRun,
    Pipeline,
    chat_request,
    collect,
    with_cancellation,
)
from server.response_store import ResponseStore, StoredResponse
from server.responses import speculative_dict
from server.responses_request import InputItem, ResponsesRequest

log = logging.getLogger("dflash.server")

ITEM_PREFIX = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}
ABORTED = "the request was aborted: the server is shutting down"


class ResponsesApi:
    def __init__(self, pipeline: Pipeline, store: ResponseStore) -> None:
        self.pipeline = pipeline
        self.store = store

    async def create(self, body: ResponsesRequest, raw: Request) -> Response:
        history = self.earlier_items(body.previous_response_id) + body.items
        run = self.pipeline.start_chat(chat_request(body.chat_fields(history)), limit_param="max_output_tokens",
                                    format_param="text.format")
        reply = Reply(body, history, self.pipeline.model_name, self.pipeline.config.engine.default_temperature)
        headers = dict(run.headers)
        if len(body.function_tools) < len(body.tools or []):  # hosted tools (web search...) cannot run here
            headers[TOOLS_IGNORED_HEADER] = "true"
        if body.stream:
            return self.pipeline.event_stream(self.events(reply, run), headers)
        result = await with_cancellation(raw, self.respond(reply, run))
        return result if isinstance(result, Response) else JSONResponse(result, headers=headers)

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        return self.stored(response_id).response

    async def delete(self, response_id: str) -> dict[str, Any]:
        self.stored(response_id)
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def stored(self, response_id: str) -> StoredResponse:
        stored = self.store.get(response_id)
        if stored is None:
            raise OpenAIError(404, f"Response with id '{response_id}' not found.", type="invalid_request_error")
        return stored

    def earlier_items(self, previous_response_id: str | None) -> list[InputItem]:
        if previous_response_id is None:
            return []
        stored = self.store.get(previous_response_id)
        if stored is None:  # OpenAI's answer, which clients (Codex) recognise and recover from by resending
            raise OpenAIError(400, f"Previous response with id '{previous_response_id}' not found.",
                              param="previous_response_id", code="previous_response_not_found")
        return stored.conversation

    async def respond(self, reply: Reply, run: ChatRun) -> dict[str, Any]:
        text, _, last = await collect(run.outputs)
        blocks = BlockStream(run.output)
        reply.events(blocks.feed(text))  # records each item's status, as a stream would
        reply.events(blocks.finish(), reply.item_status(last.finish_reason))
        final = self.finish(reply, blocks, last)
        if final["status"] == "failed":
            raise OpenAIError(503, ABORTED, type="server_busy")
        return final

    async def events(self, reply: Reply, run: ChatRun) -> AsyncIterator[dict[str, str]]:
        numbers = itertools.count()

        def event(type: str, **fields: Any) -> dict[str, str]:
            data = {"type": type, "sequence_number": next(numbers), **fields}
            return {"event": type, "data": json.dumps(data, ensure_ascii=False)}

        yield event("response.created", response=reply.response("in_progress"))
        yield event("response.in_progress", response=reply.response("in_progress"))
        blocks = BlockStream(run.output)
        try:
            last: RequestOutput | None = None
            async for out in run.outputs:
                last = out
                for name, fields in reply.events(blocks.feed(out.text)):
                    yield event(name, **fields)
            assert last is not None and last.finish_reason is not None
            for name, fields in reply.events(blocks.finish(), reply.item_status(last.finish_reason)):
                yield event(name, **fields)
            final = self.finish(reply, blocks, last)
        except Exception as e:  # headers are sent: the stream ends with a failed response
            log.warning("stream failed: %r", e)
            error = {"code": "server_error", "message": str(e) or type(e).__name__}
            final = reply.response("failed", reply.output(blocks), error=error)
        yield event(f"response.{final['status']}", response=final)

    def finish(self, reply: Reply, blocks: BlockStream, last: RequestOutput) -> dict[str, Any]:
        """The final response object; stored when asked and not failed."""
        reasoning = "".join(block.text for block in blocks.blocks if block.kind == "reasoning")
        num_reasoning = min(len(self.pipeline.served.tokenizer.encode(reasoning)), last.usage.completion_tokens)
        usage = responses_usage(last.usage, num_reasoning)
        output = reply.output(blocks)
        if last.finish_reason is FinishReason.ABORT:
            return reply.response("failed", output, usage, error={"code": "server_error", "message": ABORTED})
        if last.finish_reason is FinishReason.LENGTH:
            final = reply.response("incomplete", output, usage, incomplete={"reason": "max_output_tokens"})
        else:
            final = reply.response("completed", output, usage)
        if reply.body.store:
            conversation = reply.history + [InputItem.model_validate(item) for item in output]
            self.store.put(StoredResponse(final, conversation))
        return final


class Reply:
    """One response as it grows: its id, the request fields it echoes, its output items and their ids."""

    def __init__(self, body: ResponsesRequest, history: list[InputItem], model: str, default_temperature: float) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.body = body
        self.history = history  # the conversation's items up to this request's input
        self.model = model
        self.temperature = body.temperature if body.temperature is not None else default_temperature
        self._ids: dict[int, str] = {}
        self._status: dict[int, str] = {}  # per closed block

    def response(self, status: str, output: list[dict[str, Any]] | None = None, usage: dict[str, Any] | None = None,
                 *, error: dict[str, Any] | None = None, incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": self.model, "output": output or [],
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": body.store, "temperature": self.temperature,
            "text": {"format": body.text.format.echo()}, "tool_choice": body.tool_choice or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled",
            "usage": usage, "user": body.user, "metadata": body.metadata or {},
        }

    @staticmethod
    def item_status(reason: FinishReason | None) -> str:
        return "completed" if reason is FinishReason.STOP else "incomplete"

    def output(self, blocks: BlockStream) -> list[dict[str, Any]]:
        return [self.item(block, self._status.get(block.index, "incomplete")) for block in blocks.blocks]

    def item_id(self, block: Block) -> str:
        return self._ids.setdefault(block.index, f"{ITEM_PREFIX[block.kind]}_{uuid.uuid4().hex}")

    def item(self, block: Block, status: str) -> dict[str, Any]:
        done = status != "in_progress"
        head = {"id": self.item_id(block)}
        if block.kind == "tool_call":
            return {**head, "type": "function_call", "call_id": block.call_id, "name": block.name,
                    "arguments": block.text if done else "", "status": status}
        content = [part(block.kind, block.text)] if done else []
        if block.kind == "reasoning":
            return {**head, "type": "reasoning", "summary": [], "content": content, "status": status}
        return {**head, "type": "message", "role": "assistant", "status": status, "content": content}

    def events(self, block_events: list[BlockEvent], status: str = "completed") -> list[tuple[str, dict[str, Any]]]:
        """Responses stream events for block events; blocks closed here end with `status`."""
        out: list[tuple[str, dict[str, Any]]] = []
        for event in block_events:
            block = event.block
            at = {"item_id": self.item_id(block), "output_index": block.index}
            if event.type == "start":
                out.append(("response.output_item.added", {"output_index": block.index,
                                                           "item": self.item(block, "in_progress")}))
                if block.kind != "tool_call":
                    out.append(("response.content_part.added", {**at, "content_index": 0, "part": part(block.kind, "")}))
            elif event.type == "delta":
                out.append(delta_event(block, at, event.delta))
            else:
                self._status[block.index] = status
                out += done_events(block, at)
                out.append(("response.output_item.done", {"output_index": block.index, "item": self.item(block, status)}))
        return out


def part(kind: str, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def delta_event(block: Block, at: dict[str, Any], delta: str) -> tuple[str, dict[str, Any]]:
    if block.kind == "tool_call":
        return "response.function_call_arguments.delta", {**at, "delta": delta}
    if block.kind == "reasoning":
        return "response.reasoning_text.delta", {**at, "content_index": 0, "delta": delta}
    return "response.output_text.delta", {**at, "content_index": 0, "delta": delta, "logprobs": []}


def done_events(block: Block, at: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if block.kind == "tool_call":
        return [("response.function_call_arguments.done", {**at, "arguments": block.text})]
    if block.kind == "reasoning":
        done = ("response.reasoning_text.done", {**at, "content_index": 0, "text": block.text})
    else:
        done = ("response.output_text.done", {**at, "content_index": 0, "text": block.text, "logprobs": []})
    return [done, ("response.content_part.done", {**at, "content_index": 0, "part": part(block.kind, block.text)})]


def responses_usage(usage: Usage, reasoning_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "speculative": speculative_dict(usage),
    }
