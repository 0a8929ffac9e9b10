"""The prefix cache: a multi-turn chat decodes the same with it as without it, and reuses what it should.

Conversations are built in token space, ChatML-shaped (a turn's reply, end of turn, the next user
turn, the assistant header), over tiny random float32 targets: an attention-only qwen3, a hybrid
qwen3_5 (Gated DeltaNet at layers 0 and 2), with plain decoding, a random DFlash draft and n-gram
lookup. The real scheduler runs them, so the store is committed (or not) as the server commits it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from tiny_models import build_draft, build_target, draft_config, target_config

from engine.decode.cache_snapshot import CacheSnapshot
from engine.decode.decoder import Decoder
from engine.decode.prefill import prefill_spans
from engine.decode.drafters import DFlashDrafter, NgramDrafter
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.prefix_cache import (
    MAX_CHECKPOINTS,
    MIN_REUSE_TOKENS,
    PrefixCache,
    default_max_bytes,
)
from engine.decode.sampling import SamplingParams
from engine.decode.speculative import SpeculativeDecoder
from engine.model.target import Target
from engine.runtime.config import EngineConfig
from engine.runtime.request import FinishReason, Request
from engine.runtime.scheduler import Scheduler
from engine.runtime.serving_model import build_prefix_cache
from tests.model.test_hybrid import hybrid_config

EOS, START, USER, ASSISTANT, NL = 2, 1, 5, 6, 7
HEADER = [START, ASSISTANT, NL]  # the generation prompt: "<|im_start|>assistant\n"
SYSTEM = [START, 4, NL, *range(20, 44), EOS, NL]
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=1.0, seed=7)
BIG = 1 << 30
DECODERS = ["plain", "dflash", "ngram", "hybrid-plain", "hybrid-dflash"]


def user_turn(k: int, length: int = 24) -> list[int]:
    return [START, USER, NL, *np.random.default_rng(k).integers(8, 90, length).tolist(), EOS, NL]


class Chars:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class Turn(NamedTuple):
    prompt: list[int]
    output: list[int]
    cached: int
    finish: FinishReason | None


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    cfg = target_config("qwen3", tie_word_embeddings=False)
    hcfg = hybrid_config("qwen3_5")
    return {
        "attention": build_target(cfg, seed=1),
        "hybrid": build_target(hcfg, seed=2),
        "draft": build_draft(draft_config(cfg), seed=0),
        "hybrid-draft": build_draft(draft_config(hcfg), seed=2),
    }


def make_decoder(kind: str, models: dict[str, Any], prefill_chunk: int = 32) -> Decoder:
    hybrid = kind.startswith("hybrid")
    model = models["hybrid" if hybrid else "attention"]
    if kind.endswith("plain"):
        return PlainDecoder(model, prefill_chunk=prefill_chunk)
    if kind == "ngram":
        return SpeculativeDecoder(Target(model), NgramDrafter(), block_size=4, prefill_chunk=prefill_chunk)
    draft = models["hybrid-draft" if hybrid else "draft"]
    target = Target(model, draft.config.target_layer_ids)
    return SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=4, prefill_chunk=prefill_chunk)


def make_scheduler(decoder: Decoder, store: PrefixCache | None, speculative: Decoder | None = None) -> Scheduler:
    def emit(request: Request, item: object) -> None:
        assert not isinstance(item, BaseException), item

    return Scheduler(decoder, speculative, Chars(), frozenset(), emit, max_waiting=4, prefix_cache=store)


def run(scheduler: Scheduler, prompt: list[int], params: SamplingParams = GREEDY, max_tokens: int = 12,
        boundary: int | None = None) -> Turn:
    request = Request("r", list(prompt), params, max_tokens, num_stable_prompt_tokens=boundary)
    scheduler.add(request)
    while scheduler.step():
        pass
    return Turn(prompt, request.output_ids, request.num_cached_tokens, request.finish_reason)


def converse(scheduler: Scheduler, params: SamplingParams = GREEDY, turns: int = 5) -> list[Turn]:
    prompt = SYSTEM + user_turn(0) + HEADER
    out = []
    for k in range(turns):
        out.append(run(scheduler, prompt, params, boundary=len(prompt) - len(HEADER)))
        prompt = prompt + out[-1].output + [EOS, NL] + user_turn(k + 1) + HEADER
    return out


# --- losslessness and reuse over a conversation -------------------------------------------


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", DECODERS)
def test_conversation_equals_cold_and_reuses_the_previous_turn(kind: str, params: SamplingParams,
                                                              models: dict[str, Any]) -> None:
    cold = converse(make_scheduler(make_decoder(kind, models), None), params)
    store = PrefixCache(BIG)
    warm = converse(make_scheduler(make_decoder(kind, models), store), params)
    assert [t.output for t in warm] == [t.output for t in cold]
    assert len({tuple(t.output) for t in warm}) > 1 and all(len(set(t.output)) > 2 for t in warm), "degenerate"
    assert warm[0].cached == 0
    for prev, turn in zip(warm, warm[1:]):
        # the previous prompt and reply, less the reply's last token when no forward saw it
        held = len(prev.prompt) + len(prev.output)
        assert held - 1 <= turn.cached <= held, (turn.cached, held)
    assert store.stats.hits == 4 and store.stats.misses == 1
    assert len(store.entries) == 1, "each turn's entry replaces the one it extends"


class Recording:
    """A drafter that keeps what it proposed (syncing each proposal: tests only)."""

    def __init__(self, drafter: DFlashDrafter) -> None:
        self.drafter, self.name, self.needs_taps = drafter, drafter.name, drafter.needs_taps
        self.proposals: list[list[int]] = []

    def begin(self, *args: Any) -> None:
        self.drafter.begin(*args)

    def propose(self, *args: Any, **kwargs: Any) -> Any:
        proposal = self.drafter.propose(*args, **kwargs)
        self.proposals.append(proposal.tokens.tolist())
        return proposal

    def end(self) -> None:
        self.drafter.end()


@pytest.mark.parametrize("kind", ["dflash", "hybrid-dflash"])
def test_restored_draft_context_drafts_as_after_a_cold_prefill(kind: str, models: dict[str, Any]) -> None:
    """The drafter's context after a restore (the stored taps) proposes what it proposes cold."""
    runs = []
    for store in (None, PrefixCache(BIG)):
        decoder = make_decoder(kind, models)
        decoder.drafter = Recording(decoder.drafter)
        decoder.adaptive = False  # every cycle drafts: the two runs' cycles line up
        converse(make_scheduler(decoder, store), turns=3)
        runs.append(decoder.drafter.proposals)
    assert store.stats.hits == 2
    assert runs[0] == runs[1]


