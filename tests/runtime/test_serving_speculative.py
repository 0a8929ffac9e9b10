"""The served embedded model with speculative decoding: greedy output equals plain decoding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import EngineConfig, ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app
from tests.tiny_models import build_draft, build_draft2, draft_config, save_tiny_draft

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Repeat after me: one two three, one two three, one two three.",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}
    config = draft_config(target, num_hidden_layers=1, target_layer_ids=(1, 15, 27), mask_token_id=4,
                          head_dim=64, num_attention_heads=9, num_key_value_heads=3, intermediate_size=256,
                          block_size=8)
    return save_tiny_draft(build_draft(config, seed=3), tmp_path_factory.mktemp("draft"))


@pytest.fixture(scope="module")
def random_dflash2_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random DFlash 2 draft (random conv and selector too) for the embedded model, published layout."""
    target = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}
    config = draft_config(target, num_hidden_layers=1, target_layer_ids=(1, 15, 27), mask_token_id=4,
                          head_dim=64, num_attention_heads=9, num_key_value_heads=3, intermediate_size=256,
                          block_size=8, conv_kernel_size=2, conv_group_size=16, selector_rank=16, selector_top_k=16)
    return save_tiny_draft(build_draft2(config, seed=3, scale=0.05), tmp_path_factory.mktemp("draft2"))


def serve(**engine: object) -> TestClient:
    config = ServerConfig(engine=EngineConfig(**engine))
    async_engine = AsyncEngine(lambda: ServingModel.load(config.engine), max_waiting=4)
    return TestClient(create_app(config, async_engine), base_url="http://localhost")  # Host allowlist


def greedy_outputs(client: TestClient, prompts: list[str] = PROMPTS, max_tokens: int = MAX_TOKENS) -> list[tuple[str, dict]]:
    outs = []
    for prompt in prompts:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body).json()
        outs.append((r["choices"][0]["message"]["content"], r["usage"]))
    return outs


@pytest.fixture(scope="module")
def plain() -> list[tuple[str, dict]]:
    with serve(draft="none") as client:
        assert client.get("/health").json()["drafter"] == "none"
        return greedy_outputs(client)


@pytest.mark.parametrize("engine", [dict(drafter="ngram"), dict(block_size=8), dict(block_size=4),
                                    dict(block_size=8, tree_budget=16), dict(block_size=8, tree_budget="auto")],
                         ids=["ngram", "random-draft-b8", "random-draft-b4", "random-draft-tree16", "random-draft-tree-auto"])
def test_greedy_speculative_equals_plain(engine: dict, plain: list, random_draft: Path) -> None:
    if "drafter" not in engine:
        engine = {**engine, "draft": str(random_draft)}
    with serve(**engine) as client:
        health = client.get("/health").json()
        assert health["drafter"].startswith(engine.get("drafter", "dflash"))
        if "tree_budget" in engine:  # /health says whether trees are verified
            want = "auto" if engine["tree_budget"] == "auto" else f"{engine['tree_budget']} nodes"
            assert health["drafter"].endswith(f", trees {want}")
        outs = greedy_outputs(client)
    for (text, usage), (plain_text, _) in zip(outs, plain):
        assert text == plain_text
        spec = usage["speculative"]
        assert spec["decoder"] != "plain"
        assert usage["completion_tokens_details"]["accepted_prediction_tokens"] == spec["accepted_tokens"]
    # the width controller outlives a request: after a useless draft it may verify none in a short one
    assert outs[0][1]["speculative"]["verify_steps"] > 0


@pytest.mark.parametrize("tree_budget", [0, "auto"])
def test_greedy_dflash2_equals_plain(plain: list, random_dflash2_draft: Path, tree_budget: int | str) -> None:
    """--draft DIR with a DFlash 2 draft: /health names it, greedy output is --no-draft's, drafts were verified."""
    with serve(draft=str(random_dflash2_draft), tree_budget=tree_budget) as client:
        health = client.get("/health").json()["drafter"]
        assert health.startswith(f"dflash2 ({random_dflash2_draft})")
        if tree_budget == "auto":
            assert health.endswith(", trees off (the DFlash 2 selector proposes one path: chains only)")
        outs = greedy_outputs(client)
    assert [text for text, _ in outs] == [text for text, _ in plain]
    assert outs[0][1]["speculative"]["verify_steps"] > 0


def test_penalties_fall_back_to_plain_and_say_so(random_draft: Path) -> None:
    with serve(draft=str(random_draft), block_size=4) as client:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
                "presence_penalty": 1.0}
        usage = client.post("/v1/chat/completions", json=body).json()["usage"]["speculative"]
        assert usage["decoder"] == "plain" and "penalt" in usage["fallback_reason"]


def test_oracle_on_the_embedded_model_rejects_at_every_position() -> None:
    """The real 135M target: partial acceptance at each draft index still reproduces plain greedy."""
    from engine.decode.drafters import OracleDrafter
    from engine.decode.plain_decoder import PlainDecoder
    from engine.decode.sampling import SamplingParams, TokenRng
    from engine.decode.speculative import SpeculativeDecoder
    from engine.model.loader import load_model
    from engine.model.target import Target

    loaded = load_model("embedded")
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}])
    greedy = SamplingParams(temperature=0)

    def run(decoder: object, n: int) -> list[int]:
        return [t for step in decoder.generate(prompt, greedy, n, TokenRng(0)) for t in step.tokens]

    plain = run(PlainDecoder(loaded.model), 40)
    block = 8
    wrong_at = [*range(block - 1), None]
    decoder = SpeculativeDecoder(Target(loaded.model), OracleDrafter(plain, vocab_size=loaded.tokenizer.vocab_size,
                                                                     wrong_at=wrong_at), block_size=block, adaptive=False)
    assert run(decoder, 40) == plain
    assert decoder.stats.syncs == decoder.stats.cycles
    counts = decoder.stats.accept_counts  # histogram of accepted drafts per cycle
    assert len(counts) == block and all(c > 0 for c in counts), counts


@pytest.mark.parametrize("block_size,expected", [(None, 6), (4, 4)], ids=["draft's own", "override"])
def test_block_size_defaults_to_the_drafts_own(tmp_path: Path, block_size: int | None, expected: int) -> None:
    from types import SimpleNamespace

    from engine.runtime.serving_model import NGRAM_BLOCK_SIZE, build_speculative
    from tests.tiny_models import build_target, target_config

    target = target_config("llama")
    path = save_tiny_draft(build_draft(draft_config(target, block_size=6)), tmp_path / "draft")
    loaded = SimpleNamespace(model=build_target(target), model_id="tiny")
    decoder, _ = build_speculative(loaded, EngineConfig(model="tiny", draft=str(path), block_size=block_size))
    assert decoder.block_size == expected
    ngram, _ = build_speculative(loaded, EngineConfig(drafter="ngram", draft="none", block_size=block_size))
    assert ngram.block_size == (block_size or NGRAM_BLOCK_SIZE)
