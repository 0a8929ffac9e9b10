"""Load test: N concurrent clients against a server on loopback for a bounded time. Not a pytest test.

    python bench/load_test.py                                  # starts `python -m server --no-draft`, 32 clients, 180 s
    python bench/load_test.py --duration 60 --clients 8 --server-args "--no-draft --max-waiting 4"
    python bench/load_test.py --url http://127.0.0.1:8000 --pid 1234   # a running server (pid: for RSS)

Each client loops over a mix: streaming chat and completions with short prompts, streams it drops after a
few chunks (a closed tab, Open WebUI's Stop), and Open WebUI-like background title/tag requests (non-stream).
No new request starts after --duration (or --max-requests); requests still in flight --grace seconds later
are dropped (counted as cut_at_end). It reports status codes (only 200 and 503 are allowed), streams that
ended with [DONE], errors, latency and server RSS before/after, stops the server with SIGTERM (its drain),
and writes JSON; the exit status is 1 when a disallowed status or an error was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colours.",
           "Explain recursion in one sentence.", "Give me a fun fact about octopuses.", "What is 17 * 23?",
           "Translate 'good morning' into Spanish.", "Suggest a name for a grey cat."]
TITLE_TASK = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
              "### Output:\nJSON format: { \"title\": \"your concise title here\" }\n"
              "### Chat History:\n<chat_history>\nUSER: {q}\n</chat_history>")
TAGS_TASK = ("### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history.\n"
             "### Output:\nJSON format: { \"tags\": [\"tag1\", \"tag2\"] }\n"
             "### Chat History:\n<chat_history>\nUSER: {q}\n</chat_history>")
KINDS = {"chat_stream": 45, "completion_stream": 15, "disconnect": 15, "background": 15, "completion": 10}
ALLOWED_STATUS = {200, 503}


@dataclass
class Tally:
    started: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    finishes: Counter = field(default_factory=Counter)
    streams: int = 0
    streams_done: int = 0
    disconnects: int = 0
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)

    def error(self, kind: str, message: str) -> None:
        self.errors.append(f"{kind}: {message}"[:300])


def request_body(kind: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    question = rng.choice(PROMPTS)
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": rng.randint(16, 64),
            "temperature": rng.choice([0, 0.7, 1.0])}
    if kind == "background":  # Open WebUI's title / tags calls: non-stream, behind the chat in the FIFO
        task = rng.choice([TITLE_TASK, TAGS_TASK]).replace("{q}", question)
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": task}], "max_tokens": 48, "stream": False}
    if kind.startswith("completion"):
        body = {"prompt": f"Q: {question}\nA:", "max_tokens": rng.randint(16, 48), "temperature": chat["temperature"]}
        return "/v1/completions", {**body, "stream": kind == "completion_stream"}
    return "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}


async def run_stream(client: httpx.AsyncClient, path: str, body: dict, drop_after: int | None, tally: Tally) -> int:
    t0 = time.monotonic()
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code
        tally.streams += 1
        chunks, seen_text = 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                tally.streams_done += 1
                tally.latencies.append(time.monotonic() - t0)
                return 200
            chunks += 1
            if read_chunk(json.loads(line[6:]), tally) and not seen_text:
                seen_text = True
                tally.first_token.append(time.monotonic() - t0)
            if drop_after is not None and chunks >= drop_after:
                tally.disconnects += 1
                return 200  # leaving the block closes the connection: the server must abort the request
        tally.error("stream", f"{path} ended without [DONE] after {chunks} chunks")
        return 200


def read_chunk(chunk: dict, tally: Tally) -> bool:
    """Count what the chunk carries; True when it carries generated text."""
    if "error" in chunk:
        tally.error("stream", json.dumps(chunk)[:200])
    has_text = False
    for choice in chunk.get("choices", []):
        has_text = has_text or bool(choice.get("text") or (choice.get("delta") or {}).get("content"))
        if choice.get("finish_reason"):
            tally.finishes[choice["finish_reason"]] += 1
    if chunk.get("usage"):
        tally.completion_tokens += chunk["usage"]["completion_tokens"]
    return has_text


async def run_plain(client: httpx.AsyncClient, path: str, body: dict, tally: Tally) -> int:
    t0 = time.monotonic()
    r = await client.post(path, json=body)
    if r.status_code == 200:
        data = r.json()
        tally.latencies.append(time.monotonic() - t0)
        tally.finishes[data["choices"][0]["finish_reason"]] += 1
        tally.completion_tokens += data["usage"]["completion_tokens"]
    return r.status_code


async def client_loop(client: httpx.AsyncClient, seed: int, deadline: float, budget: int, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline and tally.started < budget:
        tally.started += 1
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        tally.kinds[kind] += 1
        path, body = request_body(kind, rng)
        try:
            if body.get("stream"):
                drop = rng.randint(1, 4) if kind == "disconnect" else None
                status = await run_stream(client, path, body, drop, tally)
            else:
                status = await run_plain(client, path, body, tally)
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
            tally.error(kind, repr(e))
            continue
        tally.statuses[status] += 1
        if status == 503:
            await asyncio.sleep(rng.uniform(0.5, 1.5))  # honour Retry-After: 1
        elif status not in ALLOWED_STATUS:
            tally.error(kind, f"status {status}")


async def sample_rss(pid: int | None, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kb(pid) or 0)
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass


async def load(url: str, pid: int | None, args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    peak, stop = [0], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, peak, stop))
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        deadline = t0 + args.duration
        loops = [asyncio.create_task(client_loop(client, args.seed + i, deadline, args.max_requests, tally))
                 for i in range(args.clients)]
        _, late = await asyncio.wait(loops, timeout=args.duration + args.grace)
        for task in late:  # still queued or running after the grace: drop them (the server aborts each)
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    elapsed = time.monotonic() - t0
    stop.set()
    await sampler
    return {"elapsed_s": round(elapsed, 1), "cut_at_end": len(late), "rss_peak_kb": peak[0] or None}


def rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server_args: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), *shlex.split(server_args)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not become healthy; see {log_path}")


def stop_server(proc: subprocess.Popen) -> dict[str, Any]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return {"exit_code": code, "shutdown_s": round(time.monotonic() - t0, 1)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def report(args: argparse.Namespace, tally: Tally, run: dict[str, Any], rss: tuple[int | None, int | None],
           server: dict[str, Any]) -> dict[str, Any]:
    bad = {str(s): n for s, n in tally.statuses.items() if s not in ALLOWED_STATUS}
    return {
        "requests": tally.started, "concurrency": args.clients, "duration_s": args.duration, **run,
        "status_counts": {str(s): n for s, n in sorted(tally.statuses.items())}, "disallowed_status": bad,
        "kinds": dict(tally.kinds), "finish_reasons": dict(tally.finishes),
        "streams_opened": tally.streams, "streams_done": tally.streams_done, "streams_dropped_early": tally.disconnects,
        "completion_tokens": tally.completion_tokens,
        "tokens_per_s": round(tally.completion_tokens / run["elapsed_s"], 1) if run["elapsed_s"] else None,
        "latency_s": {"p50": percentile(tally.latencies, 0.5), "p95": percentile(tally.latencies, 0.95)},
        "first_token_s": {"p50": percentile(tally.first_token, 0.5), "p95": percentile(tally.first_token, 0.95)},
        "errors": len(tally.errors), "error_samples": tally.errors[:10],
        "rss_before_kb": rss[0], "rss_after_kb": rss[1], "server": server,
        "ok": not bad and not tally.errors,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="target a running server instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    p.add_argument("--server-args", default="--no-draft", help="flags for the server this starts (default --no-draft)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=180, help="seconds of load; no new request after this")
    p.add_argument("--max-requests", type=int, default=10_000)
    p.add_argument("--grace", type=float, default=60, help="after --duration, wait this long for requests in flight")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "load_test.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc, url, pid = None, args.url, args.pid
    if url is None:
        proc, url = start_server(args.server_args, args.out.with_suffix(".server.log"))
        pid = proc.pid
    tally = Tally()
    rss_before = rss_kb(pid)
    try:
        run = asyncio.run(load(url, pid, args, tally))
    finally:
        rss_after = rss_kb(pid)
        server = stop_server(proc) if proc is not None else {}
    result = report(args, tally, run, (rss_before, rss_after), {**server, "url": url, "pid": pid})
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