def test_restore_continues_as_a_cold_prefill(models: dict[str, Any]) -> None:
    """Logits after restoring n rows and running the rest equal a cold run of the whole sequence."""
    prompt, suffix = SYSTEM + user_turn(0), user_turn(1)
    for name, cut in (("attention", 17), ("attention", len(prompt)), ("hybrid", len(prompt))):
        model = models[name]
        live = make_prompt_cache(model)
        model(mx.array(prompt)[None], cache=live)
        snapshot = CacheSnapshot.take(live, len(prompt))
        restored = make_prompt_cache(model)
        snapshot.restore(restored, cut, capacity=cut + len(suffix))
        rest = prompt[cut:] + suffix
        got = model(mx.array(rest)[None], cache=restored)
        cold = make_prompt_cache(model)
        want = model(mx.array(prompt + suffix)[None], cache=cold)[:, cut:]
        assert mx.allclose(got, want, atol=1e-4).item(), (name, cut, mx.abs(got - want).max().item())


def test_snapshot_is_a_private_copy(models: dict[str, Any]) -> None:
    model = models["attention"]
    live = make_prompt_cache(model)
    model(mx.array(SYSTEM)[None], cache=live)
    snapshot = CacheSnapshot.take(live, len(SYSTEM))
    saved = [np.array(a) for r in snapshot.rows for a in r]
    for c in live:
        c.trim(5)
    model(mx.array([[9] * 8]), cache=live)  # rewrites, in place, rows the snapshot holds
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(saved, [b for r in snapshot.rows for b in r], strict=True))


