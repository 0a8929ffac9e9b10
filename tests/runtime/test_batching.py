"""Continuous batching on tiny random float32 targets: every request returns its solo output.

The scheduler is driven step by step, so joins, cancellations and hand-backs happen at known steps.
Solo outputs come from the same decoders one request at a time (max_batch 1): speculative decoding
with a random DFlash draft verifying every cycle (fixed width), plain decoding for penalties.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest
from tiny_models import build_draft, build_target, draft_config, target_config

from engine.decode.batch import BatchDecoder
from engine.decode.drafters import DFlashDrafter, NgramDrafter
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.prefix_cache import PrefixCache
from engine.decode.sampling import SamplingParams
from engine.decode.speculative import SpeculativeDecoder
from engine.model.target import Target
from engine.runtime.batch_scheduler import BatchScheduler
from engine.runtime.config import EngineConfig
from engine.runtime.request import FinishReason, Request, RequestOutput
from engine.runtime.scheduler import EngineBusy, Scheduler
from engine.runtime.serving_model import build_batch, warm_batch
from tests.model.test_hybrid import hybrid_config

EOS = 2
GREEDY = SamplingParams(temperature=0.0)
PENALISED = SamplingParams(temperature=0.0, presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.3,
                           logit_bias=((17, 2.0), (40, -3.0)))


class Chars:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    config = target_config("llama", vocab_size=96, num_hidden_layers=4)
    model = build_target(config, seed=1)
    draft = build_draft(draft_config(config), seed=2)
    target = Target(model, draft.config.target_layer_ids)
    spec = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=4, adaptive=False, prefill_chunk=16)
    return {"model": model, "target": target, "spec": spec, "plain": PlainDecoder(model, prefill_chunk=16)}


class Outputs:
    """What the scheduler emits, per request."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.last: dict[str, RequestOutput] = {}
        self.errors: dict[str, BaseException] = {}
        self.logprobs: dict[str, list] = {}
        self.ended: set[str] = set()

    def __call__(self, request: Request, item: RequestOutput | BaseException | None) -> None:
        rid = request.request_id
        if item is None:
            self.ended.add(rid)
        elif isinstance(item, BaseException):
            self.errors[rid] = item
        else:
            self.tokens.setdefault(rid, []).extend(item.token_ids)
            if item.logprobs:
                self.logprobs.setdefault(rid, []).extend(item.logprobs)
            self.text[rid] = self.text.get(rid, "") + item.text
            self.last[rid] = item


def scheduler(parts: dict[str, Any], max_batch: int, *, store: PrefixCache | None = None, drafter: bool = True,
              max_waiting: int = 16) -> tuple[Scheduler, Outputs]:
    out = Outputs()
    spec = parts["spec"] if drafter else None
    args = (parts["plain"], spec, Chars(), frozenset({EOS}), out)
    if max_batch == 1:
        return Scheduler(*args, max_waiting=max_waiting, prefix_cache=store), out
    batch = BatchDecoder(parts["model"], target=parts["target"] if drafter else None, prefill_chunk=16)
    return BatchScheduler(*args, max_waiting=max_waiting, prefix_cache=store, batch=batch, max_batch=max_batch), out


def prompt(i: int, length: int) -> list[int]:
    return [(7 * i + 3 * k) % 90 + 3 for k in range(length)]


def requests(n: int, params: dict[int, SamplingParams] | None = None) -> list[Request]:
    """Mixed prompt lengths (3 to 50 tokens: several prefill chunks of 16) and lengths (8 to 38 tokens)."""
    params = params or {}
    return [Request(f"r{i}", prompt(i, 3 + (i * 13) % 48), params.get(i, GREEDY), 8 + (i * 11) % 31) for i in range(n)]


