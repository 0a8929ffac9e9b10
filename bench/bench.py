"""Decode speed, one process, interleaved: plain, mlx-lm, our speculative decoder, the reference.

    python bench/bench.py --drafter oracle,ngram,dflash --out /tmp/dflash-bench   # random DFlash draft
    python bench/bench.py --drafter dflash --draft PATH --out /tmp/dflash-bench   # a trained draft

Greedy, EOS ignored, so every method writes exactly --max-tokens tokens per prompt (the same
tokens: outputs are checked against plain decoding). Methods run round-robin per prompt, in a
rotating order, after a short warm-up round; medians over prompts x rounds are reported.
Rows: `plain` (PlainDecoder), `mlx_lm` (mlx_lm.stream_generate on the same model object),
`spec-<drafter>` (adaptive verify width) and `spec-<drafter>-fixed` (full width every cycle),
`spec-<drafter>-tree-<N>` with --tree-budget (auto: the adaptive controller chooses a chain or a tree
per cycle; a number: that tree every cycle), and `reference` (dflash==0.1.0 `dflash/model_mlx.py`, on its own copy of the target) when the
DFlash drafter runs. The target is prepared as the server prepares it (packed projections unless
--no-fuse; verify-width kernels on a GPU), shared by every row but the reference, which runs its
own copy as dflash==0.1.0 loads it. JSON and a PNG chart go to --out. On Linux it re-execs with MKL or OpenBLAS.

    python bench/bench.py --drafter dflash --draft engine/drafts/smollm2-135m-instruct-dflash \
        --response-format bench/schemas/person.json --skip mlx_lm,reference,spec-dflash-fixed

--response-format FILE (a response_format object, or a bare JSON Schema) adds a `+json` row for plain and each
speculative row: the same decoder under the grammar (structured outputs), greedy, ending at EOS once the value
is complete, on prompts that ask for JSON; `mask ms` is the host time of the constraint (checks, top-k, masks,
draft checks) per generated token, `x unc` the row's speed against its unconstrained twin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx

from engine.backend.attention_kernel import default_kernel as default_attention_kernel
from engine.backend.blas import blas_status, maybe_reexec_with_blas
from engine.decode.sampling import SamplingParams, TokenRng
from engine.runtime.serving_model import prepare_draft, prepare_model

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = {
    "code": "Write a Python function that merges two sorted lists into one sorted list, with a docstring.",
    "code2": "Write a Python class for a stack with push, pop and peek methods, and explain each one.",
    "chat": "Tell me a short story about a fox who visits a city for the first time.",
    "chat2": "What are three benefits of regular exercise? Explain each briefly.",
    "math": "A bakery sells muffins for $3 each and cookies for $1.50 each. Maya buys 4 muffins and "
            "6 cookies. How much does she spend in total? Think step by step.",
    "math2": "Tom has 48 marbles. He gives a quarter of them to his sister and then buys 15 more. How "
             "many marbles does he have now? Think step by step.",
}
JSON_PROMPTS = {  # --response-format: prompts whose answer is the JSON object
    "person": "Describe a fictional person as a JSON object.",
    "book": "Describe a science fiction book as a JSON object.",
    "city": "Describe a city you would like to visit, as JSON.",
    "recipe": "Give me a simple pancake recipe as a JSON object.",
    "product": "Describe a new smartphone as a JSON object.",
    "event": "Describe a music festival as a JSON object.",
}


@dataclass
class Run:
    method: str
    prompt: str
    tokens: list[int]
    ttft_s: float  # call to first token: prefill and first sample (and any lazy setup)
    decode_s: float  # first token to last
    cycles: int = 0
    accepted: int = 0
    split_ms: dict[str, float] = field(default_factory=dict)  # per-cycle medians: draft, verify, other
    trees: int = 0  # cycles that verified a tree
    mask_s: float = 0.0  # host time of the constraint (--response-format rows)

    @property
    def tps(self) -> float:
        return (len(self.tokens) - 1) / max(self.decode_s, 1e-9)


def adaptive_against_best(runs: list[Run], rival: str = "fixed") -> dict[str, dict[str, float]]:
    """Per drafter with `rival` rows (fixed: fixed verify widths; block: shorter draft blocks), per prompt: the
    adaptive row's tok/s over the best of plain and those rows (all rounds pooled: tokens over decode seconds)."""
    pooled: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        tokens_seconds = pooled.setdefault((r.method, r.prompt), [0.0, 0.0])
        tokens_seconds[0] += len(r.tokens) - 1
        tokens_seconds[1] += r.decode_s
    tps = {key: t / max(sec, 1e-9) for key, (t, sec) in pooled.items()}
    out: dict[str, dict[str, float]] = {}
    for method, prompt in tps:
        if not (method.startswith("spec-") and method.count("-") == 1):  # the adaptive row: spec-<drafter>
            continue
        rivals = [v for (m, p), v in tps.items() if p == prompt and (m == "plain" or m.startswith(f"{method}-{rival}-"))]
        if any(m.startswith(f"{method}-{rival}-") for m, _ in tps):
            out.setdefault(method, {})[prompt] = tps[(method, prompt)] / max(rivals)
    return out


