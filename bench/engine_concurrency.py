"""Concurrent streams without HTTP: how the engine itself scales with streams, and where a batched step's time goes.

    python bench/engine_concurrency.py --out /tmp/engine-concurrency                 # the server's default model
    python bench/engine_concurrency.py --server-args "--no-draft" --streams 1,4
    python bench/engine_concurrency.py --tiny                                         # the per-row host cost laid bare

The model is loaded as `python -m server <--server-args>` loads it, behind the server's AsyncEngine, and
1, 2, 4 and 8 greedy chat requests (bench/concurrency.py's prompts) are consumed at once by asyncio tasks
in this process: the server minus HTTP. Per stream count: aggregate tok/s (all completion tokens over
the wall time from the first submit to the last stream's end, rounds pooled) and, over the steps that ran
every stream in one batch, the batched step's median milliseconds and the median milliseconds the
scheduler spent routing its tokens (stop checks, detokenizing, handing them to the asyncio side). Set
against bench/concurrency.py's numbers this separates the engine's scaling from the HTTP layer's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from concurrency import PROMPTS  # noqa: E402  (this directory is sys.path[0] when run as a script)
from http_overhead import load_serving  # noqa: E402

from engine.backend.blas import maybe_reexec_with_blas  # noqa: E402


class StepClock:
    """Times the batch scheduler's decode_rows and the batched step inside it, on the MLX thread."""

    def __init__(self, scheduler: Any) -> None:
        self.samples: list[tuple[int, float, float]] = []  # (rows, step seconds, decode_rows seconds)
        batch_step, decode_rows = scheduler.batch.step, scheduler.decode_rows
        last: dict[str, float] = {}

        def step() -> Any:
            start = time.perf_counter()
            try:
                return batch_step()
            finally:
                last["step"] = time.perf_counter() - start

        def timed_decode_rows() -> None:
            rows, start = len(scheduler.rows), time.perf_counter()
            last.clear()
            decode_rows()
            if "step" in last:
                self.samples.append((rows, last["step"], time.perf_counter() - start))

        scheduler.batch.step, scheduler.decode_rows = step, timed_decode_rows

    def at(self, rows: int) -> tuple[list[float], list[float]]:
        """Step and routing seconds of the steps that ran `rows` rows."""
        picked = [(s, total - s) for n, s, total in self.samples if n == rows]
        return [s for s, _ in picked], [r for _, r in picked]


async def consume(engine: Any, prompt_ids: list[int], max_tokens: int) -> int:
    from engine.decode.sampling import SamplingParams
    from engine.runtime.request import Request

    request = Request(uuid.uuid4().hex, prompt_ids, SamplingParams(temperature=0.0), max_tokens)
    tokens = 0
    async for out in engine.submit(request):
        tokens += len(out.token_ids)
    return tokens


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from engine.runtime.async_engine import AsyncEngine

    def load() -> Any:
        serving = load_serving(args.server_args.split(), args.tiny)
        if args.tiny:  # the tiny model has no batch of its own: give it the server's
            from engine.decode.batch import BatchDecoder

            serving.batch, serving.max_batch, serving.batching = BatchDecoder(serving.plain.model), 8, "up to 8 requests"
        return serving

    engine = AsyncEngine(load, max_waiting=64)
    await engine.start()
    if engine.model.batch is None:
        raise SystemExit(f"[engine-concurrency] this model does not batch ({engine.model.batching})")
    clock = StepClock(engine.scheduler)
    tokenizer = engine.model.tokenizer
    print(f"[engine-concurrency] {engine.model.description}; drafter {engine.model.drafter}; batching "
          f"{engine.model.batching}; {engine.model.backend}", flush=True)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]
    levels = [int(n) for n in args.streams.split(",")]
    pooled: dict[int, dict[str, list[float]]] = {n: {"tokens": [], "seconds": [], "step": [], "route": []} for n in levels}
    for round_ in range(args.rounds + 1):  # round 0 warms up (the verify cost curve, kernel plans)
        for n in levels:
            clock.samples.clear()
            start = time.perf_counter()
            counts = await asyncio.gather(*(consume(engine, prompts[(round_ + i) % len(prompts)], args.max_tokens)
                                            for i in range(n)))
            seconds = time.perf_counter() - start
            if not round_:
                continue
            step, route = clock.at(n) if n > 1 else ([], [])
            p = pooled[n]
            p["tokens"].append(sum(counts))
            p["seconds"].append(seconds)
            p["step"] += step
            p["route"] += route
            print(f"[engine-concurrency] round {round_} x{n}: {sum(counts) / seconds:7.1f} tok/s"
                  + (f", batched step {statistics.median(step) * 1e3:.2f} ms, routing "
                     f"{statistics.median(route) * 1e3:.3f} ms ({len(step)} steps of {n} rows)" if step else ""),
                  flush=True)
    await engine.stop()
    rows = []
    for n in levels:
        p = pooled[n]
        row: dict[str, Any] = {"streams": n, "tok_s": sum(p["tokens"]) / sum(p["seconds"])}
        if p["step"]:
            row["step_ms"] = statistics.median(p["step"]) * 1e3
            row["route_ms"] = statistics.median(p["route"]) * 1e3
        rows.append(row)
    one = next((r["tok_s"] for r in rows if r["streams"] == 1), None)
    print("| streams | tok/s | x one stream | batched step ms | routing ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        if one:
            r["x_one"] = r["tok_s"] / one
        print(f"| {r['streams']} | {r['tok_s']:.1f} | {r.get('x_one', float('nan')):.2f} | "
              f"{r.get('step_ms', float('nan')):.2f} | {r.get('route_ms', float('nan')):.3f} |")
    return {"args": {k: str(v) for k, v in vars(args).items()}, "model": engine.model.description,
            "drafter": engine.model.drafter, "backend": engine.model.backend, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,2,4,8", help="comma list of concurrent stream counts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after a warm-up round (pooled)")
    parser.add_argument("--server-args", default="", help="server flags for the model, e.g. '--no-draft'")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: the engine's per-row host cost")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dflash-engine-concurrency")
    args = parser.parse_args()
    maybe_reexec_with_blas()
    result = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "engine_concurrency.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"[engine-concurrency] wrote {path}")


if __name__ == "__main__":
    main()
