"""The speculative cycle: lossless greedy and sampling, cache invariants, sync elision, drafters.

Tiny random float32 targets. Greedy comparisons first check the plain run's smallest
top-1/top-2 logit gap: the block-shaped verify forward reorders float32 reductions (~1e-6),
so a mismatch at a gap well above that is a bug, not a tie.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map_with_path
from mlx_lm.models.cache import ArraysCache
from tiny_models import (
    build_draft,
    build_target,
    draft_config,
    plain_greedy,
    target_config,
)

from engine.decode.decoder import DecodeStep
from engine.decode.drafters import DFlashDrafter, NgramDrafter, OracleDrafter, Proposal
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.sampling import (
    SamplingParams,
    TokenRng,
    filter_logprobs,
    token_logprobs,
)
from engine.decode.speculative import SpeculativeDecoder, accept_draft
from engine.decode.verify_width import CostCurve
from engine.model import attention
from engine.model.fused import fuse_projections
from engine.model.target import Target
from engine.runtime.cost_cache import CostCache, Costs
from engine.runtime.serving_model import warm_prefill, warm_up

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]
GREEDY = SamplingParams(temperature=0.0)
MIN_GAP = 1e-4
Varied = tuple[dict[str, Any], nn.Module, list[int]]  # target config, model, greedy output


def three_token_law(model: nn.Module, prompt: list[int], params: SamplingParams) -> dict[tuple[int, int, int], float]:
    """The target's exact law of its first 3 tokens over the first 8 ids: all 64 (t0, t1) in one batched forward."""
    pairs = [(a, b) for a in range(8) for b in range(8)]
    logits = model(mx.array([prompt + [a, b] for a, b in pairs]))[:, len(prompt) - 1 :]  # (64, 3, V)
    probs = mx.exp(filter_logprobs(logits, params)).tolist()
    return {(a, b, c): probs[i][0][a] * probs[i][1][b] * probs[i][2][c] for i, (a, b) in enumerate(pairs) for c in range(8)}


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson–Hilferty: the chi-square quantile at normal quantile z (3.09: alpha = 1e-3)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def _chi2(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson chi-square, pooling cells expected below 5; a sample of probability 0 fails."""
    assert all(probs.get(cell, 0.0) > 0 for cell in counts), "sampled a cell the target forbids"
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell, p in probs.items():
        if n * p < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(cell, 0), pooled_exp + n * p
            continue
        stat, df = stat + (counts.get(cell, 0) - n * p) ** 2 / (n * p), df + 1
    if pooled_exp > 0:
        stat, df = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, df + 1
    return stat, df


def _run(
    decoder: SpeculativeDecoder, max_tokens: int, params: SamplingParams = GREEDY, seed: int = 0
) -> tuple[list[int], list[DecodeStep]]:
    steps = [s for s in decoder.generate(PROMPT, params, max_tokens, TokenRng(seed)) if s.tokens]
    return [t for s in steps for t in s.tokens], steps  # empty steps come from the prefill


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def varied(request: pytest.FixtureRequest) -> Varied:
    return varied_target(request.param)


def varied_target(family: str) -> Varied:
    """An untied target whose greedy output wanders over many tokens (seed checked for gaps)."""
    cfg = target_config(family, tie_word_embeddings=False)
    model = build_target(cfg, seed=1)
    ref, gap = plain_greedy(model, PROMPT, 40)
    assert gap > MIN_GAP, f"seed gives a near-tie ({gap}); pick another seed"
    assert len(set(ref)) >= 8
    return cfg, model, ref


# --- the acceptance function ---------------------------------------------------------------


def test_accept_greedy_longest_prefix_plus_bonus() -> None:
    logits = mx.full((4, 6), -1.0)  # rows 0..3: target argmax 2, 5, 1, 4
    for row, tok in enumerate([2, 5, 1, 4]):
        logits[row, tok] = 1.0
    for drafts, want in [([2, 5, 1], (3, 4)), ([2, 5, 0], (2, 1)), ([0, 5, 1], (0, 2))]:
        a, nxt = accept_draft(mx.array(drafts), logits, None, GREEDY)
        assert (a.item(), nxt.item()) == want
    a, nxt = accept_draft(mx.zeros((0,), mx.int32), logits[:1], None, GREEDY)
    assert (a.item(), nxt.item()) == (0, 2)


P_DRAFT = [[0.5, 0.3, 0.1, 0.05, 0.05], [0.1, 0.1, 0.6, 0.1, 0.1]]
Q_TARGET = [[0.2, 0.4, 0.2, 0.1, 0.1], [0.3, 0.1, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.2, 0.2]]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("top_p", [1.0, 0.75])
def test_accept_sampling_reproduces_target(deterministic: bool, top_p: float) -> None:
    """Committed tokens follow q (truncated by top_p) exactly, for sampled and one-hot drafts."""
    n = 200_000
    params = SamplingParams(temperature=1.0, top_p=top_p)
    logq = mx.log(mx.array(Q_TARGET))  # (3, V): rows for draft 1, draft 2, bonus
    p = mx.array(P_DRAFT)
    if deterministic:
        drafts, draft_lp = mx.broadcast_to(mx.array([0, 2]), (n, 2)), None
    else:
        drafts = mx.random.categorical(mx.log(p), shape=(n, 2), key=mx.random.key(1))
        draft_lp = mx.broadcast_to(mx.log(p), (n, 2, 5))
    a, nxt = accept_draft(drafts, mx.broadcast_to(logq, (n, 3, 5)), draft_lp, params, mx.random.key(2))
    first = mx.where(a >= 1, drafts[:, 0], nxt)
    second = mx.where(a >= 2, drafts[:, 1], nxt)  # defined when a >= 1: q rows don't depend on history
    q = mx.exp(filter_logprobs(logq, params)).tolist()
    first, second, a = first.tolist(), second.tolist(), a.tolist()
    stat, df = _chi2(Counter(first), dict(enumerate(q[0])), n)
    assert stat < _chi2_critical(df), (stat, df)
    seconds = Counter(s for s, k in zip(second, a, strict=True) if k >= 1)
    stat, df = _chi2(seconds, dict(enumerate(q[1])), sum(seconds.values()))
    assert stat < _chi2_critical(df), (stat, df)
    # the first draft is kept with probability sum_x p(x) min(1, q(x)/p(x)) = sum min(p, q)
    p0 = [1.0 if (deterministic and x == 0) else 0.0 for x in range(5)] if deterministic else P_DRAFT[0]
    expected = sum(min(px, qx) for px, qx in zip(p0, q[0], strict=True))
    observed = sum(k >= 1 for k in a) / n
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9


def test_accept_sampling_without_drafts_samples_the_target_row() -> None:
    params = SamplingParams(temperature=1.0)
    n = 50_000
    logq = mx.broadcast_to(mx.log(mx.array(Q_TARGET[:1])), (n, 1, 5))
    a, nxt = accept_draft(mx.zeros((n, 0), mx.int32), logq, None, params, mx.random.key(3))
    assert a.max().item() == 0
    stat, df = _chi2(Counter(nxt.tolist()), dict(enumerate(Q_TARGET[0])), n)
    assert stat < _chi2_critical(df)


# --- lossless greedy -----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("max_tokens", [1, 2, 17, 33, 40])
def test_greedy_dflash_equals_plain(varied: Varied, block_size: int, max_tokens: int) -> None:
    cfg, model, ref = varied
    dcfg = draft_config(cfg, block_size=block_size)
    target = Target(model, dcfg.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=block_size)
    out, steps = _run(decoder, max_tokens)
    target.close()
    assert out == ref[:max_tokens]
    assert all(s.drafted <= block_size - 1 for s in steps)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_dflash_with_explicit_block_attention_equals_plain(family: str) -> None:
    """The CUDA path: packed projections and engine/model/attention.py's explicit attention for the verify
    and draft blocks, forced on here; greedy output stays plain decoding's."""
    cfg = target_config(family, tie_word_embeddings=False)
    model = build_target(cfg, seed=1)
    ref, gap = plain_greedy(model, PROMPT, 40)
    assert gap > MIN_GAP
    fuse_projections(model)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    attention.set_mode("unfused")
    try:
        decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=8,
                                     adaptive=False)
        out, _ = _run(decoder, 40)
    finally:
        attention.set_mode(None)
        target.close()
    assert out == ref


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_dflash_with_partial_acceptance(family: str) -> None:
    """A tied target that settles on one token, and a draft whose mask id is that token:
    the DFlash path then sees rejections and full blocks, so accepted taps feed back."""
    cfg = target_config(family)
    model = build_target(cfg, seed=1 if family == "qwen3" else 0)
    ref, gap = plain_greedy(model, PROMPT, 64)
    assert gap > MIN_GAP
    dcfg = draft_config(cfg, mask_token_id=Counter(ref).most_common(1)[0][0])
    draft = build_draft(dcfg, seed=7)
    damp = {"o_proj", "down_proj"}  # keep the context path live but small
    draft.update(tree_map_with_path(lambda p, w: w * 0.3 if p.split(".")[-2] in damp else w, draft.parameters()))
    target = Target(model, dcfg.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=4, adaptive=False)
    out, _ = _run(decoder, 64)
    target.close()
    assert out == ref
    counts = decoder.stats.accept_counts
    assert counts[0] > 0 and counts[-1] > 0 and len(counts) == 4, counts