def run(sched: Scheduler, reqs: list[Request], cancel_after: dict[str, int] | None = None, max_steps: int = 5000) -> None:
    """Add every request, step until all ended; cancel_after: request id -> tokens seen before it is aborted."""
    cancel_after = dict(cancel_after or {})
    for r in reqs:
        sched.add(r)
    out: Outputs = sched.emit  # type: ignore[assignment]
    for _ in range(max_steps):
        if {r.request_id for r in reqs} <= out.ended:
            return
        sched.step()
        for r in reqs:
            if r.request_id in cancel_after and len(out.tokens.get(r.request_id, [])) >= cancel_after[r.request_id]:
                sched.abort(r)
                del cancel_after[r.request_id]
    raise AssertionError("requests did not end")


def solo(parts: dict[str, Any], reqs: list[Request]) -> Outputs:
    sched, out = scheduler(parts, 1)
    for r in reqs:
        run(sched, [clone(r)])
    return out


def clone(r: Request) -> Request:
    return Request(r.request_id, list(r.prompt_ids), r.params, r.max_tokens, r.stop)


@pytest.mark.parametrize("n", [4, 8])
def test_concurrent_greedy_requests_return_their_solo_output(parts: dict[str, Any], n: int) -> None:
    reqs = requests(n, {1: PENALISED})
    want = solo(parts, reqs)
    sched, got = scheduler(parts, max_batch=8)
    run(sched, reqs, cancel_after={"r2": 3})
    for r in reqs:
        rid = r.request_id
        if rid == "r2":
            assert r.finish_reason is FinishReason.ABORT
            assert got.tokens[rid] == want.tokens[rid][: len(got.tokens[rid])] and len(got.tokens[rid]) >= 3
        else:
            assert got.tokens[rid] == want.tokens[rid], rid
            assert got.text[rid] == want.text[rid]
            assert r.finish_reason is want.last[rid].finish_reason
    assert sched.stats.num_batch_steps > 0 and max(sched.batch.stats.rows) >= min(n, 4)
    usage = got.last["r1"].usage  # penalties: plain decoding alone, batched here
    assert usage.decoder == "plain" and usage.batched_tokens > 0
    assert sum(got.last[r.request_id].usage.batched_tokens for r in reqs) == sched.stats.num_batch_tokens


def test_the_load_time_warm_up_leaves_no_trace(parts: dict[str, Any]) -> None:
    """warm_batch (run at load on CUDA) takes two made-up rows through batched steps and drops them:
    the batch is empty, its counters are zero, and requests after it return their solo output."""
    reqs = requests(4)
    want = solo(parts, reqs)
    sched, got = scheduler(parts, max_batch=8)
    warm_batch(sched.batch)
    assert sched.batch.num_rows == 0 and sched.batch.cache is None and sched.batch.stats.steps == 0
    run(sched, reqs)
    assert {r.request_id: got.tokens[r.request_id] for r in reqs} == {r.request_id: want.tokens[r.request_id] for r in reqs}


def test_a_batched_step_advances_one_offsets_array_for_every_layer(parts: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After joins, steps and a leave every layer holds the same offsets array (one add a step, not one
    a layer), with the offsets and tokens that mlx-lm's BatchKVCache, adding in every layer, gives."""
    from mlx_lm.models.cache import BatchKVCache

    from engine.decode import batch as batch_module
    from engine.decode.prefix_cache import PrefixLease
    from engine.decode.sampling import TokenRng

    def drive() -> tuple[list[Any], list[int], list[list[int]]]:
        batch = BatchDecoder(parts["model"])
        rows, tokens = [], []
        for n in (5, 9, 13):
            ids = list(range(3, 3 + n))
            row = batch.make_row(GREEDY, TokenRng(0), PrefixLease(None, ids, None), len(ids), wants_taps=False)
            batch.prefill_and_join(row, ids)
            rows.append(row)
            batch.step()
        for i in range(8):
            if i == 4:
                batch.leave(rows[0])  # the longest padding goes: the filter shifts every row left
            tokens.append([step.tokens[0] for _, step in batch.step()])
        return batch.cache, batch.cache[0].offset.tolist(), tokens

    cache, offsets, tokens = drive()
    assert len(cache) == 4 and all(c.offset is cache[0].offset for c in cache)
    monkeypatch.setattr(batch_module, "StepCache", BatchKVCache)
    monkeypatch.setattr(batch_module, "advance", lambda cache, length: None)
    stock, stock_offsets, stock_tokens = drive()
    assert len({id(c.offset) for c in stock}) == 4  # mlx-lm's: one array a layer
    assert offsets == stock_offsets and tokens == stock_tokens


def test_seeded_sampled_requests_return_their_solo_text(parts: dict[str, Any]) -> None:
    sampled = {i: SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=100 + i) for i in range(5)}
    sampled[5] = SamplingParams(temperature=0.7, min_p=0.05, seed=7, presence_penalty=0.4)
    reqs = requests(6, sampled)
    want = solo(parts, reqs)
    sched, got = scheduler(parts, max_batch=6)
    run(sched, reqs)
    assert got.text == want.text and got.tokens == want.tokens
    assert all(got.last[r.request_id].usage.batched_tokens for r in reqs)


