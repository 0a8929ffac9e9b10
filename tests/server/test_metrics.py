"""/metrics: Prometheus exposition that parses, counters that move with requests, speculative counters."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from engine.decode.batch import BatchDecoder
from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import EngineConfig, ServerConfig
from engine.runtime.histogram import Histogram
from engine.runtime.serving_model import ServingModel
from server.app import create_app
from tests.server.test_app import make_client

MSG = [{"role": "user", "content": "Hi"}]
Samples = dict[tuple[str, frozenset], float]


def scrape(client: TestClient, **headers: str) -> Samples:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def client(tiny_serving: ServingModel) -> Iterator[TestClient]:
    with make_client(tiny_serving) as c:
        yield c


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    h.observe(0.2, times=2)
    snap = h.snapshot()
    assert snap.buckets == [(0.1, 2), (1.0, 5), (float("inf"), 6)]
    assert snap.count == 6 and snap.sum == pytest.approx(0.05 + 0.1 + 0.5 + 3.0 + 0.4)


def test_counters_move_with_requests(client: TestClient) -> None:
    before = scrape(client)
    usages = [client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 5}).json()["usage"]]
    with client.stream("POST", "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usages.append(json.loads(lines[-1][6:])["usage"])
    assert client.post("/v1/chat/completions", json={"model": "nope", "messages": MSG}).status_code == 404
    after = scrape(client)

    assert delta(before, after, "dflash:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta(before, after, "dflash:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta(before, after, "dflash:request_success_total", finished_reason="length") == 2
    assert delta(before, after, "dflash:time_to_first_token_seconds_count") == 2
    assert delta(before, after, "dflash:e2e_request_latency_seconds_count") == 2
    assert delta(before, after, "dflash:inter_token_latency_seconds_count") == 5 - 1 + 4 - 1  # plain: one per step
    chat = {"method": "POST", "route": "/v1/chat/completions"}
    assert delta(before, after, "dflash:http_requests_total", **chat, status="200") == 2
    assert delta(before, after, "dflash:http_requests_total", **chat, status="404") == 1
    assert value(after, "dflash:num_requests_waiting") == 0 and value(after, "dflash:num_requests_running") == 0
    assert value(after, "dflash:spec_decode_num_drafts_total") == 0  # the tiny model decodes plainly


def test_histograms_are_consistent(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
    samples = scrape(client)
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in samples.items() if n == f"dflash:{name}_bucket")
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == float("inf")
        assert counts[-1] == value(samples, f"dflash:{name}_count") > 0


def test_metrics_need_the_api_key(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving, api_key="sk-test") as c:
        assert c.get("/metrics").status_code == 401
        samples = scrape(c, authorization="Bearer sk-test")
        assert value(samples, "dflash:http_requests_total", route="/metrics", status="401") == 1


def test_speculative_counters_with_ngram_drafter() -> None:
    config = ServerConfig(engine=EngineConfig(drafter="ngram"))
    engine = AsyncEngine(lambda: ServingModel.load(config.engine), max_waiting=4)
    with TestClient(create_app(config, engine), base_url="http://localhost") as c:
        # a reply that copies the prompt: its first drafts are accepted whatever widths the timing picks later
        # (a "one two three" prompt drafted "three." where the reply had "three," and then drafted no more)
        prompt = "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the riverbank."
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
        spec = [c.post("/v1/chat/completions", json=body).json()["usage"]["speculative"] for _ in range(2)]
        samples = scrape(c)
    drafts = value(samples, "dflash:spec_decode_num_drafts_total")
    drafted = value(samples, "dflash:spec_decode_num_draft_tokens_total")
    accepted = value(samples, "dflash:spec_decode_num_accepted_tokens_total")
    assert drafts == sum(s["verify_steps"] for s in spec) > 0
    assert drafted == sum(s["drafted_tokens"] for s in spec) >= drafts
    assert accepted == sum(s["accepted_tokens"] for s in spec) > 0
    per_pos = [value(samples, "dflash:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(16)]
    assert sum(per_pos) == accepted
    assert per_pos == sorted(per_pos, reverse=True)  # position i is accepted only after 0..i-1


def test_batching_gauges_and_histogram(tiny_serving: ServingModel) -> None:
    batching = dataclasses.replace(tiny_serving, batch=BatchDecoder(tiny_serving.plain.model, prefill_chunk=32),
                                   max_batch=4, batching="up to 4 requests")
    body = {"messages": MSG, "max_tokens": 12, "temperature": 0, "logit_bias": {"2": -100}}  # no early EOS
    with make_client(batching) as c:
        before = scrape(c)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: c.post("/v1/chat/completions", json=body).json(), range(4)))
        after = scrape(c)
        health = c.get("/health").json()
    assert health["batching"] == "up to 4 requests" and health["max_batch"] == 4 and health["running"] == 0
    steps = delta(before, after, "dflash:batch_steps_total")
    batched = sum(r["usage"]["speculative"].get("batched_tokens", 0) for r in replies)
    assert steps > 0 and delta(before, after, "dflash:batch_size_count") == steps
    assert delta(before, after, "dflash:batch_tokens_total") == batched > 0
    assert 1 <= delta(before, after, "dflash:batch_size_sum") / steps <= 4
    assert len({r["choices"][0]["message"]["content"] for r in replies}) == 1  # the same prompt, greedy