@pytest.mark.parametrize("block_size", [4, 16])
def test_oracle_rejects_at_every_block_position(varied: Varied, block_size: int) -> None:
    cfg, model, ref = varied
    target = Target(model)
    wrong_at = [*range(block_size - 1), None]
    drafter = OracleDrafter(ref, vocab_size=cfg["vocab_size"], wrong_at=wrong_at)
    decoder = SpeculativeDecoder(target, drafter, block_size=block_size, adaptive=False)
    max_tokens = len(ref)
    out, steps = _run(decoder, max_tokens)
    assert out == ref
    for cycle, step in enumerate(steps[1:]):
        wrong = wrong_at[cycle % len(wrong_at)]
        want = step.drafted if wrong is None else min(wrong, step.drafted)
        if len(step.tokens) == step.accepted + 1:  # not cut by max_tokens
            assert step.accepted == want, (cycle, step)
        assert step.accepted_positions == tuple(range(step.accepted))
    assert decoder.stats.syncs == decoder.stats.cycles


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_block_shrinks_at_max_tokens(varied: Varied, block_size: int, offset: int) -> None:
    cfg, model, ref = varied
    cycles = 2 if block_size == 4 else 1
    max_tokens = 1 + cycles * block_size + offset  # full acceptance commits block_size per cycle
    # a fixed width: the adaptive one may rightly verify no draft for the last token (timing-dependent)
    decoder = SpeculativeDecoder(Target(model), OracleDrafter(ref, vocab_size=cfg["vocab_size"]), block_size=block_size,
                                 adaptive=False)
    out, steps = _run(decoder, max_tokens)
    assert out == ref[:max_tokens]
    assert sum(len(s.tokens) for s in steps) == max_tokens
    remaining = max_tokens - sum(len(s.tokens) for s in steps[:-1])
    assert steps[-1].drafted == min(block_size - 1, remaining)


