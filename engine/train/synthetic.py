"""Synthetic training prompts: templated math word problems and small Python coding tasks.

They fill the domains ShareGPT covers thinly (grade-school arithmetic, function-writing) so the
draft sees the target's answers in those styles. Both are deterministic from a seed and keep
away from the evaluation sets: a draw whose wording comes near an evaluation prompt (number-
blind word trigrams) is dropped, so training never holds a paraphrase of what eval measures.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import Any, NamedTuple

from engine.train.math_prompts import MATH_PROMPTS
from engine.train.math_templates import math_problem

NEAR_DUPLICATE = 0.5  # share of a prompt's word trigrams found in one reference prompt


class CodeTask(NamedTuple):
    name: str
    signature: str  # parameters, annotated
    returns: str
    does: str  # imperative: "to ..." completes it
    fn: Callable[..., Any]  # reference implementation: computes the docstring examples
    args: Callable[[random.Random], tuple]  # random example arguments


def shingles(text: str) -> frozenset[tuple[str, ...]]:
    """Word trigrams of the lower-cased text with every number masked (so new numbers don't hide a copy)."""
    words = re.sub(r"\d+(?:[.,]\d+)*", "#", text.lower())
    tokens = re.findall(r"[a-z_#]+", words)
    return frozenset(zip(tokens, tokens[1:], tokens[2:]))


class NearDuplicateFilter:
    """Says whether a text shares more than `threshold` of its trigrams with any reference text."""

    def __init__(self, references: Iterable[str], threshold: float = NEAR_DUPLICATE) -> None:
        self.references = [s for s in map(shingles, references) if s]
        self.threshold = threshold

    def similarity(self, text: str) -> float:
        mine = shingles(text)
        if not mine:
            return 0.0
        return max((len(mine & ref) / min(len(mine), len(ref)) for ref in self.references), default=0.0)

    def __contains__(self, text: str) -> bool:
        return self.similarity(text) > self.threshold


class Synthetic(NamedTuple):
    id: str
    text: str
    kind: str  # template or task name
    answer: Any  # math: the numeric answer; code: None


def draw_unique(
    make: Callable[[random.Random], tuple[str, str, Any]], n: int, seed: int, avoid: NearDuplicateFilter, prefix: str
) -> list[Synthetic]:
    """n distinct draws of `make(rng) -> (kind, text, answer)`, skipping repeats and near-copies of `avoid`."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(50 * n + 100):  # bounded: a template set too small for n fails loudly below
        if len(out) == n:
            break
        kind, text, answer = make(rng)
        key = " ".join(text.lower().split())
        if key in seen or text in avoid:
            continue
        seen.add(key)
        out.append(Synthetic(f"{prefix}/{kind}/{len(out)}", text, kind, answer))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {prefix} prompts for n={n}; add templates or lower n")
    return out


def synthetic_math(n: int, seed: int = 0) -> list[Synthetic]:
    """n distinct grade-school word problems, never near one of the evaluation MATH_PROMPTS."""
    return draw_unique(math_problem, n, seed, NearDuplicateFilter(MATH_PROMPTS), "synth-math")


def synthetic_code(n: int, seed: int = 0, avoid: Iterable[str] = ()) -> list[Synthetic]:
    """n distinct function-writing tasks, never near a text in `avoid` (pass the HumanEval prompts)."""
    return draw_unique(code_task_prompt, n, seed, NearDuplicateFilter(avoid), "synth-code")


# ---- code tasks ----------------------------------------------------------------------------------
WORDS = ("river", "apple", "sun", "mountain", "cat", "blue", "quiet", "engine", "paper", "moon", "orange", "tree",
         "window", "data", "code", "garden", "light", "stone", "cloud", "music", "table", "fast", "green", "bird")


def ints(r: random.Random, lo: int = -9, hi: int = 20, k: tuple[int, int] = (3, 7)) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(*k))]


def sentence(r: random.Random, k: tuple[int, int] = (3, 6)) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(*k)))


def camel_name(r: random.Random) -> str:
    words = r.sample(WORDS, r.randint(2, 3))
    return words[0] + "".join(w.title() for w in words[1:])


def anagram_args(r: random.Random) -> tuple[str, str]:
    word = r.choice(WORDS)
    return word, r.choice((word[::-1], r.choice(WORDS)))  # half true (reversed), half mostly false


def matrix(r: random.Random) -> list[list[int]]:
    cols = r.randint(2, 3)
    return [ints(r, 0, 9, (cols, cols)) for _ in range(r.randint(2, 3))]


def run_length(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] == text[i]:
            j += 1
        out.append(f"{text[i]}{j - i}")
        i = j
    return "".join(out)


def hms(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


CODE_TASKS: tuple[CodeTask, ...] = (
    CodeTask("chunk_list", "items: list[int], size: int", "list[list[int]]",
             "split `items` into consecutive chunks of `size` elements; the last chunk may be shorter",
             lambda items, size: [items[i:i + size] for i in range(0, len(items), size)],
             lambda r: (ints(r, 0, 9, (4, 8)), r.randint(2, 3))),
    CodeTask("running_total", "values: list[int]", "list[int]", "return the cumulative sums of `values`",
             lambda v: [sum(v[:i + 1]) for i in range(len(v))], lambda r: (ints(r),)),
    CodeTask("word_lengths", "text: str", "dict[str, int]", "map each distinct word of `text` to its length",
             lambda t: {w: len(w) for w in t.split()}, lambda r: (sentence(r),)),
    CodeTask("word_frequencies", "text: str", "dict[str, int]",
             "count how many times each word occurs in `text` (words are separated by spaces)",
             lambda t: {w: t.split().count(w) for w in t.split()}, lambda r: (sentence(r, (4, 7)),)),
    CodeTask("title_words", "text: str", "str", "capitalize the first letter of every word in `text`",
             lambda t: " ".join(w[:1].upper() + w[1:] for w in t.split(" ")), lambda r: (sentence(r),)),
    CodeTask("merge_counts", "a: dict[str, int], b: dict[str, int]", "dict[str, int]",
             "merge two dictionaries of counts, adding the values of keys present in both",
             lambda a, b: {**a, **{k: a.get(k, 0) + v for k, v in b.items()}},
             lambda r: ({w: r.randint(1, 5) for w in r.sample(WORDS[:6], 2)}, {w: r.randint(1, 5) for w in r.sample(WORDS[:6], 2)})),
    CodeTask("invert_mapping", "mapping: dict[str, int]", "dict[int, str]", "swap the keys and values of `mapping`",
             lambda m: {v: k for k, v in m.items()}, lambda r: ({w: i for i, w in enumerate(r.sample(WORDS, 3))},)),
    CodeTask("flatten_once", "nested: list[list[int]]", "list[int]", "flatten a list of lists into a single list",
             lambda n: [x for sub in n for x in sub], lambda r: ([ints(r, 0, 9, (0, 3)) for _ in range(r.randint(2, 4))],)),
    CodeTask("rotate_right", "items: list[int], k: int", "list[int]",
             "rotate `items` to the right by `k` positions (k may exceed the length)",
             lambda items, k: items[-(k % len(items)):] + items[:-(k % len(items))] if items and k % len(items) else list(items),
             lambda r: (ints(r, 0, 9), r.randint(1, 9))),
    CodeTask("step_differences", "values: list[int]", "list[int]",
             "return the difference between each element of `values` and the one before it",
             lambda v: [b - a for a, b in pairwise(v)], lambda r: (ints(r),)),
    CodeTask("clamp_all", "values: list[int], low: int, high: int", "list[int]",
             "limit every number in `values` to the range from `low` to `high`",
             lambda v, lo, hi: [min(max(x, lo), hi) for x in v], lambda r: (ints(r), r.randint(-3, 2), r.randint(5, 12))),
    CodeTask("to_fahrenheit", "celsius: list[float]", "list[float]",
             "convert a list of Celsius temperatures to Fahrenheit, rounded to one decimal",
             lambda c: [round(x * 9 / 5 + 32, 1) for x in c], lambda r: ([r.randint(-10, 40) for _ in range(r.randint(2, 4))],)),
    CodeTask("count_char", "text: str, ch: str", "int", "count how many times the character `ch` appears in `text`",
             lambda t, ch: t.count(ch), lambda r: (sentence(r), r.choice("aeorst"))),
    CodeTask("shortest_word", "text: str", "str", "return the first shortest word in `text`",
             lambda t: min(t.split(), key=len), lambda r: (sentence(r),)),
    CodeTask("acronym", "phrase: str", "str", "build an upper-case acronym from the first letter of each word in `phrase`",
             lambda p: "".join(w[0].upper() for w in p.split()), lambda r: (sentence(r),)),
    CodeTask("snake_to_camel", "name: str", "str", "convert a snake_case identifier to camelCase",
             lambda n: n.split("_")[0] + "".join(w.title() for w in n.split("_")[1:]),
             lambda r: ("_".join(r.sample(WORDS, r.randint(2, 3))),)),
    CodeTask("camel_to_snake", "name: str", "str", "convert a camelCase identifier to snake_case",
             lambda n: re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), n),
             lambda r: (camel_name(r),)),
    CodeTask("mask_card", "number: str", "str", "hide all but the last four digits of a card number behind '*'",
             lambda s: "*" * (len(s) - 4) + s[-4:], lambda r: ("".join(str(r.randint(0, 9)) for _ in range(r.choice((12, 16)))),)),
    CodeTask("index_of_max", "values: list[int]", "int", "return the index of the first occurrence of the largest value",
             lambda v: v.index(max(v)), lambda r: (ints(r),)),
    CodeTask("group_by_length", "words: list[str]", "dict[int, list[str]]",
             "group `words` into a dictionary keyed by word length, keeping their order",
             lambda ws: {n: [w for w in ws if len(w) == n] for n in dict.fromkeys(map(len, ws))},
             lambda r: (r.sample(WORDS, r.randint(3, 6)),)),
    CodeTask("reverse_number", "n: int", "int", "return the non-negative integer `n` with its digits in reverse order",
             lambda n: int(str(n)[::-1]), lambda r: (r.randint(10, 99999),)),
    CodeTask("moving_average", "values: list[float], window: int", "list[float]",
             "return the averages of every run of `window` consecutive values",
             lambda v, w: [sum(v[i:i + w]) / w for i in range(len(v) - w + 1)], lambda r: (ints(r, 0, 10, (4, 6)), 2)),
    CodeTask("squeeze_spaces", "text: str", "str", "collapse every run of whitespace in `text` into one space and trim the ends",
             lambda t: " ".join(t.split()), lambda r: ("  ".join(r.sample(WORDS, 3)) + " ",)),
    CodeTask("run_length_encode", "text: str", "str", "run-length encode `text`, writing each character followed by its run length",
             run_length, lambda r: ("".join(r.choice("ab") * r.randint(1, 3) for _ in range(r.randint(2, 4))),)),
    CodeTask("is_anagram", "first: str, second: str", "bool", "tell whether two words use exactly the same letters the same number of times",
             lambda a, b: sorted(a) == sorted(b), anagram_args),
    CodeTask("pair_up", "keys: list[str], values: list[int]", "dict[str, int]",
             "build a dictionary from two lists of equal length, pairing items by position",
             lambda k, v: dict(zip(k, v)), lambda r: (r.sample(WORDS, 3), ints(r, 0, 9, (3, 3)))),
    CodeTask("percent_change", "old: float, new: float", "float", "return the percentage change from `old` to `new`, rounded to two decimals",
             lambda a, b: round((b - a) / a * 100, 2), lambda r: (r.randint(10, 200), r.randint(10, 200))),
    CodeTask("format_duration", "seconds: int", "str", "format a number of seconds as H:MM:SS",
             hms, lambda r: (r.randint(0, 20000),)),
    CodeTask("is_leap_year", "year: int", "bool", "tell whether `year` is a leap year in the Gregorian calendar",
             lambda y: y % 4 == 0 and (y % 100 != 0 or y % 400 == 0), lambda r: (r.choice((1900, 2000, 2023, 2024, 2100, 1996)),)),
    CodeTask("sum_multiples_below", "limit: int, a: int, b: int", "int",
             "add up all positive numbers below `limit` that are multiples of `a` or of `b`",
             lambda n, a, b: sum(x for x in range(1, n) if x % a == 0 or x % b == 0), lambda r: (r.randint(10, 40), 3, 5)),
    CodeTask("min_and_max", "values: list[int]", "tuple[int, int]", "return the smallest and the largest value as a tuple, in one pass",
             lambda v: (min(v), max(v)), lambda r: (ints(r),)),
    CodeTask("first_words", "text: str, n: int", "str", "keep only the first `n` words of `text`, adding '...' if any were cut",
             lambda t, n: " ".join(t.split()[:n]) + ("..." if len(t.split()) > n else ""), lambda r: (sentence(r), r.randint(2, 4))),
    CodeTask("swap_adjacent", "items: list[int]", "list[int]", "swap every pair of neighbouring elements (a trailing odd one stays)",
             lambda v: [v[i ^ 1] if (i ^ 1) < len(v) else v[i] for i in range(len(v))], lambda r: (ints(r, 0, 9),)),
    CodeTask("keys_at_least", "scores: dict[str, int], minimum: int", "list[str]",
             "return the keys whose value is at least `minimum`, sorted alphabetically",
             lambda d, m: sorted(k for k, v in d.items() if v >= m), lambda r: ({w: r.randint(0, 10) for w in r.sample(WORDS, 4)}, 5)),
    CodeTask("transpose", "matrix: list[list[int]]", "list[list[int]]", "return the transpose of a rectangular matrix",
             lambda m: [list(row) for row in zip(*m)], lambda r: (matrix(r),)),
    CodeTask("alternate_merge", "a: list[int], b: list[int]", "list[int]",
             "merge two lists by taking elements alternately, then append what is left of the longer one",
             lambda a, b: [x for p in zip(a, b) for x in p] + a[len(b):] + b[len(a):], lambda r: (ints(r, 0, 9, (1, 4)), ints(r, 0, 9, (1, 4)))),
)

ASKS = (
    "Write a Python function `{call}` to {does}.",
    "Implement `{call}` in Python. It should {does}.",
    "I need a Python function named `{name}` that can {does}. Its parameters: {signature}.",
    "Create a Python function `{call}` that will {does}.",
    "How would I write a Python function to {does}? Call it `{name}`.",
)
EXTRAS = ("", "", " Include a docstring.", " Add type hints.", " Show an example call.", " Keep it short.",
          " Explain how it works briefly.", " Write a couple of tests too.")
COMPLETE = "Complete the following Python function.\n\n```python\n{code}```"


def docstring_function(task: CodeTask, r: random.Random) -> str:
    """A HumanEval-shaped stub of our own task: signature, docstring, doctest examples from the reference."""
    lines = [f"def {task.name}({task.signature}) -> {task.returns}:", f'    """{task.does[0].upper()}{task.does[1:]}.', ""]
    for _ in range(r.randint(1, 2)):
        args = task.args(r)
        lines += [f"    >>> {task.name}({', '.join(map(repr, args))})", f"    {task.fn(*args)!r}"]
    return "\n".join(lines) + '\n    """\n'


def code_task_prompt(r: random.Random) -> tuple[str, str, None]:
    """(task name, prompt, None): half are HumanEval-shaped stubs, half plain requests."""
    task = r.choice(CODE_TASKS)
    if r.random() < 0.5:
        return task.name, COMPLETE.format(code=docstring_function(task, r)), None
    call = f"{task.name}({task.signature}) -> {task.returns}"
    ask = r.choice(ASKS).format(call=call, name=task.name, does=task.does, signature=task.signature)
    return task.name, ask + r.choice(EXTRAS), None