def timed(stream: Iterator[list[int]]) -> tuple[list[int], float, float]:
    """Drain a stream of token lists: (tokens, ttft, decode seconds)."""
    start = time.perf_counter()
    tokens: list[int] = []
    first = 0.0
    for new in stream:
        if new and not tokens:
            first = time.perf_counter()
        tokens += new
    return tokens, first - start, time.perf_counter() - first


def decoder_stream(decoder: Any, ids: list[int], n: int, constraint: Any = None) -> Iterator[list[int]]:
    if constraint is None:
        return (step.tokens for step in decoder.generate(ids, GREEDY, n, TokenRng(0)))
    params = SamplingParams(temperature=0.0, grammar=constraint.grammar.key)
    return (step.tokens for step in decoder.generate(ids, params, n, TokenRng(0, by_position=True),
                                                     constraint=constraint))


def read_response_format(path: Path) -> str:
    """The grammar spec of a --response-format file: a response_format object or a bare JSON Schema."""
    from engine.grammar.constraint import compile_spec, json_object_spec, json_schema_spec

    data = json.loads(path.read_text())
    if data.get("type") == "json_object":
        spec = json_object_spec()
    elif data.get("type") == "json_schema" and isinstance(data.get("json_schema"), dict):
        spec = json_schema_spec(data["json_schema"]["schema"])
    else:
        spec = json_schema_spec(data)
    compile_spec(spec)  # a SchemaError names what cannot be enforced
    return spec


def split_ms(decoder: Any, ids: list[int], n: int, constraint: Any = None) -> dict[str, float]:
    """A run with a sync after the draft and after the verify (costs the overlap; not timed)."""
    decoder.timing = "split"
    try:
        timed(decoder_stream(decoder, ids, n, constraint))
    finally:
        decoder.timing = None
    timings = decoder.stats.timings
    med = lambda xs: 1e3 * statistics.median(xs) if xs else float("nan")
    return {
        "draft": med([t.draft_s for t in timings]),
        "verify": med([t.verify_s for t in timings]),
        "other": med([t.cycle_s - t.draft_s - t.verify_s for t in timings]),
    }


def cast_model(model: Any, dtype: str) -> Any:
    """The target in `dtype` (weights already dequantized), or as loaded for "native"."""
    if dtype != "native":
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
    return model


def load_served(spec: str, dtype: str, fuse: bool = True) -> tuple[Any, Any, str]:
    """(loaded, the target, what preparing did): for "native" as the server loads and prepares it (the
    quantized CPU kernel where it runs), else dequantized and cast to `dtype`, then prepared."""
    from engine.model.loader import load_model
    from engine.runtime.config import EngineConfig
    from engine.runtime.serving_model import load_target

    if dtype == "native":
        loaded, prepared = load_target(EngineConfig(model=spec, fuse_projections=fuse))
        return loaded, loaded.model, prepared
    loaded = load_model(spec, dequantize=True)
    model = cast_model(loaded.model, dtype)
    return loaded, model, prepare_model(model, fuse=fuse)


def one_cpu_stream() -> Any:
    """The stream mlx_lm's loop and the reference decode on: on the CPU, the default one.

    Each CPU stream is a worker thread, and under MKL each thread that calls BLAS gets its own OpenMP
    team: once a second stream had decoded, every method here ran ~30% slower (2 cores, 24 -> 17
    tok/s plain). A method alone in a process has one stream computing, as every method has here.
    """
    from mlx_lm.generate import (
        generation_stream,  # (the package's `generate` attribute is the function)
    )

    return mx.default_stream(mx.cpu) if mx.default_device() == mx.cpu else generation_stream


