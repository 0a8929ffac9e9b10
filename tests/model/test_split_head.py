"""SplitHead: a prefill chunk's logits from its last row only, where the model is its body then its head."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from engine.decode.drafters import NgramDrafter
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.sampling import SamplingParams, TokenRng
from engine.decode.speculative import SpeculativeDecoder
from engine.model.split_head import SplitHead
from engine.model.target import Target
from tests.tiny_models import build_target, plain_greedy, target_config

# within the tiny models' 96-token vocabulary: MLX's gather does not check bounds, and an id past it read
# whatever followed the embedding (NaN logits in about one run in 300)
PROMPT = [3, 17, 42, 8, 91, 5, 23, 61, 7, 11, 30, 2, 77, 14, 9, 50, 4, 38, 66, 12]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_last_row_logits_equal_the_models_own(family: str, tied: bool) -> None:
    model = build_target(target_config(family, tie_word_embeddings=tied), seed=4)
    assert max(PROMPT) < model.args.vocab_size
    split = SplitHead.probe(model)
    assert split is not None and SplitHead.probe(model) is split  # probed once per model
    ids = mx.array([PROMPT], dtype=mx.int32)
    want = model(ids, cache=make_prompt_cache(model))[:, -1:]
    got = split.last_logits(ids, make_prompt_cache(model))
    assert got.shape == want.shape == (1, 1, model.args.vocab_size)
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item()


class _SoftCapped:
    """A model whose forward caps its logits after the head (gemma-2 style): not body-then-head."""

    def __init__(self, model: object) -> None:
        self.__dict__["inner"] = model

    def __getattr__(self, name: str) -> object:
        return getattr(self.__dict__["inner"], name)

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        return 2.0 * mx.tanh(self.__dict__["inner"](ids, cache=cache) / 2.0)


def test_a_model_with_work_after_its_head_keeps_the_separate_last_token_forward() -> None:
    inner = build_target(target_config("llama"), seed=5)
    capped = _SoftCapped(inner)
    assert SplitHead._find(capped) is None  # the probe sees logits the split would get wrong
    ref, _ = plain_greedy(inner, PROMPT, 6)
    decoder = PlainDecoder(inner, prefill_chunk=8)
    decoder.split = None  # the fallback: prefill but the last token, which the first step's forward runs
    steps = decoder.generate(PROMPT, SamplingParams(temperature=0.0), 6, TokenRng(None))
    assert [t for s in steps for t in s.tokens] == ref


@pytest.mark.parametrize("chunk", [8, 64])
def test_a_speculative_prefill_runs_no_separate_last_token_forward(chunk: int) -> None:
    model = build_target(target_config("qwen3"), seed=6)
    target = Target(model)
    assert target.splits_head
    calls: list[tuple[int, bool]] = []
    original = Target.__call__

    def spy(self: Target, tokens: mx.array, cache: list, **kw: object) -> tuple:
        calls.append((tokens.shape[1], bool(kw.get("last"))))
        return original(self, tokens, cache, **kw)

    decoder = SpeculativeDecoder(target, NgramDrafter(), block_size=4, prefill_chunk=chunk, adaptive=False)
    Target.__call__ = spy  # type: ignore[method-assign]
    try:
        first = next(s for s in decoder.generate(PROMPT, SamplingParams(temperature=0.0), 1, TokenRng(None)) if s.tokens)
    finally:
        Target.__call__ = original  # type: ignore[method-assign]
    spans = [(8, False), (8, False), (4, True)] if chunk == 8 else [(len(PROMPT), True)]
    assert calls == spans  # the last chunk gives the first token; no 1-row forward after it
    assert first.tokens == plain_greedy(model, PROMPT, 1)[0]
