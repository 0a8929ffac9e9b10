"""Plain decode speed of the embedded model per BLAS threading setting, on a quiet CPU and beside busy processes.

    python bench/blas_threads.py [--tokens 32] [--rounds 3] [--busy 0,2] [--settings mkl,mkl-passive,...]

Each setting runs in its own child process (LD_PRELOAD and the OpenMP variables are read at start),
which loads the model as the server does (engine/runtime/serving_model.prepare_model), prefills a
~300-token prompt and decodes greedily; a decode that passes --time-limit stops there. Settings run
interleaved, round after round, so a load that comes and goes hits all of them; `--busy N` starts N
spinning shell loops for the rows of that load. `launcher` is the environment blas.py's re-exec sets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.backend.blas import Blas, blas_reexec_env, find_mkl, find_openblas  # noqa: E402

# Cleared from the parent's environment so each row is exactly its own setting.
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "MKL_THREADING_LAYER", "LD_PRELOAD", "DFLASH_OPENBLAS_REEXEC", "DFLASH_BLAS", "DFLASH_NO_OPENBLAS")
SETTINGS: dict[str, tuple[str, dict[str, str]]] = {
    "launcher": ("mkl", {}),  # replaced by blas_reexec_env's variables
    "mkl": ("mkl", {"MKL_THREADING_LAYER": "GNU"}),
    "mkl-passive": ("mkl", {"MKL_THREADING_LAYER": "GNU", "OMP_WAIT_POLICY": "PASSIVE"}),
    "mkl-spin0": ("mkl", {"MKL_THREADING_LAYER": "GNU", "GOMP_SPINCOUNT": "0"}),
    "mkl-1thread": ("mkl", {"MKL_THREADING_LAYER": "GNU", "OMP_NUM_THREADS": "1"}),
    "openblas": ("openblas", {}),
    "openblas-1thread": ("openblas", {"OPENBLAS_NUM_THREADS": "1"}),
}
PROMPT = "Write a long story about a dragon who learns to bake bread. " * 24


def child(tokens: int, time_limit: float) -> None:
    """Load, prefill and decode as the server does; print one JSON line of timings."""
    from engine.decode.plain_decoder import PlainDecoder
    from engine.decode.sampling import SamplingParams, TokenRng
    from engine.model.loader import load_model
    from engine.runtime.serving_model import prepare_model

    loaded = load_model("embedded")
    prepare_model(loaded.model, fuse=True)
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    decoder = PlainDecoder(loaded.model)
    for _ in decoder.generate(prompt[:16], SamplingParams(temperature=0.0), 4, TokenRng(0)):
        pass  # warm-up
    start = time.perf_counter()
    stamps: list[float] = []
    for step in decoder.generate(prompt, SamplingParams(temperature=0.0), tokens, TokenRng(0)):
        if step.tokens:
            stamps.append(time.perf_counter())
        if stamps and stamps[-1] - stamps[0] > time_limit:
            break
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"prefill_s": stamps[0] - start, "tok_s": len(gaps) / (stamps[-1] - stamps[0]),
                      "median_ms": statistics.median(gaps) * 1e3, "max_ms": max(gaps) * 1e3,
                      "tokens": len(stamps), "prompt": len(prompt)}))


def parse_setting(name: str) -> tuple[str, dict[str, str]]:
    """A named setting, or an ad-hoc one: `mkl:GOMP_SPINCOUNT=30000` (a BLAS, then VAR=VALUE pairs)."""
    if name in SETTINGS:
        return SETTINGS[name]
    blas_name, *pairs = name.split(":")
    if blas_name not in ("mkl", "openblas") or not all("=" in p for p in pairs):
        raise ValueError(f"{name!r}: expected one of {', '.join(SETTINGS)} or mkl|openblas:VAR=VALUE[:VAR=VALUE]")
    extra = dict(p.split("=", 1) for p in pairs)
    return blas_name, {"MKL_THREADING_LAYER": "GNU", **extra} if blas_name == "mkl" else extra


def setting_env(name: str) -> dict[str, str] | None:
    blas_name, extra = parse_setting(name)
    library = find_mkl() if blas_name == "mkl" else find_openblas()
    if library is None:
        return None
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if name == "launcher":
        return blas_reexec_env(base, Blas(blas_name, library), on_cpu=True)
    return {**base, **extra, "LD_PRELOAD": str(library), "DFLASH_OPENBLAS_REEXEC": "1"}


def run_child(env: dict[str, str], tokens: int, time_limit: float) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--tokens", str(tokens), "--time-limit", str(time_limit)]
    done = subprocess.run(command, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=time_limit + 300)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(names: list[str], busy: int, rounds: int, tokens: int, time_limit: float) -> dict[str, list[dict]]:
    spinners = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(busy)]
    results: dict[str, list[dict]] = {name: [] for name in names}
    try:
        time.sleep(2 if busy else 0)
        for _ in range(rounds):
            for name in names:
                env = setting_env(name)
                if env is None:
                    continue
                load = os.getloadavg()[0]
                result = run_child(env, tokens, time_limit)
                results[name].append({**result, "load": load, "load_after": os.getloadavg()[0]})
                print(f"busy={busy} {name:17s} {json.dumps(results[name][-1])}", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return results


def summary(busy: int, name: str, runs: list[dict]) -> str:
    ok = [r for r in runs if "tok_s" in r]
    if not ok:
        return f"| {busy} | {name} | failed | | | | |"
    loads = [r["load"] for r in runs] + [r["load_after"] for r in runs]
    tok_s = sorted(r["tok_s"] for r in ok)
    return (f"| {busy} | {name} | {statistics.median(tok_s):.1f} ({tok_s[0]:.1f}-{tok_s[-1]:.1f}) "
            f"| {statistics.median(r['prefill_s'] for r in ok):.2f} | {max(r['max_ms'] for r in ok):.0f} "
            f"| {min(loads):.1f}-{max(loads):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds of decoding per run at most")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", default="0,2", help="comma list: spinning processes beside the rows")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma list of {', '.join(SETTINGS)} or mkl|openblas:VAR=VALUE[:...]")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write every run as JSON here")
    args = parser.parse_args()
    if args.child:
        return child(args.tokens, args.time_limit)
    names = args.settings.split(",")
    try:
        [parse_setting(name) for name in names]
    except ValueError as e:
        parser.error(str(e))
    print(f"{os.cpu_count()} cores; {args.tokens} tokens, {args.rounds} interleaved rounds per load")
    table = {}
    for busy in (int(b) for b in args.busy.split(",")):
        table[busy] = measure(names, busy, args.rounds, args.tokens, args.time_limit)
    if args.out:
        args.out.write_text(json.dumps({str(b): runs for b, runs in table.items()}, indent=1))
    print("| busy | setting | decode tok/s median (min-max) | prefill s | slowest step ms | load avg |")
    print("|---|---|---|---|---|---|")
    for busy, runs in table.items():
        for name in names:
            print(summary(busy, name, runs[name]))


if __name__ == "__main__":
    main()