class RecordingTarget(Target):
    """Keeps the caches it makes, so a test can inspect them after the generator is gone."""

    def __init__(self, model: nn.Module, layer_ids: tuple[int, ...] = ()) -> None:
        super().__init__(model, layer_ids)
        self.caches: list[list[Any]] = []

    def make_cache(self) -> list[Any]:
        self.caches.append(super().make_cache())
        return self.caches[-1]


def test_cache_matches_committed_tokens_when_closed_early(varied: Varied) -> None:
    cfg, model, ref = varied
    target = RecordingTarget(model)
    decoder = SpeculativeDecoder(target, OracleDrafter(ref, vocab_size=cfg["vocab_size"], wrong_at=[1, None, 0]), block_size=4)
    for num_steps in range(1, 6):
        gen = decoder.generate(PROMPT, GREEDY, 40, TokenRng(0))
        emitted = sum(len(next(gen).tokens) for _ in range(num_steps))
        gen.close()  # a launched cycle is in flight: its verify rows must be rolled back
        assert target.cache_length(target.caches[-1]) == len(PROMPT) + emitted - 1


def test_chunked_prefill_yields_empty_steps_and_can_be_cancelled(varied: Varied) -> None:
    cfg, model, ref = varied
    dcfg = draft_config(cfg)
    target = RecordingTarget(model, dcfg.target_layer_ids)
    drafter = DFlashDrafter(build_draft(dcfg, seed=2), target)
    decoder = SpeculativeDecoder(target, drafter, block_size=4, prefill_chunk=5)
    steps = list(decoder.generate(PROMPT, GREEDY, 12, TokenRng(0)))
    assert [len(s.tokens) for s in steps[:3]] == [0, 0, 0]  # 16 prompt tokens: 5 + 5 + 5, then 1
    assert [t for s in steps for t in s.tokens] == ref[:12]
    gen = decoder.generate(PROMPT, GREEDY, 12, TokenRng(0))
    next(gen)
    gen.close()  # cancelled mid-prefill
    assert target.cache_length(target.caches[-1]) == 5
    target.close()


