"""`python -m engine.train all`: one command takes a target from prompts to an evaluated draft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.model.tokenizer import Tokenizer
from engine.train.__main__ import all_phases, build_parser, main
from engine.train.prompts import Prompt, write_prompts
from tests.model.test_loader import save_tiny_dir


def test_the_budget_is_split_between_the_phases(tmp_path: Path) -> None:
    args = build_parser().parse_args(["all", "--out", str(tmp_path), "--time-budget", "1000", "--shares", "2,2,1"])
    phases = all_phases(args)
    assert [p[0] for p in phases] == ["prompts", "generate", "fit", "eval"]  # no prompts yet: built first
    limits = [float(p[p.index("--time-limit") + 1]) for p in phases[1:]]
    assert limits == [400, 400, 200]
    write_prompts(tmp_path / "prompts", "train", [Prompt("a", "hi")])
    assert [p[0] for p in all_phases(args)] == ["generate", "fit", "eval"]  # a second run resumes
    unlimited = all_phases(build_parser().parse_args(["all", "--out", str(tmp_path)]))
    assert not any("--time-limit" in p for p in unlimited)
    with pytest.raises(SystemExit):
        all_phases(build_parser().parse_args(["all", "--out", str(tmp_path), "--shares", "1,1"]))


def test_one_command_trains_and_evaluates_a_draft(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    save_tiny_dir(tmp_path / "tiny", gguf_tokenizer)
    out = tmp_path / "run"
    texts = [f"Tell me about the number {i}." for i in range(24)]
    write_prompts(out / "prompts", "train", [Prompt(f"t{i}", t) for i, t in enumerate(texts)])
    for split in ("chat", "code", "math"):
        write_prompts(out / "prompts", split, [Prompt(f"{split}{i}", f"A {split} question {i}?") for i in range(2)])
    code = main(["all", "--out", str(out), "--model", str(tmp_path / "tiny"), "--max-new-tokens", "12",
                 "--batch-size", "8", "--steps", "4", "--layers", "1", "--batch-tokens", "256", "--eval-limit", "1",
                 "--eval-max-tokens", "16"])
    assert code == 0
    assert json.loads((out / "data" / "manifest.json").read_text())["totals"]["sequences"] == 24
    assert (out / "draft" / "config.json").exists() and (out / "checkpoint" / "state.json").exists()
    results = json.loads((out / "eval.json").read_text())["domains"]
    assert set(results) == {"chat", "code", "math"} and all(r["prompts"] == 1 for r in results.values())
