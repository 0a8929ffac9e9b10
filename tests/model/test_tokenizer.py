"""Tokenizer built from the embedded SmolLM2 GGUF, checked against an independent BPE reference."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import regex
from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.model.gguf import read_gguf
from engine.model.loader import embedded_model_path
from engine.model.piece_cache import PieceCache
from engine.model.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "Ünïcödé çàfé naïve — “quotes” … ½",
    "日本語のテキストと中文字符",
    "مرحبا بالعالم",
    "emoji 🤗🚀 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "I'm sure they'll say we've done it, it's John's",
    "<html><body class=\"x\">&amp;</body></html>",
    "a\u0301 combining, zero\u200bwidth",
]


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return read_gguf(embedded_model_path())[1]


@pytest.fixture(scope="module")
def tok(meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(meta)


def reference_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """llama.cpp's "smollm" pre-tokenizer (each digit alone, then GPT-2 regex) + textbook BPE."""
    byte_chars = bytes_to_unicode()
    ids: list[int] = []
    for fragment in regex.split(r"(\p{N})", text):
        for word in regex.findall(GPT2_SPLIT, fragment):
            ids += [vocab[p] for p in _bpe([byte_chars[b] for b in word.encode()], ranks)]
    return ids


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(parts) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("<|endoftext|>") == [0]
    ids = tok.encode("a<|im_start|>user\nhi<|im_end|>")
    assert ids.count(1) == 1 and ids.count(2) == 1


def test_ids_and_properties(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == frozenset({2})  # <|im_end|>: GGUF eos and the template's end of turn
    assert tok.special_token_ids == frozenset(range(17))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos_token is False


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_matches_reference_bpe(tok: Tokenizer, meta: dict[str, Any]) -> None:
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    for text in TEXTS:
        assert tok.encode(text) == reference_encode(text, vocab, ranks), text


def test_digits_are_split_one_by_one(tok: Tokenizer, meta: dict[str, Any]) -> None:
    # The vocabulary has no multi-digit token and no " 1": proof the model was trained on split digits.
    assert not [t for t in meta["tokenizer.ggml.tokens"] if regex.search(r"\d\d|Ġ\d", t)]
    assert [tok.decode([i]) for i in tok.encode(" 2024")] == [" ", "2", "0", "2", "4"]


def test_decode_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi!"


def test_chat_template_system_and_user(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.render_chat(messages) == expected
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(expected)
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_chat_template_default_system_and_no_generation_prompt(tok: Tokenizer) -> None:
    text = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_override_tools_and_kwargs(tok: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}|{{ tools | length }}|{{ flavour }}"
    text = tok.render_chat(
        [{"role": "user", "content": "x"}], chat_template=template, tools=[{"type": "function"}], flavour="salty"
    )
    assert text == "[user]x|1|salty"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages[0].content }}") == tok.encode("x")


def test_no_chat_template_is_a_clear_error(meta: dict[str, Any]) -> None:
    bare = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    assert bare.chat_template is None
    assert bare.eos_token_ids == frozenset({2})
    with pytest.raises(ValueError, match="chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_add_bos_token_metadata(meta: dict[str, Any]) -> None:
    with_bos = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("hi", add_special_tokens=True) == [1, *with_bos.encode("hi")]


def test_unsupported_gguf_tokenizers_are_refused(meta: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="'mystery'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "mystery"})


def test_from_pretrained_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token_ids == frozenset({0, 2})
    assert loaded.chat_template == tok.chat_template
    assert loaded.special_token_ids == tok.special_token_ids


def _random_chat_texts(tok: Tokenizer, count: int, seed: int) -> list[str]:
    """Texts cut from TEXTS, added tokens and near-misses of them, joined at random."""
    rng = random.Random(seed)
    added = sorted(tok.hf.backend_tokenizer.get_added_tokens_decoder().values(), key=lambda t: t.content)
    fragments = [*TEXTS, *(t.content for t in added), "<|im_", "im_end|>", "<|<|im_end|>", "\n", " ", "42", ""]
    return ["".join(rng.choice(fragments) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def test_cached_pieces_encode_exactly_as_the_tokenizer(tok: Tokenizer) -> None:
    assert tok._pieces is not None  # the embedded tokenizer's added tokens split as plain strings
    texts = _random_chat_texts(tok, 300, seed=0)
    for _ in range(2):  # the second pass reads the cached pieces
        for text in texts:
            assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False), repr(text)
    assert tok._pieces.hits > 0


def test_a_growing_chat_encodes_only_its_new_messages(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Tell me about 12 owls."}]
    tok.encode(tok.render_chat(messages))
    messages += [{"role": "assistant", "content": "Owls hunt at night."}, {"role": "user", "content": "And bats?"}]
    misses = tok._pieces.misses
    ids = tok.encode(tok.render_chat(messages))
    assert ids == tok.hf.encode(tok.render_chat(messages), add_special_tokens=False)
    # the system and first user pieces are looked up; the reply, the new question and the header are new
    assert tok._pieces.misses - misses <= 3


def test_piece_cache_keeps_to_its_character_bound(tok: Tokenizer) -> None:
    raw = tok.hf.backend_tokenizer
    cache = PieceCache({"<|im_end|>": 2}, lambda piece: raw.encode(piece, add_special_tokens=False).ids, max_chars=200)  # pieces up to 50 characters are kept
    for text in _random_chat_texts(tok, 200, seed=1):
        assert cache.encode(text) == tok.hf.encode(text, add_special_tokens=False)  # other added tokens: in pieces
        assert cache._chars <= 200
    assert cache.hits > 0


def test_tokenizers_whose_added_tokens_strip_space_are_not_cached(meta: dict[str, Any]) -> None:
    stripping = Tokenizer.from_gguf_metadata(meta)
    stripping.hf.backend_tokenizer.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True)])
    rebuilt = Tokenizer(stripping.hf)
    assert rebuilt._pieces is None
    text = "fill the  <mask> here <|im_end|>"
    assert rebuilt.encode(text) == rebuilt.hf.encode(text, add_special_tokens=False)
    assert rebuilt.decode(rebuilt.encode(text)).count("<mask>") == 1
