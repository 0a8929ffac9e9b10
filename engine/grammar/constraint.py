"""Token-level constraint: which tokens a grammar state allows, and the constrained choice of a token.

`TokenVocab` holds each token's bytes (byte-level BPE pieces mapped back to bytes; special tokens have
none) and a byte trie over them, built once per tokenizer. `Constraint` is one request's: the grammar,
the vocabulary, and the host time spent on it.

The choice at one position, given `scores` whose argmax is the unconstrained token (the raw logits for
greedy, log q + Gumbel noise for position-keyed sampling, engine/decode/sampling.TokenRng):
1. the unconstrained argmax, if the grammar allows it (advance the matcher over its bytes): the common case;
2. else the best allowed among the top 64 scores;
3. else the best allowed token of the whole vocabulary (a trie walk from the state, cached per state).
All three are argmax over the allowed set A of the same scores, so greedy picks the most likely allowed
token, and sampling is exact for the target restricted to A: argmax_{v in A}(log q_v + g_v) with Gumbel
noise g is a sample of q(v | v in A) (Gumbel-max over a subset), and it equals the unconstrained sample
whenever that one lies in A. (The same thing as sample-then-resample: P(v) = q_v + (1 - q(A)) q_v / q(A)
= q_v / q(A) for v in A.)
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from engine.grammar.matcher import STR, Grammar, State, utf8_next
from engine.grammar.schema import compile_schema, tool_call_node
from engine.model.tokenizer import byte_decoder

TOP_K = 64
DONE: State = frozenset({"done"})  # after EOS: nothing more


class DeadEnd(RuntimeError):
    """No token is allowed (cannot happen for a compiled grammar whose every state can be finished)."""


def token_bytes_table(tokenizer: Any) -> list[bytes | None]:
    """Each token id's bytes as it adds them to the text; None for special tokens (never allowed as text)."""
    hf = tokenizer.hf
    n = len(hf)
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    added = {i: t.content for i, t in hf.added_tokens_decoder.items() if not t.special}
    pieces = hf.convert_ids_to_tokens(list(range(n)))
    byte_level = any(p is not None and p.startswith("\u0120") for p in pieces[:5000])
    decoder = byte_decoder()
    table: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            table.append(None)
        elif i in added:
            table.append(added[i].encode())
        elif byte_level and all(ch in decoder for ch in piece):
            table.append(bytes(decoder[ch] for ch in piece))
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            text = piece.replace("\u2581", " ") if not byte_level else tokenizer.decode([i])
            table.append(None if "\ufffd" in text else text.encode())
    return [t if t else None for t in table]


def string_chars(data: bytes) -> int:
    """Characters `data` adds inside a JSON string when it is all plain content (no quote, backslash or control
    character, whole UTF-8 sequences), else -1."""
    pending, chars = 0, 0
    for b in data:
        if pending == 0 and (b == 0x22 or b == 0x5C or b < 0x20):
            return -1
        pending = utf8_next(pending, b)
        if pending < 0:
            return -1
        chars += pending == 0
    return chars if pending == 0 else -1