class Bench:
    """The methods under test, sharing one loaded target."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stream = one_cpu_stream()
        self.loaded, self.model, self.prepared = load_served(args.model, args.target_dtype, fuse=not args.no_fuse)
        self.wrapper = self._no_eos_wrapper()
        self.plain_out: dict[str, list[int]] = {}
        self.measuring = False  # False in the warm-up round
        self.methods: dict[str, Callable[[str, list[int]], Run]] = {"plain": self.plain}
        self.grammar = read_response_format(args.response_format) if args.response_format else None
        if self.grammar is not None:
            self.methods["plain+json"] = self.plain_json
        if "mlx_lm" not in args.skip:
            self.methods["mlx_lm"] = self.mlx_lm
        self.draft_dir: Path | None = None
        for name in args.drafter.split(","):
            self._add_speculative(name)
        if self.draft_dir is not None and "reference" not in args.skip:
            self._add_reference()

    def _no_eos_wrapper(self) -> Any:
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        wrapper = TokenizerWrapper(self.loaded.tokenizer.hf)
        wrapper._eos_token_ids = set()  # every method writes exactly max_tokens
        return wrapper

    def plain(self, name: str, ids: list[int]) -> Run:
        from engine.decode.plain_decoder import PlainDecoder

        tokens, ttft, dec = timed(decoder_stream(PlainDecoder(self.model), ids, self.args.max_tokens))
        if len(tokens) > len(self.plain_out.get(name, [])):
            self.plain_out[name] = tokens
        return Run("plain", name, tokens, ttft, dec)

    def constraint(self) -> Any:
        from engine.grammar.constraint import make_constraint

        tokenizer = self.loaded.tokenizer
        return make_constraint(self.grammar, tokenizer, tokenizer.eos_token_ids)

    def plain_json(self, name: str, ids: list[int]) -> Run:
        from engine.decode.plain_decoder import PlainDecoder

        constraint = self.constraint()
        tokens, ttft, dec = timed(decoder_stream(PlainDecoder(self.model), ids, self.args.max_tokens, constraint))
        self.plain_out[f"{name}+json"] = tokens
        return Run("plain+json", f"{name}+json", tokens, ttft, dec, mask_s=constraint.stats.seconds)

    def mlx_lm(self, name: str, ids: list[int]) -> Run:
        from mlx_lm import stream_generate

        stream = ([r.token] for r in stream_generate(self.model, self.wrapper, ids, max_tokens=self.args.max_tokens,
                                                     stream=self.stream))
        return Run("mlx_lm", name, *timed(stream))

    def _add_speculative(self, drafter: str) -> None:
        from engine.decode.drafters import DFlashDrafter, NgramDrafter, OracleDrafter
        from engine.decode.proposal_head import load_proposal_head
        from engine.decode.speculative import SpeculativeDecoder
        from engine.model.target import Target

        block = self.args.block_size
        if drafter == "dflash":
            draft = self._draft()
            target = Target(self.model, draft.config.target_layer_ids)
            # as the server builds it: greedy proposals over the draft's proposal vocabulary, where it ships one
            head = load_proposal_head(self.draft_dir, target.output_head,
                                      output_multiplier=draft.config.output_multiplier)
            make = lambda: DFlashDrafter(draft, target, head)
        elif drafter in ("ngram", "oracle"):
            target = Target(self.model)
            vocab = self.loaded.tokenizer.vocab_size  # the oracle's continuation is set per prompt
            make = NgramDrafter if drafter == "ngram" else lambda: OracleDrafter([], vocab_size=vocab)
        else:
            raise SystemExit(f"unknown --drafter {drafter!r}; use ngram, oracle or dflash")
        variants: list[tuple[str, bool, int | str, int, int | None]] = [
            (f"spec-{drafter}", True, 0, block, None), (f"spec-{drafter}-fixed", False, 0, block, None)]
        for width in self.args.fixed_widths:  # `width` drafts of the full block verified: what the controller chooses among
            variants.append((f"spec-{drafter}-fixed-{width}", False, 0, block, width))
        for width in self.args.fixed_blocks:  # a shorter draft block of width + 1 rows, all verified (--block-size)
            variants.append((f"spec-{drafter}-block-{width}", False, 0, width + 1, None))
        for budget in filter(None, self.args.tree_budget.split(",")):
            auto = budget == "auto"
            variants.append((f"spec-{drafter}-tree-{budget}", auto, budget if auto else int(budget), block, None))
        for label, adaptive, budget, size, width in variants:
            if label in self.args.skip:
                continue
            decoder = SpeculativeDecoder(target, make(), block_size=size, adaptive=adaptive, width=width,
                                         tree_budget=budget, tree_spine=self.args.tree_spine)
            if budget and not decoder.tree_budgets:
                raise SystemExit(f"{label}: trees are {decoder.tree_status}")
            if mx.default_device() == mx.gpu and drafter != "oracle":  # as the server warms up: kernels compile
                decoder.rehearse()
            self.methods[label] = self._speculative_runner(label, decoder, drafter == "oracle")
            if self.grammar is not None and not budget:  # its own decoder: the width controller learns apart
                twin = SpeculativeDecoder(target, make(), block_size=block, adaptive=adaptive)
                self.methods[f"{label}+json"] = self._speculative_runner(f"{label}+json", twin, drafter == "oracle",
                                                                         constrained=True)

    def _speculative_runner(self, label: str, decoder: Any, oracle: bool,
                            constrained: bool = False) -> Callable[[str, list[int]], Run]:
        from engine.decode.drafters import OracleDrafter

        splits: dict[str, dict[str, float]] = {}
        suffix = "+json" if constrained else ""

        def run(name: str, ids: list[int]) -> Run:
            if oracle:  # the known continuation: plain decoding's output for this prompt
                decoder.drafter = OracleDrafter(self.plain_out[name + suffix], vocab_size=self.loaded.tokenizer.vocab_size)
            constraint = self.constraint() if constrained else None
            tokens, ttft, dec = timed(decoder_stream(decoder, ids, self.args.max_tokens, constraint))
            stats = decoder.stats
            if self.measuring and name not in splits and stats.cycles:
                splits[name] = split_ms(decoder, ids, self.args.max_tokens, self.constraint() if constrained else None)
            trees = sum(1 for b in stats.budgets if b)
            return Run(label, name + suffix, tokens, ttft, dec, stats.cycles, stats.accepted, splits.get(name, {}),
                       trees, constraint.stats.seconds if constraint is not None else 0.0)

        return run

    def _draft(self) -> Any:
        from engine.model.draft import load_draft, save_draft

        args = self.model.args
        if self.args.draft:
            self.draft_dir = Path(self.args.draft)
        else:  # a random draft in the published layout, so the reference can load it too
            from spec_cycle import random_draft

            from engine.model.target import Target

            self.draft_dir = Path(tempfile.mkdtemp(prefix="random-draft-"))
            with Target(self.model) as bare:
                save_draft(random_draft(bare, self.model, self.args.block_size), self.draft_dir, dtype=mx.float32)
        draft = load_draft(self.draft_dir, target_hidden_size=args.hidden_size,
                           target_vocab_size=args.vocab_size, target_num_layers=args.num_hidden_layers)
        prepare_draft(draft, self.model)  # as the server does
        return draft

    def _add_reference(self) -> None:
        try:
            import dflash.model_mlx as ref
        except ImportError:
            print("[bench] dflash==0.1.0 not installed: no reference row")
            return
        from engine.model.loader import load_model

        ref.snapshot_download = lambda *a, **k: str(self.draft_dir)  # a local directory, no hub
        ref.generation_stream = self.stream  # it imports mlx-lm's by name (see one_cpu_stream)
        ref_draft = ref.load_draft("local/draft")
        native = self.args.target_dtype == "native"  # its layer hooks stay off our model
        ref_model = cast_model(load_model(self.args.model, dequantize=None if native else True).model, self.args.target_dtype)

        def run(name: str, ids: list[int]) -> Run:
            responses = ref.stream_generate(ref_model, ref_draft, self.wrapper, mx.array(ids),
                                            block_size=self.args.block_size, max_tokens=self.args.max_tokens)
            steps: list[list[int]] = []
            tokens, ttft, dec = timed(steps.append(r.tokens) or r.tokens for r in responses)
            cycles = [s for s in steps[1:] if s]
            return Run("reference", name, tokens, ttft, dec, len(cycles), sum(len(s) - 1 for s in cycles))

        self.methods["reference"] = run


def summarize(runs: list[Run], plain_out: dict[str, list[int]]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        cycles = sum(r.cycles for r in mine)
        splits = [r.split_ms for r in mine if r.split_ms]
        rows.append({
            "method": method,
            "tok_s": statistics.median(r.tps for r in mine),
            "ttft_ms": 1e3 * statistics.median(r.ttft_s for r in mine),
            "tau": (sum(r.accepted for r in mine) + cycles) / cycles if cycles else None,
            "tree_share": sum(r.trees for r in mine) / cycles if cycles else None,
            **{f"{k}_ms": statistics.median(s[k] for s in splits) for k in ("draft", "verify", "other") if splits},
            "same_as_plain": sum(r.tokens == plain_out[r.prompt] for r in mine) / len(mine),
            "mask_ms_per_token": (1e3 * sum(r.mask_s for r in mine) / sum(len(r.tokens) for r in mine)
                                  if method.endswith("+json") else None),
            "tokens": statistics.median(len(r.tokens) for r in mine),
        })
    base = {row["method"]: row["tok_s"] for row in rows}
    for row in rows:
        for ref in ("plain", "mlx_lm", "reference"):
            if ref in base:
                row[f"x_{ref}"] = row["tok_s"] / base[ref]
        chain = row["method"].split("-tree-")[0]
        if chain != row["method"] and chain in base:  # a tree row against its drafter's adaptive chain
            row["x_chain"] = row["tok_s"] / base[chain]
        twin = row["method"].removesuffix("+json")
        if twin != row["method"] and twin in base:  # a constrained row against its unconstrained twin
            row["x_unconstrained"] = row["tok_s"] / base[twin]
            if "plain+json" in base:
                row["x_plain"] = row["tok_s"] / base["plain+json"]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"\n{'method':<25} {'tok/s':>6} {'x plain':>7} {'x mlx_lm':>8} {'x ref':>6} {'TTFT ms':>8} {'tau':>5} "
          f"{'draft':>6} {'verify':>6} {'other':>6} {'same':>5} {'trees':>5} {'x chain':>7} {'mask ms':>7} {'x unc':>6} "
          f"{'tokens':>6}")
    for r in rows:
        print(f"{r['method']:<25} {r['tok_s']:6.2f} {fmt(r.get('x_plain'), '7.2f')} {fmt(r.get('x_mlx_lm'), '8.2f')} "
              f"{fmt(r.get('x_reference'), '6.2f')} {r['ttft_ms']:8.0f} {fmt(r['tau'], '5.2f')} "
              f"{fmt(r.get('draft_ms'), '6.1f')} {fmt(r.get('verify_ms'), '6.1f')} {fmt(r.get('other_ms'), '6.1f')} "
              f"{r['same_as_plain']:5.2f} {fmt(r.get('tree_share'), '5.2f')} {fmt(r.get('x_chain'), '7.3f')} "
              f"{fmt(r.get('mask_ms_per_token'), '7.3f')} {fmt(r.get('x_unconstrained'), '6.3f')} {r['tokens']:6.0f}")


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the plot is optional: pip install -e '.[bench]'
        print(f"matplotlib is not installed (pip install -e '.[bench]'): {path.name} skipped", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    bars = ax.bar([r["method"] for r in rows], [r["tok_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['x_plain']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tok/s (median)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="engine.model.loader spec")
    parser.add_argument("--drafter", default="oracle,ngram,dflash", help="comma list of ngram, oracle, dflash")
    parser.add_argument("--draft", default=None, help="DFlash draft directory (published layout); default: random")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--target-dtype", choices=("native", "bfloat16", "float16", "float32"), default="native",
                        help="cast the target after loading (native: as the server loads it)")
    parser.add_argument("--no-fuse", action="store_true", help="keep separate Q/K/V and gate/up matmuls")
    parser.add_argument("--attention", choices=("auto", "fused", "unfused"), default=None,
                        help="block attention path (engine/model/attention.py; default: DFLASH_ATTENTION or auto)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up round")
    parser.add_argument("--prompts", default=None, help=f"comma list of {', '.join(PROMPTS)} "
                        f"(--response-format: of {', '.join(JSON_PROMPTS)})")
    parser.add_argument("--tree-budget", default="", metavar="auto|N[,..]",
                        help="also rows with tree verification: auto (the controller picks chain or tree per cycle), "
                             "or N nodes every cycle")
    parser.add_argument("--tree-spine", action="store_true", help="trees hold the top-1 chain first")
    parser.add_argument("--fixed-widths", type=lambda v: [int(w) for w in v.split(",") if w], default=[],
                        metavar="W[,..]", help="also rows that verify the first W drafts of the full block every cycle "
                        "(spec-<drafter>-fixed-W, the widths the adaptive row chooses among); the adaptive row is then "
                        "checked per prompt against the best of them and plain decoding")
    parser.add_argument("--fixed-blocks", type=lambda v: [int(w) for w in v.split(",") if w], default=[],
                        metavar="W[,..]", help="also rows with a shorter draft block of W + 1 rows, all verified "
                        "(spec-<drafter>-block-W: --block-size W+1 without adaptation), compared the same way")
    parser.add_argument("--skip", type=lambda v: set(filter(None, v.split(","))), default=set(),
                        metavar="M1,M2", help="leave out these rows (mlx_lm, reference, spec-<drafter>-fixed, ...)")
    parser.add_argument("--response-format", type=Path, default=None, metavar="FILE",
                        help="also +json rows: the decoders under this response_format (or bare JSON Schema), on "
                             "prompts asking for JSON (unless --prompts names others)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dflash-bench")
    args = parser.parse_args()
    maybe_reexec_with_blas()
    from engine.model import attention

    attention.set_mode(args.attention)
    bench = Bench(args)
    machine = f"MLX {mx.__version__} {mx.default_device()}, {blas_status()}"
    print(f"[bench] {bench.loaded.description}, {args.target_dtype}, {bench.prepared}, "
          f"attention {attention.mode()}; {machine}")
    prompts = JSON_PROMPTS if args.response_format else PROMPTS
    names = (args.prompts or ",".join(prompts)).split(",")
    ids = {n: bench.loaded.tokenizer.apply_chat_template([{"role": "user", "content": {**PROMPTS, **JSON_PROMPTS}[n]}])
           for n in names}
    runs: list[Run] = []
    max_tokens = args.max_tokens
    methods = list(bench.methods)
    for round_ in range(args.rounds + 1):
        args.max_tokens = max_tokens if round_ else min(16, max_tokens)  # a short warm-up round
        bench.measuring = round_ > 0
        for i, name in enumerate(names):
            first = [m for m in methods if m in ("plain", "plain+json")]
            rest = [m for m in methods if m not in first]
            order = first + [rest[(j + i + round_) % len(rest)] for j in range(len(rest))]
            for method in order:  # plain first: the oracle needs its output
                run = bench.methods[method](name, ids[name])
                if round_:
                    runs.append(run)
            print(f"[bench] round {round_} {name}: " + ", ".join(f"{r.method} {r.tps:.1f}" for r in runs[-len(order):]
                                                              if round_), flush=True)
    rows = summarize(runs, bench.plain_out)
    print_table(rows)
    against_best = adaptive_against_best(runs)
    against_blocks = adaptive_against_best(runs, "block")
    for what, table in (("fixed widths", against_best), ("shorter blocks", against_blocks)):
        for drafter, ratios in table.items():
            print(f"[bench] {drafter} adaptive / max(plain, {what}) per prompt: "
                  + ", ".join(f"{p} {r:.3f}" for p, r in ratios.items())
                  + f"; >= 0.97 on every prompt: {all(r >= 0.97 for r in ratios.values())}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine, "model": bench.loaded.description, "prepared": bench.prepared, "args": {k: str(v) for k, v in vars(args).items()},
            "attention_kernel": default_attention_kernel().summary()}
    for name, decision in meta["attention_kernel"].items():
        print(f"[bench] attention kernel, {name}: {decision['reason'] or 'explicit'}")
    (args.out / "bench.json").write_text(json.dumps({**meta, "summary": rows, "adaptive_against_best": against_best,
                                                     "adaptive_against_blocks": against_blocks,
                                                     "runs": [asdict(r) for r in runs]}, indent=1))
    chart(rows, args.out / "bench.png", f"{bench.loaded.description}, {args.max_tokens} tokens, greedy")
    print(f"[bench] wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


if __name__ == "__main__":
    main()
