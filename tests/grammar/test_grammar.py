"""Structured outputs, engine side: the schema compiler, the byte matcher, token masks, and constrained decoding
(plain and speculative) on a tiny random target over the real SmolLM2 vocabulary."""

from __future__ import annotations

import json
import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from engine.decode.decoder import DecodeStep
from engine.decode.drafters import OracleDrafter, Proposal
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.sampling import SamplingParams, TokenRng, position_gumbel
from engine.decode.speculative import SpeculativeDecoder
from engine.grammar.constraint import (
    Constraint,
    TokenVocab,
    compile_spec,
    json_object_spec,
    json_schema_spec,
    make_constraint,
    tool_call_spec,
)
from engine.grammar.schema import SchemaError
from engine.model.target import Target
from engine.model.tokenizer import Tokenizer
from tests.conftest import tiny_llama

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "minItems": 1, "maxItems": 2},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]},
        "score": {"type": ["number", "null"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"],
                      "additionalProperties": False}},
}
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
    "required": ["v", "kids"], "additionalProperties": False}}}

MATCHES = [
    (PERSON, '{"name":"Bo","age":31}', True),
    (PERSON, '{"name": "Bo", "age": -2, "tags": ["a", 3], "pet": {"kind": "cat"}, "score": 1.5e3}', True),
    (PERSON, json.dumps({"name": "Bo", "age": 1, "pet": None, "score": None}, indent=2), True),
    (PERSON, '{"age":31,"name":"Bo"}', False),  # properties in schema order
    (PERSON, '{"name":"Bo"}', False),  # age is required
    (PERSON, '{"name":"Bo","age":31,"x":1}', False),  # additionalProperties false
    (PERSON, '{"name":"Bo","age":3.5}', False),  # integer
    (PERSON, '{"name":"Bo","age":01}', False),  # no leading zeros
    (PERSON, '{"name":"Bo","age":1,"tags":[]}', False),  # minItems
    (PERSON, '{"name":"Bo","age":1,"tags":["a","b","a"]}', False),  # maxItems
    (PERSON, '{"name":"Bo","age":1,"tags":["c"]}', False),  # enum
    (PERSON, '{"name":"Bobbybobbyb","age":1}', False),  # maxLength 10
    (PERSON, '{"name":"\\u00e9\\n\u00e9","age":1}', True),  # escapes and UTF-8 count as characters
    (PERSON, '{"name":"Bo","age":1,}', False),  # no trailing comma
    (PERSON, '{"name":"Bo","age":1} ', False),  # nothing after the value
    (TREE, '{"v":1,"kids":[{"v":2,"kids":[]}]}', True),
    (TREE, '{"v":1,"kids":[{"v":2}]}', False),
    ({"type": "object"}, '{"a":[1,{"b":null,"c":"d"}],"e":true}', True),
    ({"type": "object"}, '[1]', False),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, '{"a":1,"zz":[]}', True),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, '{"a":1,"a":2}', False),
    ({"enum": [1, 12, "x"]}, "12", True),
    ({"enum": [1, 12, "x"]}, "123", False),
]


@pytest.mark.parametrize("schema,text,ok", MATCHES)
def test_the_matcher_reads_what_the_schema_allows(schema: dict, text: str, ok: bool) -> None:
    assert compile_spec(json_schema_spec(schema)).matches(text) is ok


def test_tool_call_grammar() -> None:
    tools = [("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                              "additionalProperties": False}), ("noop", None)]
    grammar = compile_spec(tool_call_spec(tools))
    assert grammar.matches('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert grammar.matches('<tool_call>\n{"name":"noop","arguments":{"x":[1]}}\n</tool_call>')
    assert not grammar.matches('<tool_call>\n{"name":"get_weather","arguments":{"town":"P"}}\n</tool_call>')
    assert not grammar.matches('<tool_call>\n{"name":"other","arguments":{}}\n</tool_call>')


@pytest.mark.parametrize("schema,words", [
    ({"type": "string", "pattern": "^a+$"}, ["'pattern'", "/"]),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, ["'minimum'", "/properties/n"]),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, ["'oneOf'"]),
    ({"$ref": "#/$defs/missing"}, ["$ref", "#/$defs/missing"]),
    ({"$ref": "http://example.com/schema"}, ["only local references"]),
    ({"type": "strung"}, ["type", "strung"]),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False}, ["'b'"]),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, ["uniqueItems"]),
    ({"type": "string", "maxItems": 3}, ["'maxItems'", "string"]),
])
def test_a_schema_it_cannot_enforce_is_refused_naming_the_part(schema: dict, words: list[str]) -> None:
    with pytest.raises(SchemaError) as e:
        compile_spec(json_schema_spec(schema))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.fixture(scope="module")