def test_exact_repeat_reruns_only_the_last_token(models: dict[str, Any]) -> None:
    store = PrefixCache(BIG)
    scheduler = make_scheduler(make_decoder("dflash", models), store)
    prompt = SYSTEM + user_turn(0) + HEADER
    first, again = run(scheduler, prompt), run(scheduler, prompt)
    assert again.output == first.output and again.cached == len(prompt) - 1
    assert len(store.entries) == 1  # the same reply: the second entry is the first


# --- hybrid targets: recurrent state only where it was copied -------------------------------


def test_hybrid_restores_the_boundary_when_the_next_turn_rewrites_the_header(models: dict[str, Any]) -> None:
    """A template that primes something after the header (<think>) and drops it on re-rendering:
    the next turn shares the prompt up to the header, and a hybrid's state exists at its start."""
    store = PrefixCache(BIG)
    scheduler = make_scheduler(make_decoder("hybrid-dflash", models), store)
    head = SYSTEM + user_turn(0)
    primed = head + HEADER + [9, 10, NL]  # "<think>\n" in the generation prompt
    first = run(scheduler, primed, boundary=len(head))
    (entry,) = store.entries
    assert sorted(entry.snapshot.checkpoints) == [len(head), len(primed) + len(first.output) - 1]
    rewritten = head + HEADER + first.output + [EOS, NL] + user_turn(1) + HEADER
    second = run(scheduler, rewritten, boundary=len(rewritten) - len(HEADER))
    assert second.cached == len(head)
    cold = run(make_scheduler(make_decoder("hybrid-dflash", models), None), rewritten)
    assert second.output == cold.output
    attention = make_scheduler(make_decoder("dflash", models), PrefixCache(BIG))
    run(attention, primed, boundary=len(head))
    assert run(attention, rewritten).cached == len(head) + len(HEADER)  # attention rows cut anywhere


def test_hybrid_entry_keeps_its_longest_checkpoints(models: dict[str, Any]) -> None:
    store = PrefixCache(BIG)
    turns = converse(make_scheduler(make_decoder("hybrid-plain", models), store), turns=4)
    (entry,) = store.entries
    ends = [len(t.prompt) + len(t.output) - 1 for t in turns]  # the last reply token is never fed
    bounds = [len(t.prompt) - len(HEADER) for t in turns]
    assert sorted(entry.snapshot.checkpoints) == sorted([*ends, *bounds])[-MAX_CHECKPOINTS:]


# --- memory: the byte bound, copies, no aliasing -------------------------------------------