def test_unseeded_sampled_rows_decode_valid_tokens(parts: dict[str, Any]) -> None:
    reqs = requests(4, {i: SamplingParams(temperature=1.0, top_k=5) for i in range(4)})
    sched, got = scheduler(parts, max_batch=4)
    run(sched, reqs)
    assert all(len(got.tokens[r.request_id]) == r.max_tokens or r.finish_reason is FinishReason.STOP for r in reqs)


def test_cancel_frees_the_row_within_one_step(parts: dict[str, Any]) -> None:
    reqs = [Request(f"c{i}", prompt(i, 10), GREEDY, 200) for i in range(4)]
    sched, out = scheduler(parts, max_batch=4)
    for r in reqs:
        sched.add(r)
    while len(sched.rows) < 4:
        sched.step()
    sched.step()
    assert sched.batch.stats.rows[-1] == 4
    sched.abort(reqs[1])
    sched.step()  # the next step runs without it
    assert reqs[1].finish_reason is FinishReason.ABORT and "c1" in out.ended
    assert [r.request.request_id for r in sched.rows] == ["c0", "c2", "c3"]
    assert sched.batch.stats.rows[-1] == 3 and len(sched.batch.rows) == 3
    for r in reqs:
        sched.abort(r)
    sched.step()
    assert not sched.in_flight() and sched.batch.cache is None


def test_queue_bound_still_answers_busy(parts: dict[str, Any]) -> None:
    sched, out = scheduler(parts, max_batch=2, max_waiting=2)
    reqs = [Request(f"q{i}", prompt(i, 6), GREEDY, 50) for i in range(4)]
    for r in reqs[:2]:
        sched.add(r)
    for _ in range(3):
        sched.step()
    for r in reqs[2:]:
        sched.add(r)
    sched.step()
    assert sched.num_running == 2 and sched.num_waiting == 2  # the batch is full: two wait
    with pytest.raises(EngineBusy):
        sched.add(Request("over", prompt(9, 6), GREEDY, 5))
    run(sched, [])
    while len(out.ended) < 4:
        sched.step()
    assert all(len(out.tokens[r.request_id]) == 50 for r in reqs)


def test_a_lone_request_moves_into_the_batch_and_back(parts: dict[str, Any]) -> None:
    long, short = Request("long", prompt(1, 20), GREEDY, 60), Request("short", prompt(2, 9), GREEDY, 8)
    want = solo(parts, [long, short])
    sched, got = scheduler(parts, max_batch=4)
    sched.add(long)
    while len(got.tokens.get("long", [])) < 10:  # speculative decoding alone
        sched.step()
    verified = long.num_verify_steps
    assert verified > 0 and sched.running is not None
    run(sched, [short])  # joins; the long one moves into the batch; alone again, it goes back
    while "long" not in got.ended:
        sched.step()
    assert got.tokens == want.tokens
    assert long.num_batched_tokens > 0 and long.num_verify_steps > verified
    assert got.last["long"].usage.decoder == "speculative-dflash"


