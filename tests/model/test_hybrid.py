"""Hybrid targets (Gated DeltaNet + attention: qwen3_5, qwen3_next) as DFlash targets.

Tiny random float32 models with GDN layers at 0 and 2 and attention at 1 and 3. Greedy
comparisons first check the plain run's smallest top-1/top-2 logit gap, as
test_speculative.py does; cache comparisons are against a fresh plain run, token by token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map_with_path
from mlx_lm.models.cache import ArraysCache, make_prompt_cache
from tiny_models import (
    build_draft,
    build_target,
    draft_config,
    load_target,
    plain_greedy,
    save_target,
    save_tiny_draft,
    target_config,
)

from engine.decode.decoder import DecodeStep
from engine.decode.drafters import DFlashDrafter, OracleDrafter
from engine.decode.sampling import SamplingParams, TokenRng
from engine.decode.speculative import SpeculativeDecoder
from engine.model.draft import load_draft
from engine.model.recurrent_rollback import MAX_RECORDED_ROWS, RecurrentCache
from engine.model.target import Target

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]
GREEDY = SamplingParams(temperature=0.0)
MIN_GAP = 1e-4
GDN = {
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
}
QWEN3_NEXT_DENSE = {
    "num_experts": 0, "num_experts_per_tok": 0, "decoder_sparse_step": 1, "shared_expert_intermediate_size": 0,
    "mlp_only_layers": [], "moe_intermediate_size": 0, "partial_rotary_factor": 0.25,
}
SEEDS = {"qwen3_5": 2, "qwen3_next": 3}  # untied targets whose greedy output wanders, no near-ties
Hybrid = tuple[dict[str, Any], nn.Module, list[int]]  # target config, model, plain greedy output


def hybrid_config(family: str, **overrides: Any) -> dict[str, Any]:
    extra = QWEN3_NEXT_DENSE if family == "qwen3_next" else {}
    return target_config(family, **{"tie_word_embeddings": False, **GDN, **extra, **overrides})


@pytest.fixture(scope="module", params=list(SEEDS))
def hybrid(request: pytest.FixtureRequest) -> Hybrid:
    cfg = hybrid_config(request.param)
    model = build_target(cfg, seed=SEEDS[request.param])
    ref, gap = plain_greedy(model, PROMPT, 40)
    assert gap > MIN_GAP, f"seed gives a near-tie ({gap}); pick another seed"
    assert len(set(ref)) >= 8
    return cfg, model, ref


def _run(decoder: SpeculativeDecoder, max_tokens: int) -> tuple[list[int], list[DecodeStep]]:
    steps = [s for s in decoder.generate(PROMPT, GREEDY, max_tokens, TokenRng(0)) if s.tokens]
    return [t for s in steps for t in s.tokens], steps


def _full_width(target: Target, drafter: Any, block_size: int) -> SpeculativeDecoder:
    """A decoder that verifies the whole block every cycle, so its cycles line up with the
    drafter's and the reference's."""
    return SpeculativeDecoder(target, drafter, block_size=block_size, adaptive=False)


def _caches_of(target: Target) -> list[list[Any]]:
    """Every cache the target makes from now on (the decoder keeps its own out of reach)."""
    made: list[list[Any]] = []
    make = target.make_cache
    target.make_cache = lambda: made.append(make()) or made[-1]  # type: ignore[method-assign]
    return made


def _in_cache(target: Target, cache: list[Any], out: list[int]) -> list[int]:
    """The emitted tokens the cache holds: all but the pending last one, or all of them when
    the last block was cut at max_tokens after a full acceptance (its bonus never emitted)."""
    held = target.cache_length(cache) - len(PROMPT)
    assert held in (len(out) - 1, len(out)), (held, len(out))
    return out[:held]


def _layer_states(cache: list[Any]) -> list[mx.array]:
    """Per layer: conv window and recurrent state, or the live K/V rows."""
    states = []
    for c in cache:
        if isinstance(c, ArraysCache):
            states += [c[0], c[1]]
        else:
            states += [c.keys[..., : c.offset, :], c.values[..., : c.offset, :]]
    return states


def _assert_cache_holds(model: nn.Module, cache: list[Any], committed: list[int]) -> None:
    """`cache` equals that of a fresh plain run: PROMPT in one forward, then `committed` one
    token at a time (float32 noise from the different matmul shapes stays below 1e-4)."""
    fresh = make_prompt_cache(model)
    model(mx.array(PROMPT)[None], cache=fresh)
    for token in committed:
        model(mx.array([[token]]), cache=fresh)
    ours, theirs = _layer_states(cache), _layer_states(fresh)
    assert [c.offset for c in cache] == [len(PROMPT) + len(committed)] * len(cache)
    assert [a.shape for a in ours] == [b.shape for b in theirs]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert mx.allclose(a, b, atol=1e-4).item(), (i // 2, mx.abs(a - b).max().item())


# --- rollback itself -----------------------------------------------------------------------


def test_hybrid_caches_are_wrapped_and_hooks_removed_on_close(hybrid: Hybrid) -> None:
    _, model, _ = hybrid
    gdn = model.layers[0].linear_attn
    classes = type(gdn), type(gdn.conv1d)
    with Target(model, (1, 3)) as target, Target(model) as other:
        cache = target.make_cache()
        assert [type(c).__name__ for c in cache] == ["RecurrentCache", "KVCache"] * 2
        assert type(gdn).__name__.startswith("Recording")
        other.close()
        assert type(gdn).__name__.startswith("Recording"), "the other Target still records"
    assert (type(gdn), type(gdn.conv1d)) == classes


@pytest.mark.parametrize("block", [1, 5, 16])
def test_trim_rolls_back_to_every_row_count(hybrid: Hybrid, block: int) -> None:
    _, model, ref = hybrid
    target = Target(model)
    rows = ref[:block]
    for n in range(block + 1):
        cache = target.make_cache()
        target(mx.array(PROMPT)[None], cache, taps=False)
        target(mx.array(rows)[None], cache, taps=False)  # a verify-sized forward
        target.trim(cache, n)
        assert target.cache_length(cache) == len(PROMPT) + block - n
        _assert_cache_holds(model, cache, rows[: block - n])
    target.close()


def test_trims_add_up_and_stop_at_the_recorded_forward(hybrid: Hybrid) -> None:
    _, model, ref = hybrid
    target = Target(model)
    cache = target.make_cache()
    target(mx.array(PROMPT)[None], cache, taps=False)
    target(mx.array(ref[:8])[None], cache, taps=False)
    target.trim(cache, 2)
    target.trim(cache, 3)
    _assert_cache_holds(model, cache, ref[:3])
    with pytest.raises(RuntimeError, match="only the last forward"):
        target.trim(cache, 4)  # one row of the prompt forward
    target.close()


def test_long_forwards_are_not_recorded(hybrid: Hybrid) -> None:
    _, model, _ = hybrid
    target = Target(model)
    cache = target.make_cache()
    target(mx.array(PROMPT * (MAX_RECORDED_ROWS // len(PROMPT) + 1))[None], cache, taps=False)
    assert all(c.record is None for c in cache if isinstance(c, RecurrentCache))
    with pytest.raises(RuntimeError, match="not recorded"):
        target.trim(cache, 1)
    target.close()


# --- lossless speculative decoding ---------------------------------------------------------


@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_dflash_equals_plain(hybrid: Hybrid, block_size: int) -> None:
    cfg, model, ref = hybrid
    dcfg = draft_config(cfg, block_size=block_size)
    target = Target(model, dcfg.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(build_draft(dcfg, seed=2), target), block_size=block_size)
    made = _caches_of(target)
    out, _ = _run(decoder, len(ref))
    target.close()
    assert out == ref
    _assert_cache_holds(model, made[0], _in_cache(target, made[0], out))


@pytest.mark.parametrize("block_size", [4, 8])
def test_oracle_rejects_at_every_block_position(hybrid: Hybrid, block_size: int) -> None:
    cfg, model, ref = hybrid
    target = Target(model)
    wrong_at = [*range(block_size - 1), None]
    decoder = _full_width(target, OracleDrafter(ref, vocab_size=cfg["vocab_size"], wrong_at=wrong_at), block_size)
    made = _caches_of(target)
    out, steps = _run(decoder, len(ref))
    target.close()
    assert out == ref
    for cycle, step in enumerate(steps[1:]):
        wrong = wrong_at[cycle % len(wrong_at)]
        if len(step.tokens) == step.accepted + 1:  # not cut by max_tokens
            assert step.accepted == (step.drafted if wrong is None else min(wrong, step.drafted)), (cycle, step)
    assert set(decoder.stats.accept_counts) != {0}
    _assert_cache_holds(model, made[0], _in_cache(target, made[0], out))


def test_cache_matches_committed_tokens_when_closed_early(hybrid: Hybrid) -> None:
    cfg, model, ref = hybrid
    target = Target(model)
    decoder = SpeculativeDecoder(target, OracleDrafter(ref, vocab_size=cfg["vocab_size"], wrong_at=[1, None, 0]), block_size=4)
    made = _caches_of(target)
    steps = decoder.generate(PROMPT, GREEDY, len(ref), TokenRng(0))
    out = [t for _, s in zip(range(5), steps) for t in s.tokens]
    steps.close()  # a verify block is in flight: it is rolled back whole
    target.close()
    _assert_cache_holds(model, made[0], _in_cache(target, made[0], out))


# --- against the authors' reference (dflash==0.1.0), which rolls GDN back its own way ------


class _SilentDetokenizer:
    last_segment = ""

    def reset(self) -> None: ...
    def add_token(self, token: int) -> None: ...
    def finalize(self) -> None: ...


@pytest.fixture(scope="module", params=["random", "echo"])
def reference_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    """(reference module, our target model, reference target model, draft dir, plain greedy, mixed).

    random: an untied target and a random draft (mostly rejections); echo: a tied target that
    settles on few tokens and a draft whose mask id is the commonest one (mixed acceptance).
    """
    ref = pytest.importorskip("dflash.model_mlx")
    echo = request.param == "echo"
    root = tmp_path_factory.mktemp(f"hybrid-{request.param}")
    cfg = hybrid_config("qwen3_5", tie_word_embeddings=echo)
    model = build_target(cfg, seed=5 if echo else SEEDS["qwen3_5"])
    plain, gap = plain_greedy(model, PROMPT, 48)
    assert gap > MIN_GAP
    overrides = {"mask_token_id": Counter(plain).most_common(1)[0][0]} if echo else {}
    draft = build_draft(draft_config(cfg, **overrides), seed=7)
    if echo:  # keep the context path live but small
        draft.update(tree_map_with_path(lambda p, w: w * 0.3 if "o_proj" in p or "down_proj" in p else w, draft.parameters()))
    save_target(model, cfg, root / "target")
    save_tiny_draft(draft, root / "draft")
    yield ref, load_target(root / "target"), load_target(root / "target"), root / "draft", plain, echo


def test_greedy_generation_matches_the_reference(reference_pair: tuple[Any, ...]) -> None:
    ref, our_model, ref_model, draft_dir, plain, mixed = reference_pair
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = TokenizerWrapper.__new__(TokenizerWrapper)  # token ids are all the reference needs here
    tokenizer._detokenizer, tokenizer._eos_token_ids = _SilentDetokenizer(), set()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "snapshot_download", lambda *args, **kwargs: str(draft_dir))
        ref_draft = ref.load_draft("local/draft")
    block_size, max_tokens = ref_draft.config.block_size, len(plain)
    ref_steps = [r.tokens for r in ref.stream_generate(ref_model, ref_draft, tokenizer, mx.array(PROMPT),
                                                       block_size=block_size, max_tokens=max_tokens, temperature=0.0) if r.tokens]
    draft = load_draft(Path(draft_dir), target_hidden_size=64, target_vocab_size=96, target_num_layers=4)
    target = Target(our_model, draft.config.target_layer_ids)
    decoder = _full_width(target, DFlashDrafter(draft, target), block_size)
    out, steps = _run(decoder, max_tokens)
    target.close()
    assert out == [t for step in ref_steps for t in step] == plain
    assert [s.tokens for s in steps] == ref_steps  # the same acceptance decision in every cycle
    if mixed:
        assert decoder.stats.accept_counts[0] > 0 and decoder.stats.accepted > 0, decoder.stats.accept_counts


def test_serving_loads_a_draft_for_a_nested_config_target(hybrid: Hybrid, tmp_path: Path) -> None:
    """qwen3_5 keeps the LM's dims in text_config; the server must read them there."""
    from types import SimpleNamespace

    from engine.model.draft import DFlashDraft
    from engine.runtime.serving_model import load_draft_for

    cfg, model, _ = hybrid
    dims = vars(model.args).get("text_config") or vars(model.args)
    draft_cfg = draft_config(dims, target_layer_ids=(1, dims["num_hidden_layers"] - 1))
    path = save_tiny_draft(build_draft(draft_cfg), tmp_path)
    loaded = SimpleNamespace(model=model)
    assert isinstance(load_draft_for(str(path), loaded, load_draft), DFlashDraft)