def vocab(gguf_tokenizer: Tokenizer) -> TokenVocab:
    return TokenVocab.for_tokenizer(gguf_tokenizer, gguf_tokenizer.eos_token_ids)


def test_token_bytes_round_trip(gguf_tokenizer: Tokenizer, vocab: TokenVocab) -> None:
    text = '{"naïve": "日本", "n": [1, 2.5e-3]}\n'
    ids = gguf_tokenizer.encode(text)
    assert b"".join(vocab.token_bytes[i] for i in ids) == text.encode()
    assert all(vocab.token_bytes[i] is None for i in gguf_tokenizer.special_token_ids)


@pytest.mark.parametrize("prefix", ['', '{"name": "B', '{"name":"Bo","age":3', '{"name":"Bo","age":1,"tags":[',
                                    '{"name":"Bo","age":1}'])
def test_allowed_ids_are_exactly_the_tokens_the_matcher_takes(gguf_tokenizer: Tokenizer, vocab: TokenVocab,
                                                              prefix: str) -> None:
    constraint = Constraint(compile_spec(json_schema_spec(PERSON)), vocab)
    state = constraint.grammar.advance(constraint.start, prefix.encode())
    brute = [t for t in range(len(vocab.token_bytes)) if constraint.next_state(state, t) is not None]
    assert constraint.allowed_ids(state).tolist() == brute and brute
    if prefix.endswith("}"):
        assert brute == sorted(vocab.eos_ids)  # a finished value leaves only EOS


def test_the_choice_is_the_best_allowed_token_by_each_path(gguf_tokenizer: Tokenizer, vocab: TokenVocab) -> None:
    constraint = Constraint(compile_spec(json_schema_spec(PERSON)), vocab)
    state = constraint.grammar.advance(constraint.start, b'{"name":"Bo","age":')
    allowed = constraint.allowed_ids(state)
    rng = np.random.default_rng(0)
    for trial in range(6):
        scores = rng.standard_normal(len(vocab.token_bytes)).astype(np.float32)
        if trial % 2:  # the allowed tokens far down: the whole-vocabulary path
            scores[allowed] -= 50
        best = int(allowed[np.argmax(scores[allowed])])
        token, nxt = constraint.choose(state, int(np.argmax(scores)), mx.array(scores))
        assert token == best and nxt == constraint.next_state(state, best)
    assert constraint.stats.full >= 3


def test_constrained_sampling_follows_the_masked_distribution(vocab: TokenVocab) -> None:
    """argmax over the allowed set of log q + Gumbel noise samples q restricted to that set."""
    constraint = Constraint(compile_spec(json_schema_spec({"enum": ["1", "2", "3"]})), vocab)
    state = constraint.grammar.advance(constraint.start, b'"')
    digits = {d: vocab.token_bytes.index(d.encode()) for d in "0123456789"}
    logq = np.full(len(vocab.token_bytes), -30.0, dtype=np.float32)
    probs = {"0": 0.4, "1": 0.3, "2": 0.2, "3": 0.1}  # "0" is likely and not allowed
    for d, p in probs.items():
        logq[digits[d]] = math.log(p)
    logq_mx = mx.array(logq)
    draws = 1500
    noise = position_gumbel(1234, 0, draws, logq.size)
    counts = Counter()
    for i in range(draws):
        scores = logq_mx + noise[i]
        token, _ = constraint.choose(state, int(mx.argmax(scores).item()), scores)
        counts[token] += 1
    allowed_mass = 0.6
    for d in "123":
        expected = probs[d] / allowed_mass
        assert abs(counts[digits[d]] / draws - expected) < 0.05, (d, counts)
    assert sum(counts.values()) == draws and digits["0"] not in counts