def test_a_lone_plain_row_stays_batched(parts: dict[str, Any]) -> None:
    reqs = [Request("pen", prompt(1, 12), PENALISED, 40), Request("g", prompt(2, 5), GREEDY, 4)]
    want = solo(parts, reqs)
    sched, got = scheduler(parts, max_batch=4)
    run(sched, reqs)
    assert got.tokens == want.tokens
    assert reqs[0].num_batched_tokens == 39  # all but the first token, which its prefill gives


def test_ngram_drafter_rows_go_back_without_taps(parts: dict[str, Any]) -> None:
    target = Target(parts["model"], ())
    ngram = SpeculativeDecoder(target, NgramDrafter(), block_size=4, adaptive=False, prefill_chunk=16)
    reqs = [Request("long", prompt(3, 14) * 2, GREEDY, 40), Request("short", prompt(4, 7), GREEDY, 6)]
    out1, out2 = Outputs(), Outputs()
    alone = Scheduler(parts["plain"], ngram, Chars(), frozenset({EOS}), out1, max_waiting=4)
    for r in reqs:
        run(alone, [clone(r)])
    batch = BatchDecoder(parts["model"], target=target, prefill_chunk=16)
    sched = BatchScheduler(parts["plain"], ngram, Chars(), frozenset({EOS}), out2, max_waiting=4, batch=batch,
                           max_batch=4)
    sched.add(reqs[0])
    while len(out2.tokens.get("long", [])) < 5:
        sched.step()
    run(sched, [reqs[1]])
    while "long" not in out2.ended:
        sched.step()
    assert out2.tokens == out1.tokens and reqs[0].num_batched_tokens > 0


def test_a_failing_row_does_not_take_the_others_down(parts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    original = BatchDecoder._sample_row

    def sample_row(self: BatchDecoder, row: Any, raw: mx.array) -> Any:
        if row.params.seed == 666 and row.position > len(row.lease.prompt_ids) + 3:
            raise RuntimeError("boom")
        return original(self, row, raw)

    monkeypatch.setattr(BatchDecoder, "_sample_row", sample_row)
    reqs = requests(4, {2: SamplingParams(temperature=0.5, seed=666)})
    want = solo(parts, [r for r in reqs if r.request_id != "r2"])
    sched, got = scheduler(parts, max_batch=4)
    run(sched, reqs)
    assert str(got.errors["r2"]) == "boom" and "r2" in got.ended
    assert {k: v for k, v in got.tokens.items() if k != "r2"} == want.tokens


def test_batched_rows_fill_and_use_the_prefix_cache(parts: dict[str, Any]) -> None:
    store = PrefixCache(1 << 30)
    head = prompt(5, 40)
    reqs = [Request(f"p{i}", head + prompt(10 + i, 5), GREEDY if i != 1 else PENALISED, 12) for i in range(3)]
    sched, got = scheduler(parts, max_batch=4, store=store)
    run(sched, reqs)
    assert len(store.entries) >= 1  # the rows' entries (one folds into another when it extends it)
    again = [Request(f"a{i}", head + prompt(20 + i, 4), GREEDY, 10) for i in range(3)]
    want = solo(parts, again)
    run(sched, again)
    assert all(r.num_cached_tokens >= 40 for r in again)
    assert {r.request_id: got.tokens[r.request_id] for r in again} == want.tokens


def test_logprobs_and_stop_strings_stay_per_row(parts: dict[str, Any]) -> None:
    logprobs = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)
    reqs = [Request("lp", prompt(1, 9), logprobs, 20), Request("g", prompt(2, 15), GREEDY, 25),
            Request("lp2", prompt(3, 4), SamplingParams(temperature=0.8, seed=3, logprobs=True), 15)]
    want = solo(parts, reqs)
    text = want.text["lp2"]  # sampled: varied text, so a stop string can sit mid-reply
    cut = next(k for k in range(3, len(text) - 1) if text[k : k + 2] not in text[: k + 1])
    reqs.append(Request("stop", prompt(3, 4), reqs[2].params, 15, stop=(text[cut : cut + 2],)))
    sched, got = scheduler(parts, max_batch=4)
    run(sched, reqs)
    seen = got.logprobs
    assert got.tokens["lp"] == want.tokens["lp"] and got.tokens["lp2"] == want.tokens["lp2"]
    assert [lp.token for lp in seen["lp"]] == want.tokens["lp"] and len(seen["lp2"]) == 15
    for a, b in zip(seen["lp"], want.logprobs["lp"]):  # batched logits round differently in the last bits
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
    assert all(len(lp.top) == 3 and lp.top[0][0] == lp.token for lp in seen["lp"])
    assert got.text["stop"] == text[:cut] and reqs[3].finish_reason is FinishReason.STOP
    assert "g" not in seen


