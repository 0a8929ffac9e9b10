"""FastAPI application: OpenAI routes over the async engine."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from engine.decode.sampling import SamplingParams
from engine.runtime.async_engine import AsyncEngine, EngineDead
from engine.runtime.config import ServerConfig
from engine.runtime.request import FinishReason, RequestOutput
from engine.runtime.request import Request as EngineRequest
from engine.runtime.scheduler import EngineBusy
from server.chat_output import ChatOutput
from server.chat_template import load_chat_template, supports_tools, thinks, tool_history_as_text
from server.drain import Drain, DrainMiddleware
from server.errors import OpenAIError, error_body, install_error_handlers
from server.metrics import Metrics, MetricsMiddleware
from server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, HostMiddleware
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.responses import (
    Envelope,
    TokenText,
    chat_logprobs,
    finish_value,
    text_logprobs,
    usage_dict,
)

log = logging.getLogger("dflash.server")
T = TypeVar("T")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
TOOLS_IGNORED_HEADER = "x-dflash-tools-ignored"


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
    routes = Routes(config, engine, app.state.started)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{model_id:path}")(routes.model)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/completions")(routes.completions)
    app.get("/metrics", include_in_schema=False)(app.state.metrics.endpoint)
    return app


def add_guards(app: FastAPI, config: ServerConfig, engine: AsyncEngine) -> None:
    """CORS, the Host allowlist and the shutdown gate, outside the API key check (added later = outer)."""
    if config.cors_origins:  # browser SDKs preflight Authorization, Content-Type and x-stainless-* headers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_headers=["*"],
                           allow_methods=["GET", "POST", "OPTIONS"], expose_headers=["Retry-After"], max_age=600)
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
    def __init__(self, config: ServerConfig, engine: AsyncEngine, started: int) -> None:
        self.config = config
        self.engine = engine
        self.started = started
        self._token_text: TokenText | None = None
        self._chat_template = load_chat_template(config.chat_template)
        self._warned_tools = False  # the tools-left-out warning is logged once per process

    # --- helpers -----------------------------------------------------------------------
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
                     params: SamplingParams) -> EngineRequest:
        context = self.served.context_length
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if limit is not None and num_prompt + limit > context:
            raise OpenAIError(
                400,
                f"this model's maximum context length is {context} tokens, but {num_prompt} prompt tokens "
                f"+ {limit} max_tokens = {num_prompt + limit} were requested; reduce the prompt or max_tokens",
                param="max_tokens", code="context_length_exceeded",
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

    def stream(self, events: AsyncIterator[dict[str, Any]], headers: dict[str, str] | None = None) -> EventSourceResponse:
        async def framed() -> AsyncIterator[dict[str, str]]:
            try:
                async for event in events:
                    yield {"data": json.dumps(event, ensure_ascii=False)}
            except (OpenAIError, EngineDead, Exception) as e:  # headers are sent: report in-band
                log.warning("stream failed: %r", e)
                body = e.body() if isinstance(e, OpenAIError) else error_body(str(e) or type(e).__name__, "server_error")
                yield {"data": json.dumps(body)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(framed(), ping=self.config.keepalive_seconds, sep="\n",
                                   headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache", **(headers or {})})

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
            "waiting": engine.scheduler.num_waiting if engine.scheduler else 0,
            "prefix_cache": prefix_cache_health(served.prefix_cache),
        })

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "dflash-server",
                "max_model_len": self.served.context_length}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self.check_model(model_id)
        return self.model_card()

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(body.model)
        renders_tools = self.renders_tools(body)
        prompt_ids = self.render_chat(body, renders_tools)
        params = self.sampling_params(body, body.logprobs, body.top_logprobs or 0)
        request = self.make_request(body, prompt_ids, body.token_limit, self.config.engine.default_max_tokens, params)
        request.num_stable_prompt_tokens = self.stable_prefix(body, renders_tools, prompt_ids)
        envelope = Envelope("chat", self.model_name)
        output = self.chat_output(body, prompt_ids, renders_tools)
        outputs = self.submit(request)
        # the client sent tools that this template cannot show the model: say so, as a header
        headers = {TOOLS_IGNORED_HEADER: "true"} if body.uses_tools and not renders_tools else {}
        if body.stream:
            return self.stream(self.chat_chunks(envelope, outputs, body, output), headers)
        result = await with_cancellation(raw, self.chat_response(envelope, outputs, body, output))
        return result if isinstance(result, Response) else JSONResponse(result, headers=headers)

    def renders_tools(self, body: ChatCompletionRequest) -> bool:
        """Whether the request's tools go into the prompt; a forced call the template cannot render is a 400.

        Chat UIs (Open WebUI's native mode) send their tools with every chat whatever the model, as
        mlx_lm.server and llama.cpp answer them: with tool_choice auto or none they are left out here.
        """
        if not body.uses_tools:
            return False
        if supports_tools(self.chat_template):
            return True
        if body.forces_tool_call:
            raise OpenAIError(400, f"tool_choice {json.dumps(body.tool_choice)} forces a tool call, but this model's "
                              "chat template does not support tools: send tool_choice \"auto\" or \"none\", or start "
                              "the server with a --chat-template that renders tools", param="tool_choice")
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

    def chat_output(self, body: ChatCompletionRequest, prompt_ids: list[int], renders_tools: bool) -> ChatOutput:
        mode = self.config.reasoning
        reasoning = mode == "on" or (mode == "auto" and thinks(self.chat_template))
        # some templates open <think> in the generation prompt: the reply starts mid-thought
        thinking = reasoning and self.served.tokenizer.decode(prompt_ids[-4:]).rstrip().endswith("<think>")
        return ChatOutput(reasoning=reasoning, thinking=thinking, tools=renders_tools)

    async def chat_response(self, envelope: Envelope, outputs: AsyncIterator[RequestOutput],
                            body: ChatCompletionRequest, output: ChatOutput) -> dict[str, Any]:
        text, entries, last = await collect(outputs)
        message = output.message(text)
        choice: dict[str, Any] = {"index": 0, "message": message,
                                  "logprobs": chat_logprobs(entries, self.token_text()) if body.logprobs else None,
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
            lp = chat_logprobs(out.logprobs, self.token_text()) if body.logprobs and out.logprobs else None
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
        self.check_model(body.model)
        tokenizer = self.served.tokenizer
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer.encode(body.prompt, add_special_tokens=True)
        else:
            vocab = tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids = list(body.prompt)
        num_top = body.logprobs or 0
        params = self.sampling_params(body, body.logprobs is not None, num_top)
        request = self.make_request(body, prompt_ids, body.token_limit, COMPLETIONS_DEFAULT_MAX_TOKENS, params)
        envelope = Envelope("text", self.model_name)
        echo = tokenizer.decode(prompt_ids) if body.echo else ""
        outputs = self.submit(request)
        if body.stream:
            return self.stream(self.completion_chunks(envelope, outputs, body, echo))
        return await with_cancellation(raw, self.completion_response(envelope, outputs, body, echo))

    async def completion_response(self, envelope: Envelope, outputs: AsyncIterator[RequestOutput],
                                  body: CompletionRequest, echo: str) -> dict[str, Any]:
        text, entries, last = await collect(outputs)
        logprobs = text_logprobs(entries, self.token_text(), len(echo)) if body.logprobs is not None else None
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
                    lp = text_logprobs(out.logprobs, self.token_text(), offset)
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