class TokenVocab:
    """The tokenizer's tokens as bytes, a trie over them, and its EOS ids."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids: frozenset[int]) -> None:
        self.token_bytes = token_bytes
        self.eos_ids = frozenset(eos_ids)
        self.eos_list = sorted(self.eos_ids)
        self.trie: dict[int, Any] = {}  # byte -> child; key -1: the ids ending there
        # inside a JSON string: the characters a token adds when it is all plain string content (-1: it is not)
        plain = np.full(len(token_bytes), -1, dtype=np.int64)
        for i, data in enumerate(token_bytes):
            if data is None or i in self.eos_ids:
                continue
            node = self.trie
            for b in data:
                node = node.setdefault(b, {})
            node.setdefault(-1, []).append(i)
            plain[i] = string_chars(data)
        self.plain_chars = plain
        self.not_plain = np.array([i for i, data in enumerate(token_bytes)
                                   if data is not None and i not in self.eos_ids and plain[i] < 0], dtype=np.int64)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, eos_ids: frozenset[int]) -> TokenVocab:
        """Built once per tokenizer (a few hundred ms for 49k tokens) and kept on it."""
        with _LOCK:
            cached = getattr(tokenizer, "_dflash_token_vocab", None)
            if cached is None or cached.eos_ids != frozenset(eos_ids):
                cached = cls(token_bytes_table(tokenizer), eos_ids)
                try:
                    tokenizer._dflash_token_vocab = cached
                except AttributeError:
                    pass
            return cached


_LOCK = threading.Lock()


@dataclass
class ConstraintStats:
    seconds: float = 0.0  # host time in checks, top-k and masks
    choices: int = 0  # constrained choices made
    fast: int = 0  # the unconstrained token was allowed
    top_k: int = 0  # found among the top-k scores
    full: int = 0  # needed the whole allowed set
    drafts_checked: int = 0
    drafts_cut: int = 0  # draft blocks cut at a disallowed token


class Constraint:
    """One request's grammar over a vocabulary. States are values; the decoder keeps the current one in `state`."""

    MAX_CACHE = 100_000

    def __init__(self, grammar: Grammar, vocab: TokenVocab) -> None:
        self.grammar = grammar
        self.vocab = vocab
        self.start: State = grammar.start
        self.state: State = grammar.start
        self.stats = ConstraintStats()
        # shared by the requests with this grammar and vocabulary
        shared = grammar.__dict__.setdefault("_token_caches", {}).setdefault(id(vocab), ({}, {}))
        self._next: dict[tuple[State, int], State | None] = shared[0]
        self._allowed: dict[State, np.ndarray] = shared[1]

    # --- matcher over tokens -------------------------------------------------------------
    def next_state(self, state: State, token: int) -> State | None:
        """The state after `token`, or None when the grammar does not allow it here."""
        key = (state, token)
        if key in self._next:
            return self._next[key]
        if state is DONE or state == DONE:
            nxt = None
        elif token in self.vocab.eos_ids:
            nxt = DONE if self.grammar.accepts(state) else None
        else:
            data = self.vocab.token_bytes[token] if 0 <= token < len(self.vocab.token_bytes) else None
            nxt = None if data is None else self.grammar.advance(state, data)
        if len(self._next) >= self.MAX_CACHE:
            self._next.clear()
        self._next[key] = nxt
        return nxt

    def replay(self, tokens: list[int], state: State | None = None) -> State | None:
        state = self.start if state is None else state
        for token in tokens:
            state = self.next_state(state, token)
            if state is None:
                return None
        return state

    @staticmethod
    def finished(state: State) -> bool:
        return state == DONE

    def check_drafts(self, state: State, drafts: list[int]) -> list[State]:
        """States after each allowed draft prefix: [state, after d0, after d0 d1, ...], cut at the first
        draft the grammar does not allow."""
        start = time.perf_counter()
        states = [state]
        for token in drafts:
            nxt = self.next_state(states[-1], token)
            if nxt is None:
                self.stats.drafts_cut += 1
                break
            states.append(nxt)
        self.stats.drafts_checked += 1
        self.stats.seconds += time.perf_counter() - start
        return states

    def mask_drafts(self, state: State, best: list[int], candidates: Callable[[int], tuple[list[int], list[float]]],
                    max_replaced: int = 2) -> tuple[list[int], list[State]]:
        """A draft block under the grammar: row i proposes its top token `best[i]` when the grammar allows it,
        else (for at most `max_replaced` rows) its best allowed one among `candidates(i)` (ids, scores: ties
        to the lower id, as argmax); the block is cut at the first row with none. Returns the drafts and
        the states [state, after d0, after d0 d1, ...]."""
        start = time.perf_counter()
        drafts, states, replaced = [], [state], 0
        for i, token in enumerate(best):
            nxt = self.next_state(states[-1], token)
            if nxt is None and replaced < max_replaced:
                replaced += 1
                ids, values = candidates(i)
                for value, token in sorted(zip(values, ids), key=lambda x: (-x[0], x[1])):
                    nxt = self.next_state(states[-1], token) if value != float("-inf") else None
                    if nxt is not None:
                        break
            if nxt is None:
                self.stats.drafts_cut += 1
                break
            drafts.append(token)
            states.append(nxt)
        self.stats.drafts_checked += 1
        self.stats.seconds += time.perf_counter() - start
        return drafts, states

    def allowed_ids(self, state: State) -> np.ndarray:
        """Every token id the grammar allows in `state` (sorted): a trie walk, cached per state."""
        ids = self._allowed.get(state)
        if ids is not None:
            return ids
        found: list[int] = []
        inside = self._inside_string(state)
        if inside is not None:  # most of the vocabulary: by the table, the rest through the matcher
            found = np.nonzero((self.vocab.plain_chars >= 0) & (self.vocab.plain_chars <= inside))[0].tolist()
            found += [int(t) for t in self.vocab.not_plain if self.next_state(state, int(t)) is not None]
        elif state != DONE:
            if self.grammar.accepts(state):
                found += self.vocab.eos_list
            step = self.grammar.step
            todo = [(self.vocab.trie, state)]
            while todo:
                node, s = todo.pop()
                for b, child in node.items():
                    if b < 0:
                        continue
                    nxt = step(s, b)
                    if nxt:
                        found += child.get(-1, ())
                        if len(child) > (1 if -1 in child else 0):
                            todo.append((child, nxt))
        ids = np.array(sorted(found), dtype=np.int64)
        if len(self._allowed) >= 256:
            self._allowed.clear()
        self._allowed[state] = ids
        return ids

    @staticmethod
    def _inside_string(state: State) -> float | None:
        """Characters a string may still take, when the state is one reading inside a string's plain content."""
        if len(state) != 1 or state == DONE:
            return None
        frame = next(iter(state))[0]
        if frame[0] != STR or frame[2] != 1 or frame[4] or frame[5]:
            return None
        node = frame[1]
        return float("inf") if node.max_length is None else node.max_length - frame[3]

    # --- the constrained choice ------------------------------------------------------------
    def choose(self, state: State, top: int, scores: mx.array,
               fallback: Callable[[], mx.array] | None = None) -> tuple[int, State]:
        """The best allowed token by `scores` (V,) whose argmax is `top`, and the state after it.

        `fallback`: scores to use when every allowed token scores -inf (top-p / top-k / min-p cut them all:
        then the temperature-only distribution restricted to the allowed set is sampled).
        """
        start = time.perf_counter()
        try:
            self.stats.choices += 1
            nxt = self.next_state(state, top)
            if nxt is not None:
                self.stats.fast += 1
                return top, nxt
            token = self._best_allowed(state, scores)
            if token is None and fallback is not None:
                token = self._best_allowed(state, fallback())
            if token is None:
                raise DeadEnd("the grammar allows no token here")
            nxt = self.next_state(state, token)
            assert nxt is not None
            return token, nxt
        finally:
            self.stats.seconds += time.perf_counter() - start

    def _best_allowed(self, state: State, scores: mx.array) -> int | None:
        vocab = scores.shape[-1]
        k = min(TOP_K, vocab)
        top_ids = mx.argpartition(-scores.astype(mx.float32), kth=k - 1)[:k]
        top_vals = scores[top_ids].astype(mx.float32)
        ranked = sorted(zip(top_vals.tolist(), top_ids.tolist()), key=lambda x: (-x[0], x[1]))
        for value, token in ranked:
            if value == float("-inf"):
                break
            if self.next_state(state, token) is not None:
                self.stats.top_k += 1
                return token
        self.stats.full += 1
        ids = self.allowed_ids(state)
        ids = ids[ids < vocab]
        if ids.size == 0:
            return None
        allowed = mx.array(ids.astype(np.int32))
        values = scores[allowed].astype(mx.float32)
        best = int(mx.argmax(values).item())  # the first of equal maxima: the lowest id, as argmax
        if values[best].item() == float("-inf"):
            return None
        return int(ids[best])

    # --- reporting -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {"seconds": s.seconds, "choices": s.choices, "fast": s.fast, "top_k": s.top_k, "full": s.full,
                "drafts_checked": s.drafts_checked, "drafts_cut": s.drafts_cut}


