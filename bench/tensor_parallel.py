"""Tensor parallel: decode tok/s of one process against the same target split over N local ranks.

    python bench/tensor_parallel.py --model tiny --ranks 2 --out /tmp/tp-tiny       # tiny Qwen3, random draft
    python bench/tensor_parallel.py --model embedded --ranks 3 --out /tmp/tp-smol   # 9 heads: 3 ranks, not 2

For each drafter (none, then the draft: the shipped one for the embedded model, a random one for the tiny
Qwen3) two servers run side by side: `--tensor-parallel 1` and `--tensor-parallel N`, both with
--no-prefix-cache. Each round sends every prompt to both, in an order that alternates, so both see the
same load from other processes. Decode tok/s is (completion tokens - 1) / (time from the first content
delta to [DONE]), greedy; the texts must match. Under TP the adaptive width prices widths from a cost
curve agreed at start and learns no overheads from live cycles. On a machine with fewer cores than
ranks this measures overhead and correctness, not speed. JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that checks whether a number is prime.",
    "List five fruits and one fact about each.",
]


def tiny_dirs(folder: Path) -> tuple[Path, Path]:
    """The tiny Qwen3 of tests/runtime/test_distributed.py (4x init weights, SmolLM2's vocabulary) and a random draft."""
    from mlx.utils import tree_map

    from engine.model.gguf import read_gguf
    from engine.model.loader import embedded_model_path
    from engine.model.tokenizer import Tokenizer
    from tests.tiny_models import build_draft, build_target, draft_config, save_target, save_tiny_draft, target_config

    _, meta = read_gguf(embedded_model_path())
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    config = target_config("qwen3", vocab_size=tokenizer.vocab_size)
    model = build_target(config, seed=0)
    model.update(tree_map(lambda p: p * 4 if p.ndim == 2 else p, model.parameters()))
    target = save_target(model, config, folder / "target")
    tokenizer.hf.save_pretrained(target)
    draft = save_tiny_draft(build_draft(draft_config(config, mask_token_id=4), seed=1), folder / "draft")
    return target, draft


def compare(base_args: list[str], ranks: int, rounds: int, max_tokens: int, logs: Path) -> dict[str, Any]:
    servers = {n: Server([*base_args, "--no-prefix-cache", "--tensor-parallel", str(n), "--port", str(free_port())],
                         logs / f"tp{n}-{len(base_args)}.log", tiny=False) for n in (1, ranks)}
    try:
        health = {n: s.wait_ready() for n, s in servers.items()}
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in servers}
        for round_ in range(rounds):
            for i, prompt in enumerate(PROMPTS):
                order = list(servers) if (round_ + i) % 2 == 0 else list(reversed(servers))
                for n in order:
                    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
                    start = time.perf_counter()
                    first, end, text, usage = stream_chat(servers[n].client, body)
                    tokens = usage["completion_tokens"]
                    runs[n].append({"prompt": i, "round": round_, "tokens": tokens, "ttft_s": (first or end) - start,
                                    "decode_tok_s": (tokens - 1) / (end - first) if first and tokens > 1 else None,
                                    "text": text, "load": os.getloadavg()[0]})
    finally:
        for server in servers.values():
            server.stop()
    mismatched = [r["prompt"] for a, r in zip(runs[1], runs[ranks]) if a["text"] != r["text"]]
    return {
        "args": base_args, "backend": health[ranks]["backend"], "drafter": health[1]["drafter"],
        "mismatched_prompts": sorted(set(mismatched)),
        "ranks": {n: {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs if r["decode_tok_s"]),
                      "ttft_s": statistics.median(r["ttft_s"] for r in rs), "runs": rs} for n, rs in runs.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="tp-bench-")))
    args = p.parse_args()
    maybe_reexec_with_blas([__file__, *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        target, draft = tiny_dirs(args.out)
        configs = [["--model", str(target), "--no-draft"], ["--model", str(target), "--draft", str(draft)]]
    else:
        configs = [["--no-draft"], []]
    load0 = os.getloadavg()
    results = [compare(c, args.ranks, args.rounds, args.max_tokens, args.out) for c in configs]
    summary = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_before": load0,
               "load_after": os.getloadavg(), "max_tokens": args.max_tokens, "results": results}
    (args.out / "tensor_parallel.json").write_text(json.dumps(summary, indent=2))
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    for r in results:
        one, many = r["ranks"][1], r["ranks"][args.ranks]
        print(f"{r['drafter'][:40]:40s} 1 rank {one['decode_tok_s']:7.1f} tok/s   {args.ranks} ranks "
              f"{many['decode_tok_s']:7.1f} tok/s ({many['decode_tok_s'] / one['decode_tok_s']:.2f}x)   "
              f"TTFT {one['ttft_s'] * 1000:.0f} / {many['ttft_s'] * 1000:.0f} ms   "
              f"texts differ on prompts {r['mismatched_prompts'] or 'none'}")
    print(f"JSON: {args.out / 'tensor_parallel.json'}")


if __name__ == "__main__":
    main()
