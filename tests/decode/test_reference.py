"""Cross-check against the authors' MLX reference, dflash==0.1.0 `dflash/model_mlx.py`.

Install with `pip install --no-deps dflash==0.1.0` (its MLX module needs only mlx-lm and
huggingface_hub). The reference loads drafts through `snapshot_download`; we point that at a
local directory holding a random draft in the published layout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("dflash")

import dflash.model_mlx as ref  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map_with_path  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: E402
from tiny_models import (  # noqa: E402
    build_draft,
    build_draft2,
    build_target,
    draft_config,
    load_target,
    plain_greedy,
    save_target,
    save_tiny_draft,
    target_config,
)

from engine.decode.drafters import DFlashDrafter  # noqa: E402
from engine.decode.sampling import SamplingParams, TokenRng  # noqa: E402
from engine.decode.speculative import SpeculativeDecoder  # noqa: E402
from engine.model.draft import DFlashDraft, load_draft  # noqa: E402
from engine.model.target import Target  # noqa: E402

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]
Pair = tuple[nn.Module, nn.Module, DFlashDraft, Any, list[int]]  # ours, theirs, drafts, plain greedy


class _SilentDetokenizer:
    last_segment = ""

    def reset(self) -> None: ...
    def add_token(self, token: int) -> None: ...
    def finalize(self) -> None: ...


class _TokenIdsOnly(TokenizerWrapper):
    """The reference wants a TokenizerWrapper; token ids are all these tests need."""

    def __init__(self) -> None:
        self._detokenizer = _SilentDetokenizer()
        self._eos_token_ids = set()


SETUPS = {
    # untied target with a wandering greedy output, plain random draft: mostly rejections
    "random": {"target": {"tie_word_embeddings": False}, "target_seed": 1, "draft": {}},
    # tied target that settles on one token, draft whose mask id is that token: mixed acceptance
    "echo": {"target": {}, "target_seed": 1, "draft": {}, "echo": True},
    # a sliding layer (causal inside the block) whose window is shorter than the prompt
    "sliding": {
        "target": {"tie_word_embeddings": False}, "target_seed": 1,
        "draft": {"layer_types": ("sliding_attention", "full_attention"), "sliding_window": 8},
    },
}


@pytest.fixture(scope="module", params=list(SETUPS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """(our target, reference target, our draft, reference draft, plain greedy) from disk."""
    setup = SETUPS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cfg = target_config("qwen3", **setup["target"])
    model = build_target(cfg, seed=setup["target_seed"])
    plain, gap = plain_greedy(model, PROMPT, 48)
    assert gap > 1e-4, "near-tie in the plain run; pick another seed"
    overrides = dict(setup["draft"])
    if setup.get("echo"):
        overrides["mask_token_id"] = Counter(plain).most_common(1)[0][0]
    draft = build_draft(draft_config(cfg, **overrides), seed=7)
    if setup.get("echo"):
        draft.update(tree_map_with_path(lambda p, w: w * 0.3 if "o_proj" in p or "down_proj" in p else w, draft.parameters()))
    save_target(model, cfg, root / "target")
    save_tiny_draft(draft, root / "draft")
    sizes = {"target_hidden_size": 64, "target_vocab_size": 96, "target_num_layers": 4}
    ours = load_draft(root / "draft", **sizes)
    mp = pytest.MonkeyPatch()
    mp.setattr(ref, "snapshot_download", lambda *args, **kwargs: str(root / "draft"))
    theirs = ref.load_draft("local/draft")
    mp.undo()
    yield load_target(root / "target"), load_target(root / "target"), ours, theirs, plain


def test_one_cycle_matches_the_reference(pair: Pair) -> None:
    our_model, ref_model, draft, ref_draft, plain = pair
    block_size = draft.config.block_size
    # reference: its layer hooks, its prefill, its draft forward
    ref._patch_model(ref_model, ref_draft.config.target_layer_ids)
    _, ref_taps, _ = ref._prefill_target(ref_model, mx.array(PROMPT), make_prompt_cache(ref_model), None, 2048)
    ref_draft.bind(ref_model)
    block = mx.array([[plain[0]] + [draft.config.mask_token_id] * (block_size - 1)])
    ref_logits = ref_draft(block, ref_taps, ref_draft.make_cache(), logits_start=1)
    # ours: Target taps, projected context, KV-injected draft, shared LM head
    target = Target(our_model, draft.config.target_layer_ids)
    cache = target.make_cache()
    _, head = target(mx.array(PROMPT[:-1])[None], cache, taps=True)
    _, tail = target(mx.array(PROMPT[-1:])[None], cache, taps=True)
    taps = mx.concatenate([head, tail], axis=1)
    hidden = draft(draft.noise_embedding(block, target.embed), draft.project_context(taps),
                   cache=draft.make_cache(), q_offset=len(PROMPT))
    logits = draft.logits(hidden[:, 1:], target.lm_head)
    target.close()
    assert mx.allclose(taps, ref_taps, atol=1e-5).item()
    assert logits.shape == ref_logits.shape == (1, block_size - 1, 96)
    assert mx.allclose(logits, ref_logits, atol=1e-4).item(), mx.abs(logits - ref_logits).max()


def greedy_steps(pair: Pair) -> tuple[list[list[int]], list[list[int]], SpeculativeDecoder]:
    """Per-cycle greedy tokens of the reference's loop and of our fixed-width decoder, on the same pair."""
    our_model, ref_model, draft, ref_draft, plain = pair
    block_size, max_tokens = draft.config.block_size, len(plain)
    responses = ref.stream_generate(ref_model, ref_draft, _TokenIdsOnly(), mx.array(PROMPT),
                                    block_size=block_size, max_tokens=max_tokens, temperature=0.0)
    ref_steps = [r.tokens for r in responses if r.tokens]
    target = Target(our_model, draft.config.target_layer_ids)
    decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=block_size, adaptive=False)
    steps = [s.tokens for s in decoder.generate(PROMPT, SamplingParams(temperature=0.0), max_tokens, TokenRng(0)) if s.tokens]
    target.close()
    return steps, ref_steps, decoder