class AllowedDecoyDrafter(OracleDrafter):
    """The oracle's continuation, with the draft at `wrong_at` replaced by `decoys[position]`: a different token
    the grammar allows there when there is one (the verify rejects it), else one it refuses (the block is cut)."""

    def __init__(self, continuation: list[int], decoys: dict[int, int], **kw: object) -> None:
        super().__init__(continuation, **kw)
        self.decoys = decoys

    def propose(self, new_tokens, taps, num_tokens, params, rng, *, keep=None) -> Proposal:  # noqa: ANN001
        tokens, ranks = self._next(new_tokens, num_tokens)
        start = self._num_output
        out = [t if r == 0 else self.decoys.get(start + i, (t + 1) % self.vocab_size)
               for i, (t, r) in enumerate(zip(tokens, ranks))]
        return Proposal(mx.array(out, dtype=mx.int32), None)


@pytest.fixture(scope="module")
def tiny_target(gguf_tokenizer: Tokenizer):  # noqa: ANN201
    return tiny_llama(gguf_tokenizer.vocab_size, seed=5)


def run(decoder: object, prompt: list[int], params: SamplingParams, n: int, constraint: Constraint,
        check_replay: bool = True) -> tuple[list[int], list[DecodeStep]]:
    tokens: list[int] = []
    steps = []
    for step in decoder.generate(prompt, params, n, TokenRng(params.seed, by_position=True), constraint=constraint):
        tokens += step.tokens
        steps.append(step)
        if check_replay:  # the state after every step, partly rejected blocks included, is the replay's
            assert constraint.state == constraint.replay(tokens)
    return tokens, steps


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculative_under_a_grammar_equals_plain_and_its_state_equals_the_replay(
        gguf_tokenizer: Tokenizer, tiny_target: object, temperature: float) -> None:
    spec = json_schema_spec(PERSON)
    prompt = gguf_tokenizer.encode("Describe a person as JSON:")
    params = SamplingParams(temperature=temperature, seed=11, grammar=spec)
    plain, _ = run(PlainDecoder(tiny_target), prompt, params, 48,
                   make_constraint(spec, gguf_tokenizer, gguf_tokenizer.eos_token_ids))
    constraint = make_constraint(spec, gguf_tokenizer, gguf_tokenizer.eos_token_ids)
    states = [constraint.start]
    for token in plain:
        states.append(constraint.next_state(states[-1], token))
    decoys = {}
    for i, token in enumerate(plain):
        others = [int(t) for t in constraint.allowed_ids(states[i]) if t != token and t not in constraint.vocab.eos_ids]
        if others:
            decoys[i] = others[0]
    assert decoys, "no position with a second allowed token"
    block = 6
    drafter = AllowedDecoyDrafter(plain, decoys, vocab_size=gguf_tokenizer.vocab_size,
                                  wrong_at=[*range(block - 1), None])
    decoder = SpeculativeDecoder(Target(tiny_target), drafter, block_size=block, adaptive=False)
    tokens, steps = run(decoder, prompt, params, 48, constraint)
    assert tokens == plain
    partly = [s for s in steps if 0 < s.accepted < s.drafted]
    assert partly, "no partly rejected block"
    assert constraint.stats.drafts_cut > 0  # and some blocks were cut before the verify
    if plain[-1] in gguf_tokenizer.eos_token_ids:
        assert compile_spec(spec).matches(gguf_tokenizer.decode(plain[:-1]))


def test_json_mode_on_a_random_model_stays_json(gguf_tokenizer: Tokenizer, tiny_target: object) -> None:
    spec = json_object_spec()
    prompt = gguf_tokenizer.encode("Hello")
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, grammar=spec)
        constraint = make_constraint(spec, gguf_tokenizer, gguf_tokenizer.eos_token_ids)
        tokens, _ = run(PlainDecoder(tiny_target), prompt, params, 40, constraint, check_replay=False)
        text = gguf_tokenizer.decode([t for t in tokens if t not in gguf_tokenizer.eos_token_ids])
        state = constraint.grammar.advance(constraint.start, text.encode())
        assert state is not None  # a prefix of a JSON object (or the whole of one, then EOS)
        if tokens[-1] in gguf_tokenizer.eos_token_ids:
            assert isinstance(json.loads(text), dict)