def test_a_long_prompt_prefills_between_batched_steps(parts: dict[str, Any]) -> None:
    sched, got = scheduler(parts, max_batch=4)
    first = [Request("a", prompt(1, 5), GREEDY, 100), Request("b", prompt(2, 6), GREEDY, 100)]
    for r in first:
        sched.add(r)
    while len(sched.rows) < 2:
        sched.step()
    sched.step()
    late = Request("late", prompt(3, 16 * 6 + 1), GREEDY, 5)  # six chunks of 16
    sched.add(late)
    before = {r.request_id: len(got.tokens.get(r.request_id, [])) for r in first}
    while "late" not in got.tokens:
        sched.step()
    assert all(len(got.tokens[r.request_id]) - before[r.request_id] >= 6 for r in first)  # a token per chunk


def test_hybrid_targets_and_max_batch_one_do_not_batch(parts: dict[str, Any]) -> None:
    hybrid = build_target(hybrid_config("qwen3_5"), seed=0)
    assert "do not batch" in BatchDecoder.unsupported(hybrid)
    assert BatchDecoder.unsupported(parts["model"]) is None
    assert build_batch(hybrid, None, EngineConfig(), lockstep=False)[0] is None
    assert build_batch(parts["model"], None, EngineConfig(max_batch=1), lockstep=False) == (None, "off (--max-batch 1)")
    assert build_batch(parts["model"], None, EngineConfig(), lockstep=True)[1] == "off (not under tensor parallel yet)"
    batch, health = build_batch(parts["model"], parts["spec"], EngineConfig(max_batch=3), lockstep=False)
    assert batch.target is parts["target"] and health == "up to 3 requests"
    with pytest.raises(ValueError, match="2 or more"):
        BatchScheduler(parts["plain"], None, Chars(), frozenset(), print, max_waiting=1, batch=batch, max_batch=1)
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(max_batch=0)


def test_a_constrained_request_runs_alone_and_keeps_its_grammar(parts: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched step applies no grammar: a structured-output request waits for the batch to drain, runs
    alone under its constraint (its solo output), and the requests behind it batch afterwards."""
    from engine.grammar.constraint import Constraint, TokenVocab, compile_spec, json_schema_spec

    vocab = TokenVocab([None] * 3 + [bytes([30 + i]) for i in range(3, 96)], frozenset({EOS}))  # ids 4.. = '"' ..
    spec = json_schema_spec({"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
                            "additionalProperties": False})
    monkeypatch.setattr(Scheduler, "make_constraint", lambda self, request: Constraint(compile_spec(spec), vocab))
    reqs = requests(5, {1: SamplingParams(temperature=0.0, grammar=spec)})
    want = solo(parts, reqs)
    sched, got = scheduler(parts, max_batch=8)
    run(sched, reqs)
    assert got.tokens == want.tokens
    text = bytes(b for t in got.tokens["r1"] for b in (vocab.token_bytes[t] or b"")).decode()
    assert text.replace(" ", "") in ('{"a":"x"}', '{"a":"y"}'), text  # the grammar held, to its end
    assert got.last["r1"].usage.batched_tokens == 0
    assert all(got.last[f"r{i}"].usage.batched_tokens > 0 for i in (2, 3, 4)) and sched.stats.num_batch_steps > 0
