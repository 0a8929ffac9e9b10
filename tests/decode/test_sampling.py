"""The sampling distribution, seeds and logits processors."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from engine.decode.sampling import (
    SamplingParams,
    TokenRng,
    apply_processors,
    filter_logprobs,
    make_logits_processors,
    position_gumbel,
    sample,
    token_logprobs,
)

LOGITS = mx.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def probs(params: SamplingParams) -> np.ndarray:
    return np.exp(np.array(filter_logprobs(LOGITS, params)))[0]


def test_temperature_one_is_softmax() -> None:
    expected = np.exp(np.array(LOGITS[0])) / np.exp(np.array(LOGITS[0])).sum()
    np.testing.assert_allclose(probs(SamplingParams()), expected, rtol=1e-5)


def test_top_k_keeps_k() -> None:
    p = probs(SamplingParams(top_k=2))
    assert (p > 0).sum() == 2 and p[0] > p[1] > 0
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-5)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    full = probs(SamplingParams())
    p = probs(SamplingParams(top_p=0.7))
    kept = int((p > 0).sum())
    assert full[: kept - 1].sum() < 0.7 <= full[:kept].sum()


def test_min_p_relative_to_top() -> None:
    full = probs(SamplingParams())
    p = probs(SamplingParams(min_p=0.2))
    assert np.all((p > 0) == (full >= 0.2 * full[0]))


@pytest.mark.parametrize("by_position", [True, False])
def test_seed_reproduces_and_differs(by_position: bool) -> None:
    params = SamplingParams(temperature=1.0, seed=7)

    def draw(seed: int) -> list[int]:
        rng = TokenRng(seed, by_position=by_position)
        return [sample(LOGITS, params, rng, position).item() for position in range(40)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_position_keyed_tokens_depend_on_seed_and_position_only() -> None:
    params = SamplingParams(temperature=1.0)
    rng = TokenRng(3)
    ahead = [sample(LOGITS, params, rng, p).item() for p in range(50, 60)]
    other = TokenRng(3)
    sample(LOGITS, params, other, 7)  # draws made elsewhere do not move a position's token
    block = sample(mx.broadcast_to(LOGITS, (10, LOGITS.shape[1])), params, other, 50).tolist()
    assert block == ahead


@pytest.mark.parametrize("by_position", [True, False])
def test_sampling_frequencies_follow_distribution(by_position: bool) -> None:
    params = SamplingParams(temperature=0.8, top_k=4)
    rng = TokenRng(0, by_position=by_position)
    n = 20000
    logits = mx.broadcast_to(LOGITS, (n, LOGITS.shape[1]))
    draws = np.array(sample(logits, params, rng, 1000))  # position-keyed: positions 1000..20999
    counts = np.bincount(draws, minlength=6)
    expected = probs(params) * n
    kept = expected > 0
    assert counts[~kept].sum() == 0  # top_k: nothing outside the kept set
    chi2 = (((counts - expected) ** 2)[kept] / expected[kept]).sum()
    assert chi2 < 16.27, (counts, expected)  # chi-square, 3 degrees of freedom, p = 0.001


def test_position_gumbel_is_standard_gumbel() -> None:
    g = np.array(position_gumbel(12345, 0, 64, 4096)).ravel()
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.std() - np.pi / np.sqrt(6)) < 0.01
    assert not np.array_equal(g[:4096], g[4096:8192])  # rows differ


def test_greedy_is_argmax() -> None:
    assert sample(LOGITS, SamplingParams(temperature=0), TokenRng(0), 0).item() == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(top_k=-2), dict(repetition_penalty=0), dict(top_logprobs=21)])
def test_invalid_params_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_processors() -> None:
    logits = mx.zeros((1, 6))
    history = mx.array([1, 2, 3, 3])  # prompt = [1], output = [2, 3, 3]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, logit_bias=((5, 2.0),))
    out = np.array(apply_processors(make_logits_processors(p, num_prompt_tokens=1), history, logits))[0]
    np.testing.assert_allclose(out, [0, 0, -1.5, -2.5, 0, 2.0])
    rep = SamplingParams(repetition_penalty=2.0)
    signed = mx.array([[1.0, -1.0, 1.0, 1.0, 1.0, 1.0]])
    out = np.array(apply_processors(make_logits_processors(rep, 1), mx.array([0, 1]), signed))[0]
    np.testing.assert_allclose(out, [0.5, -2.0, 1, 1, 1, 1])


def test_token_logprobs_are_log_softmax() -> None:
    chosen, top_ids, top_lp = token_logprobs(LOGITS, mx.array([2]), 3)
    ref = np.array(LOGITS[0]) - np.log(np.exp(np.array(LOGITS[0])).sum())
    assert math.isclose(chosen.item(), ref[2], rel_tol=1e-5)
    assert top_ids.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(np.array(top_lp)[0], ref[:3], rtol=1e-5)


def test_seeded_requests_sample_by_position_and_unseeded_ones_by_rejection() -> None:
    assert TokenRng(5).by_position and not TokenRng().by_position
    assert TokenRng(by_position=True).by_position and not TokenRng(5, by_position=False).by_position