def test_cache_rewound_when_the_drafter_fails(varied: Varied) -> None:
    cfg, model, ref = varied
    class Failing(OracleDrafter):
        def propose(self, *args: Any, **kwargs: Any) -> Proposal:
            if self._cycle == 3:
                raise RuntimeError("drafter failed")
            return super().propose(*args, **kwargs)

    target = RecordingTarget(model)
    decoder = SpeculativeDecoder(target, Failing(ref, vocab_size=cfg["vocab_size"], wrong_at=[1]), block_size=4, adaptive=False)
    with pytest.raises(RuntimeError, match="drafter failed"):
        list(decoder.generate(PROMPT, GREEDY, 40, TokenRng(0)))
    # the failing launch follows a finished cycle: the cache holds exactly the verified tokens
    # (first token + a+1 per cycle, minus the pending one) and no rows of an unverified block
    stats = decoder.stats
    assert stats.cycles == 3
    assert target.cache_length(target.caches[-1]) == len(PROMPT) + stats.cycles + stats.accepted


def test_one_sync_per_cycle_and_timing_modes(varied: Varied) -> None:
    cfg, model, ref = varied
    outputs = {}
    for timing in (None, "overlap", "split"):
        drafter = OracleDrafter(ref, vocab_size=cfg["vocab_size"], wrong_at=[2, None])
        decoder = SpeculativeDecoder(Target(model), drafter, block_size=4, timing=timing)
        outputs[timing], _ = _run(decoder, 30)
        stats = decoder.stats
        if timing is None:
            assert stats.syncs == stats.cycles and not stats.timings
        elif timing == "overlap":
            assert stats.syncs == stats.cycles and len(stats.timings) == stats.cycles
            assert all(t.wait_s >= 0 and t.host_s > 0 and t.draft_s == 0 for t in stats.timings)
        else:
            assert stats.syncs == 3 * stats.cycles  # draft, verify, and the cycle's own
            assert all(t.draft_s > 0 and t.verify_s > 0 for t in stats.timings)
    assert outputs[None] == outputs["overlap"] == outputs["split"] == ref[:30]


# --- lossless sampling ---------------------------------------------------------------------