def test_byte_bound_holds_under_distinct_long_prompts(models: dict[str, Any]) -> None:
    one = PrefixCache(BIG)
    run(make_scheduler(make_decoder("dflash", models), one), long_prompt(0))
    size = one.nbytes
    store = PrefixCache(int(size * 2.5))
    scheduler = make_scheduler(make_decoder("dflash", models), store)
    for k in range(1, 8):
        run(scheduler, long_prompt(k))
        assert store.nbytes <= store.max_bytes
        assert store.nbytes == sum(e.nbytes for e in store.entries)
    assert len(store.entries) == 2 and store.stats.evictions == 5
    assert run(scheduler, long_prompt(7)).cached == len(long_prompt(7)) - 1  # the newest survived
    assert run(scheduler, long_prompt(1)).cached == 0
    tiny = PrefixCache(size // 2)
    run(make_scheduler(make_decoder("dflash", models), tiny), long_prompt(0))
    assert tiny.entries == [] and tiny.stats.skipped == 1 and tiny.nbytes == 0


def long_prompt(k: int) -> list[int]:
    return [START, USER, NL, *np.random.default_rng(100 + k).integers(8, 90, 90).tolist(), EOS, NL, *HEADER]


@pytest.mark.parametrize("kind", ["plain", "dflash", "hybrid-dflash"])
def test_restored_arrays_never_alias_the_store(kind: str, models: dict[str, Any]) -> None:
    """Restore, generate (writes, and for DFlash trims then rewrites), restore again: identical."""
    store = PrefixCache(BIG)
    scheduler = make_scheduler(make_decoder(kind, models), store)
    prompt = SYSTEM + user_turn(0) + HEADER
    boundary = len(prompt) - len(HEADER)
    run(scheduler, prompt, boundary=boundary)
    (entry,) = store.entries
    saved = [np.array(a) for a in entry_arrays(entry)]
    first = restore(entry, models, kind)
    again = run(scheduler, prompt, boundary=boundary)  # a prefix of the entry, into buffers with room; then writes
    assert again.cached == (boundary if kind.startswith("hybrid") else len(prompt) - 1)
    # a continuation restores the whole entry; its decoding writes past it and rolls drafts back
    run(scheduler, prompt + again.output + [EOS, NL] + user_turn(1) + HEADER)
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(saved, entry_arrays(entry), strict=True))
    second = restore(entry, models, kind)
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(first, second, strict=True))


def entry_arrays(entry: Any) -> list[mx.array]:
    rows = [a for r in entry.snapshot.rows if r for a in r]
    checkpoints = sorted(entry.snapshot.checkpoints.items())
    states = [a for _, layers in checkpoints for s in layers if s for a in s if a is not None]
    return rows + states + ([] if entry.taps is None else [entry.taps])


def restore(entry: Any, models: dict[str, Any], kind: str) -> list[mx.array]:
    cache = make_prompt_cache(models["hybrid" if kind.startswith("hybrid") else "attention"])
    n = max(entry.snapshot.checkpoints, default=entry.tokens.size)
    entry.snapshot.restore(cache, n, capacity=n)
    return [a[..., :n, :] for c in cache if hasattr(c, "keys") for a in (c.keys, c.values)] + [
        a for c in cache if not hasattr(c, "keys") for a in c.cache
    ]


# --- faults: nothing partial is stored ------------------------------------------------------


def test_cancelled_requests_leave_no_entry(models: dict[str, Any]) -> None:
    store = PrefixCache(BIG)
    scheduler = make_scheduler(make_decoder("dflash", models, prefill_chunk=16), store)
    prompt = long_prompt(0)
    for steps in (1, 3, 8):  # mid-prefill (chunks of 16), right after, and mid-decode
        request = Request("c", prompt, GREEDY, 40)
        scheduler.add(request)
        for _ in range(steps):
            scheduler.step()
        scheduler.abort(request)
        while scheduler.step():
            pass
        assert request.finish_reason is FinishReason.ABORT
        assert store.entries == [] and store.nbytes == 0


