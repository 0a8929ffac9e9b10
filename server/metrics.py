"""Prometheus /metrics: engine counters read from SchedulerStats at scrape time, HTTP counts from middleware.

Names follow vLLM's with a `dflash:` prefix, so dashboards and AIPerf built for vLLM read them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine.runtime.histogram import Histogram

if TYPE_CHECKING:
    from engine.decode.prefix_cache import PrefixCache
    from engine.runtime.async_engine import AsyncEngine
    from engine.runtime.scheduler import SchedulerStats
    from server.middleware import ASGIApp, Receive, Scope, Send

PREFIX = "dflash:"
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                    "/v1/messages/count_tokens", "/v1/models", "/health", "/metrics"})
TEMPLATES = {"/v1/models/": "/v1/models/{model_id}", "/v1/responses/": "/v1/responses/{response_id}"}


def route_label(path: str) -> str:
    # A fixed set of labels: arbitrary paths (scanners, typos) must not grow the series count.
    if path in ROUTES:
        return path
    return next((label for prefix, label in TEMPLATES.items() if path.startswith(prefix)), "other")


class Metrics:
    """A prometheus_client collector over one engine, plus the HTTP response counts."""

    def __init__(self, engine: AsyncEngine, model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.http_responses: Counter[tuple[str, str, str]] = Counter()  # (method, route, status), event loop only
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    async def endpoint(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def collect(self) -> Iterator[Metric]:
        yield self._http_family()
        scheduler = self.engine.scheduler
        if scheduler is None:  # still loading: no engine series yet
            return
        model = self.model_name or self.engine.model.model_id
        yield gauge("num_requests_running", "Requests being decoded or prefilled.", model, scheduler.num_running)
        yield gauge("num_requests_waiting", "Requests queued behind the running ones.", model, scheduler.num_waiting)
        yield from stats_families(scheduler.stats, model)
        if scheduler.prefix_cache is not None:
            yield from prefix_cache_families(scheduler.prefix_cache, model)
        if (group := scheduler.group_health()) is not None:
            yield gauge("tensor_parallel_world_size", "Ranks the target is split over.", model, group["world_size"])
            yield gauge("tensor_parallel_last_tick_age_seconds", "Since every rank last met in the control message.",
                        model, group["last_tick_age_s"])

    def _http_family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(PREFIX + "http_requests", "HTTP responses by method, route and status.",
                                     labels=["method", "route", "status"])
        for labels, n in sorted(self.http_responses.items()):
            family.add_metric(list(labels), n)
        return family


def stats_families(stats: SchedulerStats, model: str) -> Iterator[Metric]:
    yield counter("prompt_tokens", "Prompt tokens of finished requests.", model, stats.num_prompt_tokens)
    yield counter("generation_tokens", "Generated tokens of finished requests.", model, stats.num_generation_tokens)
    success = CounterMetricFamily(PREFIX + "request_success", "Finished requests by finish reason.",
                                  labels=["model_name", "finished_reason"])
    for reason, n in stats.num_finished.items():
        success.add_metric([model, reason.value], n)
    yield success
    yield histogram("time_to_first_token_seconds", "Arrival to first token, queueing included.", model,
                    stats.time_to_first_token)
    yield histogram("inter_token_latency_seconds", "Latency per generated token after the first step.", model,
                    stats.inter_token_latency)
    yield histogram("e2e_request_latency_seconds", "Arrival to finish.", model, stats.e2e_request_latency)
    yield from speculative_families(stats, model)
    yield from batch_families(stats, model)


def batch_families(stats: SchedulerStats, model: str) -> Iterator[Metric]:
    # tokens per batched step = batch_tokens / batch_steps; a lone request's steps are not counted here
    yield counter("batch_steps", "Batched decode steps (one target forward for every running request).", model,
                  stats.num_batch_steps)
    yield counter("batch_tokens", "Tokens produced by batched decode steps.", model, stats.num_batch_tokens)
    yield histogram("batch_size", "Requests decoded per batched step.", model, stats.batch_size)


def speculative_families(stats: SchedulerStats, model: str) -> Iterator[Metric]:
    # vLLM semantics: a draft is one verify step; acceptance rate = accepted / draft tokens.
    yield counter("spec_decode_num_drafts", "Speculative verify steps.", model, stats.num_drafts)
    yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed for verification.", model,
                  stats.num_draft_tokens)
    yield counter("spec_decode_num_accepted_tokens", "Draft tokens the target accepted.", model,
                  stats.num_accepted_tokens)
    per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                  "Accepted draft tokens by position in the block (0-based).",
                                  labels=["model_name", "position"])
    for position, n in enumerate(list(stats.accepted_per_position)):
        per_pos.add_metric([model, str(position)], n)
    yield per_pos


def prefix_cache_families(cache: PrefixCache, model: str) -> Iterator[Metric]:
    stats = cache.stats
    yield counter("prefix_cache_hits", "Requests that restored a cached prompt prefix.", model, stats.hits)
    yield counter("prefix_cache_misses", "Requests that found no cached prompt prefix.", model, stats.misses)
    yield counter("prefix_cache_reused_tokens", "Prompt tokens restored from the prefix cache instead of prefilled.",
                  model, stats.reused_tokens)
    yield counter("prefix_cache_evictions", "Prefix cache entries dropped for the byte budget.", model, stats.evictions)
    yield gauge("prefix_cache_bytes", "Bytes the prefix cache holds.", model, cache.nbytes)
    yield gauge("prefix_cache_entries", "Entries in the prefix cache.", model, len(cache.entries))


def counter(name: str, doc: str, model: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
    family.add_metric([model], value)
    return family


def gauge(name: str, doc: str, model: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
    family.add_metric([model], value)
    return family


def histogram(name: str, doc: str, model: str, source: Histogram) -> HistogramMetricFamily:
    snap = source.snapshot()
    family = HistogramMetricFamily(PREFIX + name, doc, labels=["model_name"])
    buckets = [("+Inf" if bound == float("inf") else repr(bound), n) for bound, n in snap.buckets]
    family.add_metric([model], buckets, sum_value=snap.sum)
    return family


class MetricsMiddleware:
    """Counts every response by route and status, 401s and 413s included (so it sits outermost)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                key = (scope["method"], route_label(scope["path"]), str(message["status"]))
                self.metrics.http_responses[key] += 1
            await send(message)

        await self.app(scope, receive, counting_send)