@pytest.mark.parametrize("by_position", [True, False])
def test_sampling_dflash_follows_the_truncated_target(by_position: bool) -> None:
    """Chi-square over the first three tokens (V=8): the joint law equals the target's.

    A wiring check of the whole path (draft q, verify rows, rng use); the statistical power
    is in the 200k-sample tests of accept_draft above.
    """
    cfg = target_config(
        "qwen3", vocab_size=8, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )
    model = build_target(cfg, seed=3)
    dcfg = draft_config(
        cfg, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, target_layer_ids=(0, 1),
    )
    target = Target(model, dcfg.target_layer_ids)
    # fixed width: the controller, kept across the 600 requests, would learn to skip these drafts
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=4), target), block_size=3, adaptive=False)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    prompt = [1, 2, 3, 4]
    law = three_token_law(model, prompt, params)
    n = 600
    counts: Counter = Counter()
    accepted = 0
    for seed in range(n):
        out = [t for s in decoder.generate(prompt, params, 3, TokenRng(seed, by_position=by_position)) for t in s.tokens]
        counts[tuple(out)] += 1
        accepted += decoder.stats.accepted
    target.close()
    stat, df = _chi2(counts, law, n)
    assert stat < _chi2_critical(df), (stat, df)
    assert accepted > n // 10  # drafts were kept often enough that both paths ran


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)


def _seeded_plain(model: nn.Module, seed: int, max_tokens: int, params: SamplingParams = SEEDED) -> list[int]:
    steps = PlainDecoder(model).generate(PROMPT, params, max_tokens, TokenRng(seed))
    return [t for s in steps for t in s.tokens]


@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("block_size", [4, 16])
def test_seeded_sampling_equals_plain_whatever_the_drafter(varied: Varied, seed: int, block_size: int) -> None:
    """Position-keyed sampling: the draft, the verify width and the block never change the text."""
    cfg, model, _ = varied
    ref = _seeded_plain(model, seed, 40)
    assert len(set(ref)) > 4  # the seed samples, not a near-greedy path
    dcfg = draft_config(cfg, block_size=block_size)
    target = Target(model, dcfg.target_layer_ids)
    oracle = OracleDrafter(ref, vocab_size=cfg["vocab_size"], wrong_at=[None, 0, 2, 5])
    decoders = [
        SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=block_size),
        SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=block_size,
                           adaptive=False),
        SpeculativeDecoder(target, NgramDrafter(), block_size=block_size, adaptive=False),
        SpeculativeDecoder(target, oracle, block_size=block_size, adaptive=False),
    ]
    for decoder in decoders:
        for _ in range(2):  # the adaptive width moves between runs; the text does not
            out, _ = _run(decoder, 40, SEEDED, seed)
            assert out == ref, decoder.drafter.name
    assert decoders[3].stats.accepted > 10  # the oracle's drafts were verified and kept
    target.close()


class RecordingRng(TokenRng):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.calls: list[tuple[int, int]] = []

    def gumbel(self, first: int, rows: int, vocab: int) -> mx.array:
        self.calls.append((first, rows))
        return super().gumbel(first, rows, vocab)


def test_the_draft_proposes_with_the_noise_of_the_positions_it_drafts(varied: Varied) -> None:
    """Each cycle the drafter reads the same sequence positions as the verify rows (else acceptance falls)."""
    cfg, model, _ = varied
    dcfg = draft_config(cfg, block_size=4)
    target = Target(model, dcfg.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=4, adaptive=False)
    rng = RecordingRng(7)
    steps = [s for s in decoder.generate(PROMPT, SEEDED, 20, rng) if s.tokens]
    target.close()
    assert rng.calls[0] == (len(PROMPT), 1)  # the first token, after the prefill
    verify, draft = rng.calls[1::2], rng.calls[2::2]  # per cycle: the verify's rows, then the drafter's
    assert len(verify) == len(draft) > 3
    assert all(v[0] == d[0] and d[1] == v[1] - 1 for v, d in zip(verify, draft))
    emitted = [len(PROMPT) + sum(len(s.tokens) for s in steps[: i + 1]) for i in range(len(verify))]
    assert [v[0] for v in verify] == emitted  # the token after the anchor, at its sequence position