class Failing:
    """The model, raising at its `fail_at`-th forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls, self.fail_at = model, 0, 0

    def make_cache(self) -> list[Any]:
        return make_prompt_cache(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.model(*args, **kwargs)


def test_failed_requests_leave_no_entry_and_older_entries_still_hit(models: dict[str, Any]) -> None:
    store = PrefixCache(BIG)
    healthy = make_scheduler(PlainDecoder(models["attention"], prefill_chunk=16), store)
    stored = run(healthy, long_prompt(0))
    failing = Failing(models["attention"])
    errors: list[object] = []
    scheduler = Scheduler(PlainDecoder(failing, prefill_chunk=16), None, Chars(), frozenset(), lambda r, x: errors.append(x),
                          max_waiting=4, prefix_cache=store)
    for fail_at in (2, 12):  # a prefill chunk (of 16), then a decode step
        failing.calls, failing.fail_at = 0, fail_at
        assert run(scheduler, long_prompt(1), max_tokens=30).finish is None
    assert [str(e) for e in errors if isinstance(e, BaseException)] == ["boom", "boom"]
    (entry,) = store.entries
    assert entry.tokens.size == len(long_prompt(0)) + len(stored.output) - 1
    assert run(healthy, long_prompt(0) + stored.output).cached == entry.tokens.size


# --- which entries a request may use --------------------------------------------------------


def test_dflash_needs_stored_taps_and_plain_reuses_dflash_entries(models: dict[str, Any]) -> None:
    store = PrefixCache(BIG)
    plain, spec = make_decoder("plain", models), make_decoder("dflash", models)
    scheduler = make_scheduler(plain, store, speculative=spec)
    penalised = SamplingParams(temperature=0.0, presence_penalty=0.5)  # falls back to plain decoding
    p0 = long_prompt(0)
    run(scheduler, p0, penalised)
    assert run(scheduler, long_prompt(0) + [9, 9, 9], GREEDY).cached == 0, "a DFlash request needs taps"
    assert run(scheduler, p0, penalised).cached == len(p0) - 1, "plain decoding reads a DFlash entry"
    assert store.stats.hits == 1 and store.stats.misses == 2


def test_lookup_prefers_the_longest_and_skips_short_heads(models: dict[str, Any]) -> None:
    store = PrefixCache(BIG)
    scheduler = make_scheduler(make_decoder("plain", models), store)
    head = SYSTEM[:MIN_REUSE_TOKENS]
    run(scheduler, head[:-1] + [9] * 8)
    assert run(scheduler, head[:-1] + [10] * 8).cached == 0  # a shared head under the minimum
    run(scheduler, head + [11] * 8)
    assert run(scheduler, head + [12] * 8).cached == MIN_REUSE_TOKENS
    a, b = long_prompt(0), long_prompt(0)[:60] + user_turn(9)
    run(scheduler, a)
    run(scheduler, b)
    assert run(scheduler, a[:70] + user_turn(8)).cached == 70
    assert run(scheduler, b[:61] + [3] + user_turn(8)).cached == 61


def test_serving_model_builds_a_store_only_where_it_can(models: dict[str, Any]) -> None:
    model = models["attention"]
    assert build_prefix_cache(model, EngineConfig(prefix_cache=False)) is None
    assert build_prefix_cache(model, EngineConfig(prefix_cache_bytes=0)) is None
    store = build_prefix_cache(model, EngineConfig(prefix_cache_bytes=1 << 20))
    assert store.max_bytes == 1 << 20 and not store.needs_boundaries  # attention rows cut anywhere
    store = build_prefix_cache(models["hybrid"], EngineConfig())
    assert 0 < store.max_bytes == default_max_bytes() <= 4 << 30 and store.needs_boundaries

    class Sliding:  # gemma-style: rotating caches keep rows in a ring, no prefix to cut
        def make_cache(self) -> list[Any]:
            return [RotatingKVCache(max_size=64), KVCache()]

    assert build_prefix_cache(Sliding(), EngineConfig()) is None


def test_prefill_spans_end_at_the_cut() -> None:
    assert prefill_spans(0, 599, 512) == [(0, 512), (512, 599)]
    assert prefill_spans(10, 1200, 512, cut=700) == [(10, 522), (522, 700), (700, 1034), (1034, 1200)]
    assert prefill_spans(10, 1200, 512, cut=522) == [(10, 522), (522, 1034), (1034, 1200)]
    assert prefill_spans(5, 5, 512, cut=5) == [] and prefill_spans(0, 40, 16, cut=60) == [(0, 16), (16, 32), (32, 40)]
