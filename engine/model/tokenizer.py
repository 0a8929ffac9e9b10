"""Tokenizer: one wrapper over a Hugging Face fast tokenizer, built from a GGUF or a directory."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.model.piece_cache import PieceCache

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Tokens that end an assistant turn; counted as EOS only when the chat template writes them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp's llama-vocab.cpp groups).
_GPT2_PRES = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"})
_DIGITS_PRES = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_SPLIT_PRES = {
    "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

log = logging.getLogger(__name__)


class Tokenizer:
    """Text <-> token ids, chat templates, and the ids that end generation.

    `hf` is the raw `PreTrainedTokenizerFast`; everything here is a thin layer over it.
    """

    def __init__(self, hf: PreTrainedTokenizerFast, *, extra_eos_ids: list[int] | tuple[int, ...] = ()) -> None:
        self.hf = hf
        eos = {i for i in extra_eos_ids if i is not None}
        if hf.eos_token_id is not None:
            eos.add(hf.eos_token_id)
        eos |= _template_end_of_turn_ids(hf)
        self._eos_token_ids = frozenset(eos)
        self._pieces = _piece_cache(hf)

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (python values, as `engine.model.gguf.read_gguf` returns them).

        Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported.
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE 'gpt2'); "
                "load the model's Hugging Face directory instead."
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        raw = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
        _add_gguf_special_tokens(raw, tokens, meta.get("tokenizer.ggml.token_type") or [])

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos = token("bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            bos_id = meta["tokenizer.ggml.bos_token_id"]
            raw.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, bos_id)]
            )
        hf = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token=bos,
            eos_token=token("eos_token_id"),
            unk_token=token("unknown_token_id"),
            pad_token=token("padding_token_id"),
            clean_up_tokenization_spaces=False,  # byte-level text round-trips exactly; no " ." fix-ups
        )
        hf.chat_template = meta.get("tokenizer.chat_template")
        extra = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(hf, extra_eos_ids=[i for i in extra if i is not None])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load HF tokenizer files from a local directory (never downloads)."""
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not isinstance(hf, PreTrainedTokenizerFast):
            raise ValueError(f"{path}: no fast tokenizer (tokenizer.json) found; got {type(hf).__name__}.")
        return cls(hf, extra_eos_ids=_generation_eos_ids(Path(path)))

    # ---- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self._pieces is not None and not add_special_tokens:
            return self._pieces.encode(text)
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text exactly as the (HF jinja) chat template renders it."""
        if chat_template is None and not self.chat_template:
            raise ValueError("This model has no chat template; pass chat_template=... or use /v1/completions.")
        return self.hf.apply_chat_template(
            messages,
            tools=tools,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        # The template writes any BOS itself, so encoding must not add another.
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tools=tools,
            **template_kwargs,
        )
        return self.encode(text, add_special_tokens=False)

    # ---- properties ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocab + added tokens)."""
        return len(self.hf)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.hf.added_tokens_decoder.items() if t.special)

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        return template if isinstance(template, str) else None


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> RawTokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]  # byte-level tokens never contain a space
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    raw.pre_tokenizer = _pre_tokenizer(pre)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    return raw


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre is None or pre in _GPT2_PRES:
        return byte_level
    if pre in _DIGITS_PRES:
        # StarCoder family: every digit is its own token, then the GPT-2 split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PRES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    known = sorted(_GPT2_PRES | _DIGITS_PRES | set(_SPLIT_PRES))
    raise ValueError(
        f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(known)}); "
        "load the model's Hugging Face directory instead."
    )


def _add_gguf_special_tokens(raw: RawTokenizer, tokens: list[str], token_types: list[int]) -> None:
    # Registering them keeps `<|im_start|>` whole instead of BPE-splitting its characters.
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
    raw.add_special_tokens(control)
    raw.add_tokens(user)


def _piece_cache(hf: PreTrainedTokenizerFast) -> PieceCache | None:
    """A PieceCache where added tokens split text as plain strings and a probe encodes alike, else None."""
    raw = hf.backend_tokenizer
    added = raw.get_added_tokens_decoder()
    if any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values()):
        return None
    cache = PieceCache({t.content: i for i, t in added.items()},
                       lambda piece: raw.encode(piece, add_special_tokens=False).ids)
    probe = "".join(f"x{t.content} 1 y\n" for t in added.values()) + " Hello, world  42!\n\n"
    if cache.encode(probe) != hf.encode(probe, add_special_tokens=False):
        log.warning("token ids of chat messages are not cached: this tokenizer splits added tokens its own way")
        return None
    return cache


def _template_end_of_turn_ids(hf: PreTrainedTokenizerFast) -> set[int]:
    template = hf.chat_template if isinstance(hf.chat_template, str) else ""
    vocab = hf.get_vocab()
    return {vocab[t] for t in _END_OF_TURN if t in template and t in vocab}


def _generation_eos_ids(path: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((path / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, back to the bytes (byte-level BPE pieces)."""
    visible = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = list(visible), 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(visible, chars)}