def test_seeded_sampling_with_logits_processors_reproduces(varied: Varied) -> None:
    _, model, _ = varied
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5, repetition_penalty=1.3, logit_bias=((3, 2.0),))
    assert _seeded_plain(model, 5, 24, params) == _seeded_plain(model, 5, 24, params)
    assert _seeded_plain(model, 5, 24, params) != _seeded_plain(model, 6, 24, params)


def test_accept_with_position_noise_keeps_drafts_equal_to_the_targets_sample() -> None:
    params = SamplingParams(temperature=1.0)
    logits = mx.random.normal((5, 6), key=mx.random.key(0))
    rng = TokenRng(9)
    noise = rng.gumbel(100, 5, 6)
    target_tokens = mx.argmax(filter_logprobs(logits, params) + noise, axis=-1).astype(mx.int32).tolist()
    for wrong in range(4):
        drafts = list(target_tokens[:4])
        drafts[wrong] = (drafts[wrong] + 1) % 6
        a, nxt = accept_draft(mx.array(drafts), logits, None, params, noise=noise)
        assert (a.item(), nxt.item()) == (wrong, target_tokens[wrong])
    a, nxt = accept_draft(mx.array(target_tokens[:4]), logits, None, params, noise=noise)
    assert (a.item(), nxt.item()) == (4, target_tokens[4])  # all kept, then the bonus row's sample


# --- logprobs, supports, drafters ----------------------------------------------------------


def test_logprobs_are_the_target_logprobs(varied: Varied) -> None:
    cfg, model, ref = varied
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)
    decoder = SpeculativeDecoder(Target(model), OracleDrafter(ref, vocab_size=cfg["vocab_size"], wrong_at=[1, None]), block_size=4)
    out, steps = _run(decoder, 20, params)
    got = [lp for s in steps for lp in s.logprobs]
    logits = model(mx.array(PROMPT + out)[None])[0, len(PROMPT) - 1 : -1]  # rows predicting out
    chosen, top_ids, top_lp = token_logprobs(logits, mx.array(out), 3)
    assert [g.token for g in got] == out
    assert mx.allclose(mx.array([g.logprob for g in got]), chosen, atol=1e-4).item()
    assert [[t for t, _ in g.top] for g in got] == top_ids.tolist()
    assert mx.allclose(mx.array([[lp for _, lp in g.top] for g in got]), top_lp, atol=1e-4).item()


def test_supports_refuses_logits_processors(varied: Varied) -> None:
    cfg, model, ref = varied
    decoder = SpeculativeDecoder(Target(model), NgramDrafter(), block_size=4)
    assert decoder.supports(SamplingParams(temperature=0.7, logprobs=True, top_logprobs=2)) is None
    for params in (SamplingParams(repetition_penalty=1.1), SamplingParams(logit_bias=((1, 2.0),))):
        assert "penalt" in decoder.supports(params)
        with pytest.raises(ValueError):
            next(decoder.generate(PROMPT, params, 4, TokenRng(0)))


def test_ngram_accepts_on_repetitive_text_and_stays_lossless(varied: Varied) -> None:
    cfg, model, ref = varied
    prompt = [5, 6, 7, 8, 9] * 6
    plain, gap = plain_greedy(model, prompt, 48)
    assert gap > MIN_GAP
    decoder = SpeculativeDecoder(Target(model), NgramDrafter(max_ngram=3, min_ngram=1), block_size=4)
    out = [t for s in decoder.generate(prompt, GREEDY, 48, TokenRng(0)) for t in s.tokens]
    assert out == plain
    assert decoder.stats.accepted > 0


