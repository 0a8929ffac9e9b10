"""FastAPI application: the OpenAI and Anthropic routes over the async engine."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import ServerConfig
from engine.runtime.request import FinishReason, RequestOutput
from server.chat_output import ChatOutput
from server.drain import Drain, DrainMiddleware
from server.errors import OpenAIError, error_body, install_error_handlers
from server.messages_api import MessagesApi
from server.metrics import Metrics, MetricsMiddleware
from server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, HostMiddleware
from server.pipeline import Pipeline, collect, with_cancellation
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.response_store import ResponseStore
from server.responses import (
    Envelope,
    chat_logprobs,
    finish_value,
    text_logprobs,
    usage_dict,
)
from server.responses_api import ResponsesApi

log = logging.getLogger("dflash.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


def create_app(config: ServerConfig, engine: AsyncEngine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        log.info(banner(config, engine))
        yield
        await engine.stop()

    app = FastAPI(title="dflash-server", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.config = config
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    add_guards(app, config, engine)
    app.state.metrics = Metrics(engine, config.served_model_name)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: counts 401s and 413s too
    pipeline = Pipeline(config, engine)
    routes = Routes(pipeline, app.state.started)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{model_id:path}")(routes.model)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/completions")(routes.completions)
    responses = ResponsesApi(pipeline, ResponseStore())
    app.post("/v1/responses")(responses.create)
    app.get("/v1/responses/{response_id}")(responses.retrieve)
    app.delete("/v1/responses/{response_id}")(responses.delete)
    messages = MessagesApi(pipeline)
    app.post("/v1/messages")(messages.create)
    app.post("/v1/messages/count_tokens")(messages.count_tokens)
    app.get("/metrics", include_in_schema=False)(app.state.metrics.endpoint)
    return app


def add_guards(app: FastAPI, config: ServerConfig, engine: AsyncEngine) -> None:
    """CORS, the Host allowlist and the shutdown gate, outside the API key check (added later = outer)."""
    if config.cors_origins:  # browser SDKs preflight Authorization, Content-Type and x-stainless-* headers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_headers=["*"],
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(HostMiddleware, allowed=(*config.allowed_hosts, config.host))
    app.state.drain = Drain(engine, config.drain_timeout_seconds)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)


def banner(config: ServerConfig, engine: AsyncEngine) -> str:
    served = engine.model
    name = config.served_model_name or served.model_id
    auth = "API key required" if config.api_key else "no API key"
    return (f"dflash-server ready on http://{config.host}:{config.port}/v1 ({auth})\n"
            f"  model    {name}: {served.description}\n"
            f"  drafter  {served.drafter}\n"
            f"  backend  {served.backend}")


class Routes:
    """Chat and text completions, models and health."""

    def __init__(self, pipeline: Pipeline, started: int) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.engine = pipeline.engine
        self.started = started

    @property
    def model_name(self) -> str:
        return self.pipeline.model_name

    def stream(self, events: AsyncIterator[dict[str, Any]], headers: dict[str, str] | None = None) -> EventSourceResponse:
        async def framed() -> AsyncIterator[dict[str, str]]:
            try:
                async for event in events:
                    yield {"data": json.dumps(event, ensure_ascii=False)}
            except Exception as e:  # headers are sent: report in-band
                log.warning("stream failed: %r", e)
                body = e.body() if isinstance(e, OpenAIError) else error_body(str(e) or type(e).__name__, "server_error")
                yield {"data": json.dumps(body)}
            yield {"data": "[DONE]"}

        return self.pipeline.event_stream(framed(), headers)

    # --- routes ------------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        engine = self.engine
        if engine.model is None or not engine.is_alive:
            status = "error" if engine.error else "loading"
            return JSONResponse({"status": status, "error": repr(engine.error) if engine.error else None}, status_code=503)
        served = engine.model
        return JSONResponse({
            "status": "ok",
            "model": self.model_name,
            "drafter": served.drafter,
            "backend": served.backend,
            "running": engine.scheduler.num_running if engine.scheduler else 0,
            "waiting": engine.scheduler.num_waiting if engine.scheduler else 0,
            "batching": served.batching,
            "max_batch": served.max_batch,
            "prefix_cache": prefix_cache_health(served.prefix_cache),
            "tensor_parallel": engine.scheduler.group_health() if engine.scheduler else None,
        })

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "dflash-server",
                "max_model_len": self.pipeline.served.context_length}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self.pipeline.check_model(model_id)
        return self.model_card()

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        run = self.pipeline.start_chat(body)
        envelope = Envelope("chat", self.model_name)
        if body.stream:
            return self.stream(self.chat_chunks(envelope, run.outputs, body, run.output), run.headers)
        result = await with_cancellation(raw, self.chat_response(envelope, run.outputs, body, run.output))
        return result if isinstance(result, Response) else JSONResponse(result, headers=run.headers)

    async def chat_response(self, envelope: Envelope, outputs: AsyncIterator[RequestOutput],
                            body: ChatCompletionRequest, output: ChatOutput) -> dict[str, Any]:
        text, entries, last = await collect(outputs)
        message = output.message(text)
        choice: dict[str, Any] = {"index": 0, "message": message,
                                  "logprobs": chat_logprobs(entries, self.pipeline.token_text()) if body.logprobs else None,
                                  "finish_reason": chat_finish(output, last.finish_reason)}
        return {**envelope.head("chat.completion"), "choices": [choice], "usage": usage_dict(last.usage)}

    async def chat_chunks(self, envelope: Envelope, outputs: AsyncIterator[RequestOutput],
                          body: ChatCompletionRequest, output: ChatOutput) -> AsyncIterator[dict[str, Any]]:
        include_usage = body.include_usage

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            out = {**envelope.head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            return {**out, "usage": None} if include_usage else out

        yield chunk({"role": "assistant", "content": ""})
        last = None
        async for out in outputs:
            last = out
            delta = output.feed(out.text).as_delta()
            lp = chat_logprobs(out.logprobs, self.pipeline.token_text()) if body.logprobs and out.logprobs else None
            if delta or lp:
                yield chunk(delta, logprobs=lp)
        assert last is not None and last.finish_reason is not None
        tail = output.finish().as_delta()
        if tail:
            yield chunk(tail)
        yield chunk({}, chat_finish(output, last.finish_reason))
        if include_usage:
            yield {**envelope.head("chat.completion.chunk"), "choices": [], "usage": usage_dict(last.usage)}

    async def completions(self, body: CompletionRequest, raw: Request) -> Response:
        pipeline = self.pipeline
        pipeline.check_model(body.model)
        tokenizer = pipeline.served.tokenizer
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer.encode(body.prompt, add_special_tokens=True)
        else:
            vocab = tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids = list(body.prompt)
        num_top = body.logprobs or 0
        params = pipeline.sampling_params(body, body.logprobs is not None, num_top)
        request = pipeline.make_request(body, prompt_ids, body.token_limit, COMPLETIONS_DEFAULT_MAX_TOKENS, params)
        envelope = Envelope("text", self.model_name)
        echo = tokenizer.decode(prompt_ids) if body.echo else ""
        outputs = pipeline.submit(request)
        if body.stream:
            return self.stream(self.completion_chunks(envelope, outputs, body, echo))
        return await with_cancellation(raw, self.completion_response(envelope, outputs, body, echo))

    async def completion_response(self, envelope: Envelope, outputs: AsyncIterator[RequestOutput],
                                  body: CompletionRequest, echo: str) -> dict[str, Any]:
        text, entries, last = await collect(outputs)
        logprobs = text_logprobs(entries, self.pipeline.token_text(), len(echo)) if body.logprobs is not None else None
        choice = {"index": 0, "text": echo + text, "logprobs": logprobs, "finish_reason": finish_value(last.finish_reason)}
        return {**envelope.head("text_completion"), "choices": [choice], "usage": usage_dict(last.usage)}

    async def completion_chunks(self, envelope: Envelope, outputs: AsyncIterator[RequestOutput],
                                body: CompletionRequest, echo: str) -> AsyncIterator[dict[str, Any]]:
        include_usage = body.include_usage
        offset = len(echo)

        def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            out = {**envelope.head("text_completion"),
                   "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            return {**out, "usage": None} if include_usage else out

        if echo:
            yield chunk(echo)
        last = None
        async for out in outputs:
            last = out
            if out.text or out.logprobs:
                lp = None
                if body.logprobs is not None and out.logprobs:
                    lp = text_logprobs(out.logprobs, self.pipeline.token_text(), offset)
                offset += len(out.text)
                yield chunk(out.text, logprobs=lp)
        assert last is not None and last.finish_reason is not None
        yield chunk("", finish_value(last.finish_reason))
        if include_usage:
            yield {**envelope.head("text_completion"), "choices": [], "usage": usage_dict(last.usage)}


def prefix_cache_health(cache: Any) -> dict[str, int] | None:
    if cache is None:
        return None
    return {"entries": len(cache.entries), "bytes": cache.nbytes, "max_bytes": cache.max_bytes}


def chat_finish(output: ChatOutput, reason: FinishReason | None) -> str | None:
    return "tool_calls" if output.num_tool_calls and reason is FinishReason.STOP else finish_value(reason)