def test_greedy_generation_matches_the_reference(pair: Pair) -> None:
    steps, ref_steps, _ = greedy_steps(pair)
    assert sum(steps, []) == sum(ref_steps, []) == pair[-1]
    assert steps == ref_steps  # the same acceptance decision in every cycle


# --- DFlash 2 (the reference's DFlash2DraftModel: GroupedDynamicCausalConv + CandidateSelector) -----------

SETUPS2 = {
    "random": {"target": {"tie_word_embeddings": False}, "scale": 0.3},
    "echo": {"target": {}, "scale": 0.1, "echo": True},
}


@pytest.fixture(scope="module", params=list(SETUPS2))
def pair2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """As `pair`, with a random DFlash 2 draft (random conv and selector) in the published layout."""
    setup = SETUPS2[request.param]
    root = tmp_path_factory.mktemp(f"dflash2-{request.param}")
    cfg = target_config("qwen3", **setup["target"])
    model = build_target(cfg, seed=1)
    plain, gap = plain_greedy(model, PROMPT, 48)
    assert gap > 1e-4, "near-tie in the plain run; pick another seed"
    overrides = {"mask_token_id": Counter(plain).most_common(1)[0][0]} if setup.get("echo") else {}
    draft = build_draft2(draft_config(cfg, block_size=8, **overrides), seed=7, scale=setup["scale"])
    if setup.get("echo"):
        draft.update(tree_map_with_path(lambda p, w: w * 0.3 if "o_proj" in p or "down_proj" in p else w, draft.parameters()))
    save_target(model, cfg, root / "target")
    save_tiny_draft(draft, root / "draft")
    ours = load_draft(root / "draft", target_hidden_size=64, target_vocab_size=96, target_num_layers=4)
    mp = pytest.MonkeyPatch()
    mp.setattr(ref, "snapshot_download", lambda *args, **kwargs: str(root / "draft"))
    theirs = ref.load_draft("local/draft")
    mp.undo()
    assert isinstance(theirs, ref.DFlash2DraftModel)
    yield load_target(root / "target"), load_target(root / "target"), ours, theirs, plain


def test_dflash2_proposal_matches_the_reference(pair2: Pair) -> None:
    """One draft forward and selector walk: the same hidden rows, unary logits and greedy path as theirs."""
    our_model, ref_model, draft, ref_draft, plain = pair2
    block_size = draft.config.block_size
    ref._patch_model(ref_model, ref_draft.config.target_layer_ids)
    _, ref_taps, _ = ref._prefill_target(ref_model, mx.array(PROMPT), make_prompt_cache(ref_model), None, 2048)
    ref_draft.bind(ref_model)
    block = mx.array([[plain[0]] + [draft.config.mask_token_id] * (block_size - 1)])
    ref_hidden = ref_draft.hidden_states(block, ref_taps, ref_draft.make_cache(), logits_start=1)
    ref_tokens, _, _ = ref_draft.propose(block, ref_taps, ref_draft.make_cache(), 0.0, logits_start=1)
    target = Target(our_model, draft.config.target_layer_ids)
    _, taps = target(mx.array(PROMPT)[None], target.make_cache(), taps=True)
    hidden = draft(draft.noise_embedding(block, target.embed), draft.project_context(taps),
                   cache=draft.make_cache(), q_offset=len(PROMPT))[:, 1:]
    drafter = DFlashDrafter(draft, target)
    drafter.begin(PROMPT, taps)
    tokens = drafter.propose([plain[0]], None, block_size - 1, SamplingParams(temperature=0.0), TokenRng(0)).tokens
    target.close()
    assert mx.allclose(hidden, ref_hidden, atol=1e-4).item(), mx.abs(hidden - ref_hidden).max()
    assert tokens.tolist() == ref_tokens[0].tolist()


def test_dflash2_greedy_generation_matches_the_reference(pair2: Pair) -> None:
    draft, plain = pair2[2], pair2[-1]
    steps, ref_steps, decoder = greedy_steps(pair2)
    assert sum(steps, []) == sum(ref_steps, []) == plain
    assert steps == ref_steps  # the same proposals accepted in every cycle
    if draft.config.mask_token_id == Counter(plain).most_common(1)[0][0]:  # the echo setup: drafts were kept
        assert decoder.stats.accepted > 0