def test_ngram_continues_periods_and_prefers_long_matches() -> None:
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    rng, params = TokenRng(0), GREEDY
    drafter.begin([1, 2, 3, 1, 2], None)
    assert drafter.propose([3], None, 5, params, rng).tokens.tolist() == [1, 2, 3, 1, 2]
    drafter.begin([7, 8, 1, 9, 9, 8, 1, 4, 5], None)
    assert drafter.propose([8, 1], None, 2, params, rng).tokens.tolist() == [4, 5]  # latest match
    drafter.begin([1, 2, 3], None)
    assert drafter.propose([4], None, 3, params, rng).tokens.tolist() == []


def test_target_taps_are_decoder_layer_outputs(varied: Varied) -> None:
    cfg, model, _ = varied
    ids = mx.array([PROMPT, PROMPT[::-1]])  # batched, no cache: the training path
    target = Target(model, (0, 2, 3))
    logits, taps = target(ids, None, taps=True)
    assert type(model.model.layers[2]).__name__.startswith("Tapped")
    target.close()
    assert not type(model.model.layers[2]).__name__.startswith("Tapped")
    h, outputs = model.model.embed_tokens(ids), []
    for layer in model.model.layers:
        h = layer(h, "causal", None)
        outputs.append(h)
    assert taps.shape == (2, len(PROMPT), 3 * cfg["hidden_size"])
    assert mx.allclose(taps, mx.concatenate([outputs[i] for i in (0, 2, 3)], axis=-1), atol=1e-5).item()
    assert mx.allclose(logits, model(ids), atol=1e-5).item()


def test_target_refuses_untrimmable_caches() -> None:
    model = build_target(target_config("qwen3"), seed=0)
    model.make_cache = lambda: [ArraysCache(2) for _ in model.layers]
    with pytest.raises(ValueError, match="hybrid/recurrent"):
        Target(model)


def test_dflash_keep_computes_only_the_verified_proposals(varied: Varied) -> None:
    """keep < num_tokens: the same block forward, the LM head on the kept rows only."""
    cfg, model, _ = varied
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    draft = build_draft(dcfg, seed=2)
    _, taps = target(mx.array([PROMPT]), None, taps=True)
    proposals = []
    for keep in (None, 3, 0):
        drafter = DFlashDrafter(draft, target)
        drafter.begin(PROMPT, taps)
        proposals.append(drafter.propose([PROMPT[-1]], None, 7, GREEDY, TokenRng(0), keep=keep).tokens)
    target.close()
    full, three, none = proposals
    assert full.shape == (7,) and three.shape == (3,) and none.shape == (0,)
    assert three.tolist() == full[:3].tolist()


@pytest.mark.parametrize("quantized", [False, True])
def test_the_drafts_noise_rows_equal_embedding_the_block_whole(varied: Varied, quantized: bool) -> None:
    """The MASK rows are embedded once and reused; every cycle's block must be what one lookup gives."""
    cfg, model, _ = varied
    if quantized:
        model = build_target(cfg, seed=1)
        nn.quantize(model, group_size=32, bits=4)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    drafter = DFlashDrafter(build_draft(dcfg, seed=2), target)
    for anchor, num_tokens in [(5, 7), (9, 3), (11, 0), (6, 12)]:
        ids = mx.array([[anchor] + [dcfg.mask_token_id] * num_tokens], dtype=mx.int32)
        want = drafter.draft.noise_embedding(ids, target.embed)
        got = drafter._noise(anchor, num_tokens)
        assert got.shape == want.shape and mx.array_equal(got, want).item(), (anchor, num_tokens)
    target.close()


