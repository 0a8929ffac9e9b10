"""Anthropic Messages API: `POST /v1/messages` (streamed or not) and `POST /v1/messages/count_tokens`.

A thin layer over the chat request path: the messages render through the chat template as chat
messages would, and the reply's blocks (thinking, text, tool use) become content blocks. Errors on
these routes are Anthropic-shaped (server/errors.py).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import ServerSentEvent

from engine.runtime.request import FinishReason, RequestOutput, Usage
from server.content_blocks import Block, BlockEvent, BlockStream
from server.errors import OpenAIError, anthropic_error_body
from server.messages_request import CountTokensRequest, MessagesRequest
from server.pipeline import (
    TOOLS_IGNORED_HEADER,
    ChatRun,
    Pipeline,
    chat_request,
    with_cancellation,
)
from server.responses import speculative_dict

log = logging.getLogger("dflash.server")

ABORTED = "the request was aborted: the server is shutting down"
PING = json.dumps({"type": "ping"})


class MessagesApi:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def create(self, body: MessagesRequest, raw: Request) -> Response:
        run = self.pipeline.start_chat(chat_request(body.chat_fields()))
        reply = Reply(self.pipeline.model_name, body.stop_strings(), self.pipeline.served.tokenizer.decode)
        headers = dict(run.headers)
        if len(body.client_tools) < len(body.tools or []):  # server tools (web search...) cannot run here
            headers[TOOLS_IGNORED_HEADER] = "true"
        if body.stream:
            return self.pipeline.event_stream(self.events(reply, run), headers,
                                              ping=lambda: ServerSentEvent(PING, event="ping"))
        result = await with_cancellation(raw, self.respond(reply, run))
        return result if isinstance(result, Response) else JSONResponse(result, headers=headers)

    async def count_tokens(self, body: CountTokensRequest) -> dict[str, int]:
        chat = chat_request(body.chat_fields())
        self.pipeline.check_model(chat.model)
        prompt_ids, _ = self.pipeline.prompt(chat)
        return {"input_tokens": len(prompt_ids)}

    async def respond(self, reply: Reply, run: ChatRun) -> dict[str, Any]:
        last: RequestOutput | None = None
        async for out in run.outputs:
            last = out
            reply.add(out)
        assert last is not None and last.finish_reason is not None
        blocks = BlockStream(run.output)
        blocks.feed(reply.text)
        blocks.finish()
        return {**reply.message([content_block(block) for block in blocks.blocks]), **reply.stop(blocks, last),
                "usage": anthropic_usage(last.usage)}

    async def events(self, reply: Reply, run: ChatRun) -> AsyncIterator[dict[str, str]]:
        def event(type: str, **fields: Any) -> dict[str, str]:
            return {"event": type, "data": json.dumps({"type": type, **fields}, ensure_ascii=False)}

        # the prompt's cached part is known once decoding starts: message_delta carries the final counts
        yield event("message_start", message={**reply.message([]), "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": run.num_prompt_tokens, "output_tokens": 0,
                                                        "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}})
        yield event("ping")
        blocks = BlockStream(run.output)
        try:
            last: RequestOutput | None = None
            async for out in run.outputs:
                last = out
                reply.add(out)
                for name, fields in block_events(blocks.feed(out.text)):
                    yield event(name, **fields)
            assert last is not None and last.finish_reason is not None
            for name, fields in block_events(blocks.finish()):
                yield event(name, **fields)
            yield event("message_delta", delta=reply.stop(blocks, last), usage=anthropic_usage(last.usage))
            yield event("message_stop")
        except Exception as e:  # headers are sent: the stream ends with an error event
            log.warning("stream failed: %r", e)
            status = e.status if isinstance(e, OpenAIError) else 500
            yield {"event": "error", "data": json.dumps(anthropic_error_body(status, str(e) or type(e).__name__))}


class Reply:
    """One message as it streams: its id, its raw text, and the tokens that tell which stop sequence hit."""

    def __init__(self, model: str, stops: tuple[str, ...], decode: Callable[..., str]) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.stops = stops
        self.decode = decode
        self.text = ""  # as released, before reasoning and tool calls are split out
        self.token_ids: list[int] = []

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids

    def message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content}

    def stop(self, blocks: BlockStream, last: RequestOutput) -> dict[str, Any]:
        """stop_reason and stop_sequence; an abort (shutdown) has neither and is an overloaded error."""
        if last.finish_reason is FinishReason.ABORT:
            raise OpenAIError(503, ABORTED)
        if last.finish_reason is FinishReason.LENGTH:
            return {"stop_reason": "max_tokens", "stop_sequence": None}
        if blocks.num_tool_calls:
            return {"stop_reason": "tool_use", "stop_sequence": None}
        hit = self.stop_sequence()
        return {"stop_reason": "end_turn" if hit is None else "stop_sequence", "stop_sequence": hit}

    def stop_sequence(self) -> str | None:
        """The engine says "stop" for an end-of-turn token and a stop string alike. It keeps the tokens
        that made a stop string (and no end-of-turn token), and released text never holds a whole stop
        string: the first one in the kept tokens' text is the one that matched."""
        if not self.stops:
            return None
        text = self.decode(self.token_ids, skip_special_tokens=True)
        hits = [(at, stop) for stop in self.stops if (at := text.find(stop)) >= 0]
        return min(hits)[1] if hits else None


def content_block(block: Block, opening: bool = False) -> dict[str, Any]:
    """A block as Anthropic's content block; `opening`: empty, as content_block_start sends it."""
    if block.kind == "tool_call":
        return {"type": "tool_use", "id": tool_use_id(block.call_id), "name": block.name,
                "input": {} if opening else tool_input(block.text)}
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": "" if opening else block.text, "signature": ""}
    return {"type": "text", "text": "" if opening else block.text}


def block_events(events: list[BlockEvent]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for event in events:
        block = event.block
        if event.type == "start":
            out.append(("content_block_start", {"index": block.index, "content_block": content_block(block, True)}))
        elif event.type == "delta":
            out.append(("content_block_delta", {"index": block.index, "delta": delta(block, event.delta)}))
        else:
            out.append(("content_block_stop", {"index": block.index}))
    return out


def delta(block: Block, text: str) -> dict[str, Any]:
    if block.kind == "tool_call":  # the whole call at once: its input, as the JSON the client accumulates
        return {"type": "input_json_delta", "partial_json": json.dumps(tool_input(text), ensure_ascii=False)}
    if block.kind == "reasoning":
        return {"type": "thinking_delta", "thinking": text}
    return {"type": "text_delta", "text": text}


def tool_input(arguments: str) -> dict[str, Any]:
    """tool_use input is an object; arguments the model wrote as anything else are not a usable call."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def anthropic_usage(usage: Usage) -> dict[str, Any]:
    """input_tokens counts what was not read from the cache, as Anthropic's does."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0,
            "speculative": speculative_dict(usage)}
