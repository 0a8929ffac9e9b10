"""Server overhead: the engine's decode speed in-process against the same server over HTTP.

    python bench/http_overhead.py --out /tmp/http-overhead              # the shipped DFlash draft
    python bench/http_overhead.py --no-draft --out /tmp/http-overhead   # plain decoding

One process loads the model exactly as `python -m server` does (the same flags through the server's
own build_config, so fusion, dequantize auto, the draft and the adaptive width match) and drives the
decoder's step stream directly; a real `python -m server` subprocess on a free port serves the same
config. Per prompt, in a rotating order each round: `engine` (in-process), `http-stream` (httpx over
SSE, completion tokens from stream_options.include_usage) and `http-nonstream`. Greedy; the API has
no ignore_eos, so answers end at EOS or --max-tokens and every method counts the same tokens
(checked). Reports tok/s, TTFT, the http/engine ratios (target >= 0.95), per-delta server-side costs
measured in-process, and the load average; JSON goes to --out. On Linux it re-execs with MKL or OpenBLAS
(the server subprocess inherits the preload).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx
import mlx.core as mx
from load_test import free_port

# bench/bench.py's prompts: this directory is sys.path[0] when run as a script
from bench import PROMPTS
from engine.backend.blas import blas_status, maybe_reexec_with_blas
from engine.decode.sampling import SamplingParams, TokenRng

GREEDY = SamplingParams(temperature=0.0)  # what the server builds for {"temperature": 0}
METHODS = ("engine", "http-stream", "http-nonstream")


@dataclass
class Run:
    method: str
    prompt: str
    round: int
    tokens: int  # completion tokens (EOS excluded, as the server's usage counts them)
    ttft_s: float | None  # request (or generate call) to the first content; None when not streamed
    total_s: float  # request to [DONE] / the last token / the response body
    text: str
    verify_steps: int  # speculative cycles (0 for plain decoding)
    load1: float
    cpu_s: float | None = None  # CPU time of the decoding process (all threads): this one or the server's
    client_cpu_s: float | None = None  # this process's CPU while it was the HTTP client

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.total_s

    @property
    def decode_tps(self) -> float | None:
        # first token to last: what bench/bench.py reports, free of prefill and request set-up
        return None if self.ttft_s is None else (self.tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)


def load_serving(server_argv: list[str], tiny: bool) -> Any:
    """The ServingModel `python -m server <server_argv>` builds, or the tiny random one (--tiny)."""
    from engine.runtime.serving_model import ServingModel
    from server.__main__ import build_config, parse_args

    return tiny_serving() if tiny else ServingModel.load(build_config(parse_args(server_argv)).engine)


def tiny_serving() -> Any:
    """A random 2-layer llama over SmolLM2's tokenizer (the tests' tiny_serving): decoding is nearly
    free, so what is left of a request's time is the server's own per-delta work."""
    from mlx_lm.models.llama import Model, ModelArgs

    from engine.decode.plain_decoder import PlainDecoder
    from engine.model.gguf import read_gguf
    from engine.model.loader import embedded_model_path
    from engine.model.tokenizer import Tokenizer
    from engine.runtime.serving_model import ServingModel

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(embedded_model_path())[1])
    mx.random.seed(0)  # the same weights in this process and in the server's
    model = Model(ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                            vocab_size=tokenizer.vocab_size, tie_word_embeddings=True))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return ServingModel(model_id="tiny", tokenizer=tokenizer, context_length=2048, plain=PlainDecoder(model),
                        speculative=None, drafter="none", backend="tiny", description="tiny random llama")


def serve_tiny(server_argv: list[str]) -> None:
    """The server process for --tiny: the real app and engine over tiny_serving()."""
    from engine.runtime.async_engine import AsyncEngine
    from server.__main__ import build_config, parse_args
    from server.app import create_app
    from server.graceful_server import serve

    config = build_config(parse_args(server_argv))
    serve(create_app(config, AsyncEngine(tiny_serving, max_waiting=config.engine.max_waiting)), config)


class Engine:
    """The server's decoders, loaded in this process as the server loads them."""

    def __init__(self, server_argv: list[str], tiny: bool) -> None:
        self.model = load_serving(server_argv, tiny)
        self.tokenizer = self.model.tokenizer
        spec = self.model.speculative
        self.decoder = spec if spec is not None and spec.supports(GREEDY) is None else self.model.plain
        self.eos = self.tokenizer.eos_token_ids

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    def run(self, name: str, round_: int, max_tokens: int) -> tuple[Run, list[list[int]]]:
        """Drive the step stream as the scheduler does (stop at EOS); also return the steps' tokens."""
        ids = self.prompt_ids(PROMPTS[name])
        steps: list[list[int]] = []
        cycles = 0
        cpu = time.process_time()
        start = time.perf_counter()
        first = None
        stream = self.decoder.generate(ids, GREEDY, max_tokens, TokenRng(None))
        try:
            for step in stream:
                cycles += step.drafted > 0
                kept = []
                for token in step.tokens:
                    if token in self.eos:
                        break
                    kept.append(token)
                if kept:
                    steps.append(kept)
                    first = first or time.perf_counter()
                if len(kept) < len(step.tokens):
                    break
        finally:
            stream.close()  # the decoder's cache rewind, as Scheduler.finish does
        total = time.perf_counter() - start
        tokens = [t for s in steps for t in s]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        run = Run("engine", name, round_, len(tokens), (first or start + total) - start, total, text, cycles,
                  os.getloadavg()[0], time.process_time() - cpu)
        return run, steps