def test_warm_up_measures_the_cost_curve_and_leaves_the_decoder_usable() -> None:
    """serving_model.warm_up (run at load on CUDA) moves the cost-curve measurement out of the first request."""
    cfg = target_config("llama", tie_word_embeddings=False)
    model = build_target(cfg, seed=1)
    ref, _ = plain_greedy(model, PROMPT, 12)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=8)
    assert decoder.cost_curve is None
    warm_up(decoder)
    assert decoder.cost_curve is not None and decoder.verify_width is None  # its dummy drafts taught nothing
    out, _ = _run(decoder, 12)
    assert out == ref
    rehearsed = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=8)
    warm_up(rehearsed, rehearse=True)  # on GPUs: every width once per sampling mode, then forgotten
    assert rehearsed.stats.cycles == 7 + 2 and rehearsed.verify_width is None  # the last pass: unseeded sampling
    out, _ = _run(rehearsed, 12)
    target.close()
    assert out == ref


def test_warm_up_stores_the_measured_costs_and_a_later_start_reads_them(tmp_path: Path) -> None:
    """On the CPU the costs are cached per machine and model (cost_cache.py): a restart does not time them."""
    cfg = target_config("llama", tie_word_embeddings=False)
    model = build_target(cfg, seed=1)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    draft = build_draft(dcfg, seed=2)
    costs = CostCache(tmp_path / "costs.json")
    first = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=8)
    warm_up(first, costs, "this machine, this model")
    stored = costs.get("this machine, this model")
    assert stored is not None and stored.curve == first.cost_curve and stored.draft_row_s == first.draft_row_s
    assert first.plain_step_s is not None and first.plain_step_s > 0 and stored.plain_step_s == first.plain_step_s
    assert costs.get("another model") is None
    costs.put("another model", Costs(CostCurve((9.0,) * 8), 0.5))  # a second entry leaves the first alone
    later = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=8)
    warm_up(later, costs, "this machine, this model")
    assert later.cost_curve == first.cost_curve and later.draft_row_s == first.draft_row_s  # read, not timed again
    assert later.plain_step_s == first.plain_step_s
    wrong = Costs(CostCurve(tuple(1.0 + 2.0 * r for r in range(8))), later.draft_row_s)  # 8 rows 15x 1: under load
    costs.put("this machine, this model", wrong)
    checked = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=8)
    warm_up(checked, costs, "this machine, this model")
    assert checked.cost_curve is not None and checked.cost_curve(8) < 1.0  # forwards timed now disagreed: measured
    assert costs.get("this machine, this model").curve == checked.cost_curve  # and stored in its place
    ref, _ = plain_greedy(model, PROMPT, 12)
    out, _ = _run(later, 12)
    target.close()
    assert out == ref
    (tmp_path / "costs.json").write_text("{not json")
    assert costs.get("this machine, this model") is None  # a damaged file means measuring again, not failing
    assert CostCache.default({"DFLASH_COST_CACHE": "off"}) is None
    assert CostCache.default({"XDG_CACHE_HOME": str(tmp_path)}).path == tmp_path / "dflash-server" / "costs.json"


def test_warm_prefill_runs_a_prompt_past_one_chunk_and_leaves_the_decoders_usable() -> None:
    """serving_model.warm_prefill (at load on CUDA, where a first prefill compiles kernels): a prompt of
    more than one chunk through each decoder, ending in the split head, then a real request as before."""
    cfg = target_config("llama", tie_word_embeddings=False)
    model = build_target(cfg, seed=1)
    ref, _ = plain_greedy(model, PROMPT, 12)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    speculative = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=8,
                                     prefill_chunk=16)
    plain = PlainDecoder(model, prefill_chunk=16)
    assert plain.split is not None and target.splits_head
    rows: list[int] = []
    last_logits = plain.split.last_logits
    plain.split.last_logits = lambda tokens, cache: rows.append(tokens.shape[1]) or last_logits(tokens, cache)
    warm_prefill([plain, speculative], 16)
    del plain.split.last_logits
    assert rows == [16, 16]  # the last chunk of 80 tokens, for plain and then DFlash (one SplitHead per model)
    assert speculative.verify_width is None  # the made-up prompt's drafts taught nothing
    out, _ = _run(speculative, 12)
    target.close()
    assert out == ref
