"""Prefix cache: time to first token per turn of a growing chat, with the cache and without it.

    python bench/prefix_cache.py --out /tmp/prefix-cache               # the embedded model, shipped draft
    python bench/prefix_cache.py --server-args "--no-draft" --rounds 1

Two `python -m server` processes on free ports serve the same config, one with `--no-prefix-cache`.
Each round is a new 6-turn conversation (user turns of about 320 tokens; the replies, greedy and cut
at --max-tokens, are sent back as the client got them) played on both servers, each turn on one
server and then on the other, in an order that alternates, so both sides of a turn see the same load
from other processes. TTFT is the time from sending a streamed request to its first content delta.
Per turn: prompt tokens, cached_tokens (usage.prompt_tokens_details) and both TTFTs (medians over
rounds), and the load average; the replies must be identical. Targets: turn 6 with the cache <= 0.3x without it, and
within 2x of turn 1 with it. JSON goes to --out. On Linux it re-execs with MKL or OpenBLAS (the
servers inherit the preload).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from http_overhead import Server, stream_chat  # noqa: E402  (this directory is sys.path[0] when run as a script)
from load_test import free_port  # noqa: E402

from engine.backend.blas import maybe_reexec_with_blas  # noqa: E402

TOPICS = ["a small bakery", "a community garden", "a bicycle repair shop", "a neighbourhood library",
          "a river clean-up", "a school robotics club", "a night market", "a hiking trail"]
SUBJECTS = ["the volunteers", "the owner", "the city council", "two students", "the new manager", "a local reporter",
            "the suppliers", "our accountant", "the weekend crew", "a retired engineer"]
VERBS = ["suggested", "measured", "argued", "noticed", "reported", "estimated", "proposed", "confirmed"]
OBJECTS = ["that opening an hour earlier would bring in commuters", "that costs rose by about 12 percent since spring",
           "that the storage room floods after heavy rain", "that most visitors arrive on foot",
           "that the old signage confuses first-time guests", "that a second shift would cut the waiting list",
           "that donations doubled after the open day", "that the heating bill could be halved with insulation",
           "that the website loads slowly on phones", "that deliveries often come late on Mondays"]


def user_turn(rng: random.Random, topic: str, turn: int, sentences: int = 9) -> str:
    """About 300 tokens of notes, then a short question (SmolLM2's tokenizer: ~33 tokens a sentence)."""
    notes = " ".join(f"In week {rng.randint(1, 52)}, {rng.choice(SUBJECTS)} {rng.choice(VERBS)} "
                     f"{rng.choice(OBJECTS)}, and {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(sentences))
    return f"Notes on {topic}, part {turn + 1}: {notes} What is the single most useful next step?"


def stream_turn(server: Server, messages: list[dict], max_tokens: int) -> dict[str, Any]:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, end, text, usage = stream_chat(server.client, body)
    return {"ttft_s": (first or end) - start, "total_s": end - start, "text": text,
            "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "load1": os.getloadavg()[0]}


def conversations(servers: dict[str, Server], round_: int, turns: int, max_tokens: int) -> dict[str, list[dict]]:
    """One conversation per server, played turn by turn: each turn goes to both servers back to back
    (in an order that alternates), so the two sides of a turn see the same load from other processes."""
    rng = random.Random(round_)
    topic = TOPICS[round_ % len(TOPICS)]
    messages: dict[str, list[dict]] = {name: [] for name in servers}
    out: dict[str, list[dict]] = {name: [] for name in servers}
    for turn in range(turns):
        question = {"role": "user", "content": user_turn(rng, topic, turn)}
        names = list(servers) if (round_ + turn) % 2 == 0 else list(servers)[::-1]
        for name in names:
            messages[name].append(question)
            result = stream_turn(servers[name], messages[name], max_tokens)
            out[name].append(result)
            messages[name].append({"role": "assistant", "content": result["text"]})
    return out


def summarize(runs: dict[str, list[list[dict]]], turns: int) -> dict[str, Any]:
    def median(name: str, turn: int, key: str) -> float:
        return statistics.median(conv[turn][key] for conv in runs[name])

    rows = []
    for turn in range(turns):
        on, off = median("cache", turn, "ttft_s"), median("no-cache", turn, "ttft_s")
        rows.append({"turn": turn + 1, "prompt_tokens": runs["cache"][0][turn]["prompt_tokens"],
                     "cached_tokens": runs["cache"][0][turn]["cached_tokens"], "ttft_cache_s": on,
                     "ttft_no_cache_s": off, "ratio": on / off, "load1": median("no-cache", turn, "load1")})
    last, first = rows[-1], rows[0]
    return {"turns": rows, "last_turn_ratio": last["ratio"],
            "last_vs_first_turn_with_cache": last["ttft_cache_s"] / first["ttft_cache_s"],
            "targets_met": last["ratio"] <= 0.3 and last["ttft_cache_s"] <= 2 * first["ttft_cache_s"]}


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT cache':>11} {'TTFT none':>10} {'ratio':>6} {'load':>5}")
    for r in summary["turns"]:
        print(f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['cached_tokens']:>7} {r['ttft_cache_s']:>10.3f}s "
              f"{r['ttft_no_cache_s']:>9.3f}s {r['ratio']:>6.2f} {r['load1']:>5.1f}")
    print(f"last turn: {summary['last_turn_ratio']:.2f}x the uncached TTFT (target <= 0.3), "
          f"{summary['last_vs_first_turn_with_cache']:.2f}x turn 1's (target <= 2); "
          f"targets {'met' if summary['targets_met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-args", default="", help="more server flags for both servers, e.g. '--no-draft'")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32, help="reply length cap (keeps a run to a few minutes)")
    parser.add_argument("--rounds", type=int, default=1, help="conversations per server (medians are reported)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dflash-prefix-cache")
    args = parser.parse_args()
    maybe_reexec_with_blas()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = args.server_args.split()
    servers = {"cache": Server(["--port", str(free_port()), *extra], args.out / "server_cache.log", tiny=False),
               "no-cache": Server(["--port", str(free_port()), "--no-prefix-cache", *extra],
                                  args.out / "server_no_cache.log", tiny=False)}
    runs: dict[str, list[list[dict]]] = {name: [] for name in servers}
    try:
        health = {name: s.wait_ready() for name, s in servers.items()}
        print(f"[prefix-cache] {health['cache']['model']}, drafter {health['cache']['drafter']}; "
              f"{platform.machine()} {os.cpu_count()} CPUs; {health['cache']['backend']}", flush=True)
        for server in servers.values():  # the first request's one-off costs (cost curve) stay out of turn 1
            stream_turn(server, [{"role": "user", "content": "Say hello."}], 8)
        for round_ in range(args.rounds):
            for name, conv in conversations(servers, round_, args.turns, args.max_tokens).items():
                runs[name].append(conv)
                ttfts = ", ".join(f"{t['ttft_s']:.2f}" for t in conv)
                print(f"[prefix-cache] round {round_ + 1} {name}: TTFT {ttfts} s", flush=True)
        prefix_health = servers["cache"].client.get("/health").json()["prefix_cache"]
    finally:
        codes = {name: s.stop() for name, s in servers.items()}
    mismatches = [(r, t) for r, (a, b) in enumerate(zip(runs["cache"], runs["no-cache"]))
                  for t in range(args.turns) if a[t]["text"] != b[t]["text"]]
    summary = summarize(runs, args.turns)
    print_table(summary)
    print(f"replies identical with and without the cache: {not mismatches}; prefix cache at the end: {prefix_health}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "health": health, "prefix_cache": prefix_health,
           "server_exit_status": codes, "mismatches": mismatches, "summary": summary, "runs": runs}
    path = args.out / "prefix_cache.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"[prefix-cache] wrote {path}")
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