class Server:
    """`python -m server` on a free port; started and stopped (SIGTERM, wait) by this script."""

    def __init__(self, server_argv: list[str], log_path: Path, tiny: bool) -> None:
        self.log = log_path.open("w")
        command = [__file__, "--serve-tiny"] if tiny else ["-m", "server"]
        self.proc = subprocess.Popen([sys.executable, *command, *server_argv], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        port = server_argv[server_argv.index("--port") + 1]
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=httpx.Timeout(300.0, connect=10.0))

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = self.client.get("/health")
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server was not ready after {timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> int | None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains in-flight requests, then exits 0
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def cpu_s(self) -> float | None:
        """The server process's CPU seconds so far (user + system, all threads; Linux only)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def timed(self, run: Any, *args: Any) -> Run:
        """A request with the server's and this client's CPU time around it."""
        server0, client0 = self.cpu_s(), time.process_time()
        result: Run = run(*args)
        server1 = self.cpu_s()
        result.cpu_s = None if server0 is None or server1 is None else server1 - server0
        result.client_cpu_s = time.process_time() - client0
        return result

    def body(self, name: str, max_tokens: int, stream: bool) -> dict[str, Any]:
        body = {"messages": [{"role": "user", "content": PROMPTS[name]}], "temperature": 0,
                "max_tokens": max_tokens, "stream": stream}
        return {**body, "stream_options": {"include_usage": True}} if stream else body

    def stream(self, name: str, round_: int, max_tokens: int) -> Run:
        start = time.perf_counter()
        first, end, text, usage = stream_chat(self.client, self.body(name, max_tokens, True))
        return Run("http-stream", name, round_, usage["completion_tokens"], (first or end) - start, end - start,
                   text, usage["speculative"]["verify_steps"], os.getloadavg()[0])

    def nonstream(self, name: str, round_: int, max_tokens: int) -> Run:
        start = time.perf_counter()
        r = self.client.post("/v1/chat/completions", json=self.body(name, max_tokens, False))
        end = time.perf_counter()
        r.raise_for_status()
        out = r.json()
        usage = out["usage"]
        return Run("http-nonstream", name, round_, usage["completion_tokens"], None, end - start,
                   out["choices"][0]["message"]["content"], usage["speculative"]["verify_steps"], os.getloadavg()[0])


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> tuple[float | None, float, str, dict[str, Any]]:
    """One streamed chat request: perf_counter() at its first content delta and at [DONE], its text, its usage."""
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    first = end = None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue  # blank separators and ": ping" comments
            if line == "data: [DONE]":
                end = time.perf_counter()
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for choice in chunk["choices"]:
                if content := choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    parts.append(content)
            usage = chunk.get("usage") or usage
    assert end is not None and usage is not None, "the stream ended without usage and [DONE]"
    return first, end, "".join(parts), usage


def delta_costs_us(engine: Engine, steps: list[list[int]], repeats: int = 20) -> dict[str, float]:
    """Host work the server adds per delta (one decode step), timed in-process on real steps (µs)."""
    from sse_starlette.event import ServerSentEvent

    from engine.runtime.detokenizer import Detokenizer
    from server.chat_output import ChatOutput
    from server.responses import Envelope

    def per_delta(fn: Any) -> float:
        best = float("inf")  # the minimum over repeats: the cost itself, not the machine's load
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return 1e6 * best / len(steps)

    def detokenize() -> None:
        d = Detokenizer(engine.tokenizer)
        for s in steps:
            d.add(s)

    texts = [engine.tokenizer.decode(s) for s in steps]
    envelope = Envelope("chat", "model")

    def chunks() -> None:
        output = ChatOutput()
        for text in texts:
            delta = output.feed(text).as_delta()
            chunk = {**envelope.head("chat.completion.chunk"),
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], "usage": None}
            ServerSentEvent(data=json.dumps(chunk, ensure_ascii=False), sep="\n").encode()

    return {"detokenize": per_delta(detokenize), "chunk_json_sse": per_delta(chunks)}


def summarize(runs: list[Run]) -> dict[str, Any]:
    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    methods: dict[str, Any] = {}
    for method in METHODS:
        mine = [r for r in runs if r.method == method]
        steps = sum(r.verify_steps for r in mine)
        methods[method] = {
            "tok_s_decode": med([r.decode_tps for r in mine if r.decode_tps is not None]),
            "tok_s_e2e": med([r.e2e_tps for r in mine]),
            "tok_s_pooled": sum(r.tokens for r in mine) / sum(r.total_s for r in mine),
            "ttft_ms": med([1e3 * r.ttft_s for r in mine if r.ttft_s is not None]),
            "tokens": sum(r.tokens for r in mine),
            "verify_steps": steps,
            # CPU per token of the decoding process: the server's extra is its host work
            "cpu_ms_per_token": cpu_per_token(mine, "cpu_s"),
            "client_cpu_ms_per_token": cpu_per_token(mine, "client_cpu_s"),  # drafted cycles; the adaptive width may run some steps plainly
        }
    engine = {(r.prompt, r.round): r for r in runs if r.method == "engine"}

    def paired(method: str, rate: str) -> float | None:
        # per (prompt, round): runs next to each other share the machine's load
        ratios = [getattr(r, rate) / getattr(engine[r.prompt, r.round], rate)
                  for r in runs if r.method == method and getattr(r, rate) is not None]
        return med(ratios)

    ratios = {
        "stream_decode": paired("http-stream", "decode_tps"),
        "stream_e2e": paired("http-stream", "e2e_tps"),
        "nonstream_e2e": paired("http-nonstream", "e2e_tps"),
    }
    # wall time the server adds to a whole request, per token (HTTP, queueing, detokenizing, framing)
    extra = {method: 1e3 * med([(r.total_s - engine[r.prompt, r.round].total_s) / r.tokens
                                for r in runs if r.method == method])
             for method in METHODS[1:]}
    return {"methods": methods, "ratio_http_over_engine": ratios, "added_wall_ms_per_token": extra}


def cpu_per_token(runs: list[Run], attr: str) -> float | None:
    values = [(getattr(r, attr), r.tokens) for r in runs if getattr(r, attr) is not None]
    return 1e3 * sum(v for v, _ in values) / sum(n for _, n in values) if values else None


def check_same(runs: list[Run]) -> list[str]:
    """Greedy: every method must write the same tokens (count) and the same text per prompt."""
    problems = []
    for r in runs:
        ref = next(e for e in runs if e.method == "engine" and e.prompt == r.prompt and e.round == r.round)
        if r.tokens != ref.tokens or r.text != ref.text:
            problems.append(f"{r.method} {r.prompt} round {r.round}: {r.tokens} tokens vs engine {ref.tokens}"
                            + ("" if r.text == ref.text else ", text differs"))
    return problems


def print_summary(summary: dict[str, Any], load: list[float]) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"\n{'method':<16} {'decode tok/s':>12} {'e2e tok/s':>10} {'TTFT ms':>8} {'verify':>6} {'tokens':>7} "
          f"{'CPU ms/tok':>10} {'client':>6}")
    for name, m in summary["methods"].items():
        print(f"{name:<16} {fmt(m['tok_s_decode'], '12.2f')} {m['tok_s_e2e']:10.2f} {fmt(m['ttft_ms'], '8.1f')} "
              f"{m['verify_steps']:6d} {m['tokens']:7d} {fmt(m['cpu_ms_per_token'], '10.2f')} "
              f"{fmt(m['client_cpu_ms_per_token'], '6.2f')}")
    r = summary["ratio_http_over_engine"]
    print(f"http/engine: stream decode {r['stream_decode']:.3f}, stream e2e {r['stream_e2e']:.3f}, "
          f"non-stream e2e {r['nonstream_e2e']:.3f} (target >= 0.95); wall ms added per token: "
          + ", ".join(f"{k} {v:.2f}" for k, v in summary["added_wall_ms_per_token"].items()))
    print(f"load average (1 min) during the runs: {min(load):.2f}-{max(load):.2f}")


def main() -> None:
    if sys.argv[1:2] == ["--serve-tiny"]:  # this script as the --tiny server process
        maybe_reexec_with_blas()
        return serve_tiny(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-draft", action="store_true", help="plain decoding (the server's --no-draft)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model on both sides instead: the server's per-delta cost laid bare")
    parser.add_argument("--server-args", default="", help="more server flags, e.g. '--block-size 8' (both paths)")
    # the defaults keep a run under 3 minutes on a 2-core CPU (~8 tok/s); raise them on faster machines
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds after a short warm-up round")
    parser.add_argument("--prompts", default="code,chat,math", help=f"comma list of {', '.join(PROMPTS)}")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dflash-http-overhead")
    args = parser.parse_args()
    maybe_reexec_with_blas()
    args.out.mkdir(parents=True, exist_ok=True)
    server_argv = ["--port", str(free_port()), *(["--no-draft"] if args.no_draft else []), *args.server_args.split()]
    name = "tiny" if args.tiny else "nodraft" if args.no_draft else "dflash"
    server = Server(server_argv, args.out / f"server_{name}.log", args.tiny)  # loads while this process loads its copy
    try:
        engine = Engine(server_argv, args.tiny)
        health = server.wait_ready()
        machine = (f"{platform.machine()} {os.cpu_count()} CPUs, MLX {mx.__version__} {mx.default_device()}, "
                   f"{blas_status()}; server: {health['backend']}")
        print(f"[http-overhead] {engine.model.description}; decoder {engine.decoder.name}; server drafter "
              f"{health['drafter']}; {machine}", flush=True)
        runs, load, steps = measure(engine, server, args)
    finally:
        code = server.stop()
    summary = summarize(runs)
    summary["delta_costs_us"] = delta_costs_us(engine, steps)
    print_summary(summary, load)
    print(f"per delta in-process: {summary['delta_costs_us']}; server exit status {code}")
    problems = check_same(runs)
    for p in problems:
        print(f"[http-overhead] MISMATCH {p}")
    out = {"machine": machine, "model": engine.model.description, "decoder": engine.decoder.name,
           "server_argv": server_argv, "args": {k: str(v) for k, v in vars(args).items()},
           "load_average_1min": load, "server_exit_status": code, "mismatches": problems,
           "summary": summary, "runs": [{**asdict(r), "text": r.text[:80]} for r in runs]}
    path = args.out / f"http_overhead_{name}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"[http-overhead] wrote {path}")


def measure(engine: Engine, server: Server, args: argparse.Namespace) -> tuple[list[Run], list[float], list[list[int]]]:
    """Rounds of (prompt x method) in a rotating order; round 0 is a short warm-up (cost curves, caches)."""
    runs: list[Run] = []
    load = [os.getloadavg()[0]]
    steps: list[list[int]] = []
    names = args.prompts.split(",")
    for round_ in range(args.rounds + 1):
        max_tokens = args.max_tokens if round_ else 16
        for i, name in enumerate(names):
            k = (i + round_) % len(METHODS)
            for method in METHODS[k:] + METHODS[:k]:
                if method == "engine":
                    run, run_steps = engine.run(name, round_, max_tokens)
                    steps = steps if len(steps) >= len(run_steps) else run_steps  # the longest, for delta_costs_us
                elif method == "http-stream":
                    run = server.timed(server.stream, name, round_, max_tokens)
                else:
                    run = server.timed(server.nonstream, name, round_, max_tokens)
                if round_:
                    runs.append(run)
            load.append(os.getloadavg()[0])
            if round_:
                print(f"[http-overhead] round {round_} {name}: " + ", ".join(
                    f"{r.method} {r.tokens} tok {r.e2e_tps:.1f} tok/s" for r in runs[-len(METHODS):]), flush=True)
    return runs, load, steps


if __name__ == "__main__":
    main()