# --- grammar specs: what SamplingParams.grammar carries ------------------------------------------

def json_schema_spec(schema: Any) -> str:
    return json.dumps({"kind": "json_schema", "schema": schema}, ensure_ascii=False)  # key order is property order


def json_object_spec() -> str:
    return json_schema_spec({"type": "object"})


def tool_call_spec(tools: list[tuple[str, Any]], prefix: str = "<tool_call>\n", suffix: str = "\n</tool_call>") -> str:
    return json.dumps({"kind": "tool_call", "tools": [[n, p] for n, p in tools], "prefix": prefix, "suffix": suffix},
                      sort_keys=True, ensure_ascii=False)


_GRAMMARS: OrderedDict[str, Grammar] = OrderedDict()
MAX_GRAMMARS = 32


def compile_spec(spec: str) -> Grammar:
    """The grammar of a spec string (cached); raises SchemaError for what cannot be compiled."""
    with _LOCK:
        grammar = _GRAMMARS.get(spec)
        if grammar is not None:
            _GRAMMARS.move_to_end(spec)
            return grammar
    data = json.loads(spec)
    if data["kind"] == "json_schema":
        root = compile_schema(data["schema"])
    elif data["kind"] == "tool_call":
        root = tool_call_node([(n, p) for n, p in data["tools"]], data["prefix"], data["suffix"])
    else:
        raise ValueError(f"unknown grammar kind {data['kind']!r}")
    grammar = Grammar(root, spec)
    with _LOCK:
        _GRAMMARS[spec] = grammar
        while len(_GRAMMARS) > MAX_GRAMMARS:
            _GRAMMARS.popitem(last=False)
    return grammar


def make_constraint(spec: str, tokenizer: Any, eos_ids: frozenset[int]) -> Constraint:
    return Constraint(compile_spec(spec), TokenVocab.for_tokenizer(tokenizer, eos_ids))
