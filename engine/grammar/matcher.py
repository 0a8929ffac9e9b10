"""A byte-level pushdown matcher for the grammar nodes of engine/grammar/schema.py.

A state is a frozenset of stacks (the matcher is nondeterministic where anyOf, whitespace or a number's end
leave more than one reading open). A stack is a linked list of immutable frames, `(frame, rest)`, ending in
the END frame, so a state is a plain value: it hashes, compares by value and costs nothing to keep. The
speculative decoder keeps one per draft position and rolls back by picking one; replaying the same tokens
from the start gives an equal state (tests/grammar/test_matcher.py).

Whitespace policy, what json.dumps writes compact or pretty-printed: after `{`, `[` and `,` nothing, one space,
or a newline and up to 24 spaces; after `:` nothing or one space; before `}` and `]` the same as after `{`;
nowhere else (not before `:` or `,`), and nothing after the top-level value, so a finished value leaves only EOS. Numbers have at most 15
integer digits, 15 fraction digits and 2 exponent digits. Both keep a model from writing forever inside a
value the schema cannot bound.
"""

from __future__ import annotations

from typing import Any

from engine.grammar.schema import (
    AnyOfNode,
    ArrayNode,
    LiteralNode,
    LiteralText,
    Node,
    NumberNode,
    ObjectNode,
    RefNode,
    SequenceNode,
    StringNode,
)

WS, OBJ, KEY, ARR, STR, NUM, LIT, TEXT, SEQ, END = range(10)
MAX_INDENT = 24
MAX_INT_DIGITS, MAX_FRAC_DIGITS, MAX_EXP_DIGITS = 15, 15, 2
NUM_DONE = frozenset({2, 3, 5, 8})  # number phases where the number may end
QUOTE, BACKSLASH, COLON, COMMA = 0x22, 0x5C, 0x3A, 0x2C
LBRACE, RBRACE, LBRACKET, RBRACKET, SPACE, NEWLINE = 0x7B, 0x7D, 0x5B, 0x5D, 0x20, 0x0A
DIGITS = frozenset(range(0x30, 0x3A))
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
END_STACK = ((END,), None)

State = frozenset  # of stacks


def utf8_next(pending: int, b: int) -> int:
    """Continuation bytes still due after byte b, or -1 when b cannot come here."""
    if pending:
        return pending - 1 if 0x80 <= b <= 0xBF else -1
    if b < 0x80:
        return 0
    if 0xC2 <= b <= 0xDF:
        return 1
    if 0xE0 <= b <= 0xEF:
        return 2
    if 0xF0 <= b <= 0xF4:
        return 3
    return -1


class ObjectPlan:
    """Per object node: which declared keys may come next at each index, and whether it may close."""

    __slots__ = ("next_required", "candidates", "prefixes", "extras", "key_prefixes")

    def __init__(self, node: ObjectNode) -> None:
        n = len(node.props)
        self.next_required = [n] * (n + 1)
        for i in range(n - 1, -1, -1):
            self.next_required[i] = i if node.props[i][2] else self.next_required[i + 1]
        self.candidates: list[dict[bytes, int]] = []
        self.prefixes: list[frozenset[bytes]] = []
        self.extras: list[bool] = []
        # every declared key's prefixes: an extra key is read as bytes while it could still be one of them
        self.key_prefixes = frozenset(key[:k] for key in node.keys for k in range(len(key) + 1))
        for i in range(n + 1):
            last = min(self.next_required[i], n - 1)
            cands = {node.props[j][0]: j for j in range(i, last + 1)}
            self.candidates.append(cands)
            self.prefixes.append(frozenset(key[:k] for key in cands for k in range(len(key) + 1)))
            self.extras.append(node.additional is not None and self.next_required[i] == n)


_PLANS: dict[int, tuple[ObjectNode, ObjectPlan]] = {}


def plan(node: ObjectNode) -> ObjectPlan:
    entry = _PLANS.get(id(node))
    if entry is None or entry[0] is not node:
        entry = (node, ObjectPlan(node))
        _PLANS[id(node)] = entry
    return entry[1]


def push(node: Node, rest: Any) -> list[Any]:
    """Stacks that start reading a value of `node` on top of `rest`."""
    while isinstance(node, RefNode):
        node = node.target
    if isinstance(node, AnyOfNode):
        return [s for option in node.options for s in push(option, rest)]
    if isinstance(node, ObjectNode):
        return [((OBJ, node, 0, 0, None), rest)]
    if isinstance(node, ArrayNode):
        return [((ARR, node, 0, 0), rest)]
    if isinstance(node, StringNode):
        return [((STR, node, 0, 0, 0, 0), rest)]
    if isinstance(node, NumberNode):
        return [((NUM, node, 0, 0), rest)]
    if isinstance(node, LiteralNode):
        return [((LIT, node, b""), rest)]
    if isinstance(node, LiteralText):
        return [((TEXT, node, 0), rest)] if node.text else [rest]
    if isinstance(node, SequenceNode):
        if len(node.parts) == 1:
            return push(node.parts[0], rest)
        return push(node.parts[0], ((SEQ, node, 1), rest))
    raise TypeError(f"not a grammar node: {node!r}")


WS_OPEN, WS_COLON, WS_CLOSE = 0, 1, 2  # after { [ , (and at the start); after :; after a value, before } ]


def ws(rest: Any, mode: int = WS_OPEN) -> Any:
    return ((WS, 0, mode), rest)


def step(stack: Any, b: int) -> list[Any]:
    """The stacks after reading byte b (none: b cannot come here)."""
    frame, rest = stack
    kind = frame[0]
    if kind == WS:
        _, n, mode = frame
        # whitespace after a value only before a closing bracket, and only where one may come
        out = step(rest, b) if n == 0 or mode != WS_CLOSE or b in (RBRACE, RBRACKET) else []
        if mode == WS_CLOSE and b in (SPACE, NEWLINE) and not (step(rest, RBRACE) or step(rest, RBRACKET)):
            return out
        if b == SPACE:
            if n == 0:
                out.append(((WS, 1, mode), rest))
            elif n >= 2 and n - 2 < MAX_INDENT:
                out.append(((WS, n + 1, mode), rest))
        elif b == NEWLINE and n == 0 and mode != WS_COLON:
            out.append(((WS, 2, mode), rest))
        return out
    if kind == STR:
        return _string(frame, rest, b)
    if kind == NUM:
        return _number(frame, rest, b)
    if kind == LIT:
        node, prefix = frame[1], frame[2]
        grown = prefix + bytes((b,))
        out = [((LIT, node, grown), rest)] if grown in node.prefixes else []
        if prefix in node.literals and prefix:
            out += step(rest, b)
        return out
    if kind == OBJ:
        return _object(frame, rest, b)
    if kind == KEY:
        return _key(frame, rest, b)
    if kind == ARR:
        return _array(frame, rest, b)
    if kind == TEXT:
        node, pos = frame[1], frame[2]
        if node.text[pos] != b:
            return []
        return [rest] if pos + 1 == len(node.text) else [((TEXT, node, pos + 1), rest)]
    if kind == SEQ:
        node, i = frame[1], frame[2]
        below = rest if i + 1 == len(node.parts) else ((SEQ, node, i + 1), rest)
        return [s2 for s in push(node.parts[i], below) for s2 in step(s, b)]
    return []  # END: nothing after the value


def _string(frame: tuple, rest: Any, b: int) -> list[Any]:
    _, node, phase, count, esc, pending = frame
    if phase == 0:
        return [((STR, node, 1, 0, 0, 0), rest)] if b == QUOTE else []
    counts = node.counts
    if esc == -1:
        if b == 0x75:  # \u
            return [((STR, node, 1, count, 4, 0), rest)]
        if b in ESCAPES:
            return [((STR, node, 1, count + counts, 0, 0), rest)]
        return []
    if esc:
        if b not in HEX:
            return []
        return [((STR, node, 1, count + (counts and esc == 1), esc - 1, 0), rest)]
    if pending:
        left = utf8_next(pending, b)
        if left < 0:
            return []
        return [((STR, node, 1, count + (counts and left == 0), 0, left), rest)]
    if b == QUOTE:
        return [rest] if count >= node.min_length else []
    if node.max_length is not None and count >= node.max_length:
        return []
    if b == BACKSLASH:
        return [((STR, node, 1, count, -1, 0), rest)]
    if b < 0x20:
        return []
    left = utf8_next(0, b)
    if left < 0:
        return []
    return [((STR, node, 1, count + (counts and left == 0), 0, left), rest)]


def _number(frame: tuple, rest: Any, b: int) -> list[Any]:
    _, node, phase, digits = frame
    out: list[Any] = []
    digit = b in DIGITS
    nxt = None
    if phase == 0:
        nxt = (1, 0) if b == 0x2D else (2, 0) if b == 0x30 else (3, 1) if digit else None
    elif phase == 1:
        nxt = (2, 0) if b == 0x30 else (3, 1) if digit else None
    elif phase in (2, 3):
        if digit and phase == 3 and digits < MAX_INT_DIGITS:
            nxt = (3, digits + 1)
        elif not node.integer and b == 0x2E:
            nxt = (4, 0)
        elif not node.integer and b in (0x65, 0x45):
            nxt = (6, 0)
    elif phase in (4, 5):
        if digit and digits < MAX_FRAC_DIGITS:
            nxt = (5, digits + 1)
        elif phase == 5 and b in (0x65, 0x45):
            nxt = (6, 0)
    elif phase in (6, 7):
        nxt = (8, 1) if digit else (7, 0) if phase == 6 and b in (0x2B, 0x2D) else None
    elif phase == 8 and digit and digits < MAX_EXP_DIGITS:
        nxt = (8, digits + 1)
    if nxt is not None:
        out.append(((NUM, node, *nxt), rest))
    if phase in NUM_DONE:
        out += step(rest, b)
    return out


def _object(frame: tuple, rest: Any, b: int) -> list[Any]:
    _, node, phase, idx, value = frame
    if phase == 0:
        return [ws(((OBJ, node, 1, 0, None), rest))] if b == LBRACE else []
    p = plan(node)
    if phase in (1, 2):
        if b == QUOTE and (p.candidates[idx] or p.extras[idx]):
            return [((KEY, node, idx, b"", 0), ((OBJ, node, 3, idx, None), rest))]
        if b == RBRACE and phase == 1 and p.next_required[idx] == len(node.props):
            return [rest]
        return []
    if phase == 3:
        if b != COLON:
            return []
        return [ws(s, WS_COLON) for s in push(value, ws(((OBJ, node, 4, idx, None), rest), WS_CLOSE))]
    # phase 4: after a value
    if b == COMMA and (p.candidates[idx] or p.extras[idx]):
        return [ws(((OBJ, node, 2, idx, None), rest))]
    if b == RBRACE and p.next_required[idx] == len(node.props):
        return [rest]
    return []


def _key(frame: tuple, rest: Any, b: int) -> list[Any]:
    _, node, idx, prefix, pending = frame
    p = plan(node)
    obj, below = rest
    if b == QUOTE and pending == 0:
        if prefix is not None and prefix in p.candidates[idx]:
            j = p.candidates[idx][prefix]
            return [((OBJ, node, 3, j + 1, node.props[j][1]), below)]
        if p.extras[idx] and (prefix is None or prefix not in node.keys):
            extra = len(node.props)  # no declared key after an extra one
            return [((OBJ, node, 3, extra, node.additional), below)]
        return []
    if prefix is not None:
        grown = prefix + bytes((b,))
        if grown in p.prefixes[idx] or (p.extras[idx] and grown in p.key_prefixes):
            return [((KEY, node, idx, grown, 0), rest)]
        if not p.extras[idx]:
            return []
        pending = 0
        for c in prefix:  # leave the declared keys: carry on as a free key
            pending = utf8_next(pending, c)
    elif not p.extras[idx]:
        return []
    if b == BACKSLASH or b < 0x20 or b == QUOTE:
        return []
    left = utf8_next(pending, b)
    return [((KEY, node, idx, None, left), rest)] if left >= 0 else []


def _array(frame: tuple, rest: Any, b: int) -> list[Any]:
    _, node, phase, count = frame
    if phase == 0:
        return [ws(((ARR, node, 1, 0), rest))] if b == LBRACKET else []
    if phase == 2:  # after an item
        if b == COMMA and (node.max_items is None or count < node.max_items):
            return [ws(((ARR, node, 3, count), rest))]
        if b == RBRACKET and count >= node.min_items:
            return [rest]
        return []
    out: list[Any] = []
    if phase == 1 and b == RBRACKET and node.min_items == 0:
        out.append(rest)
    if node.max_items is None or count < node.max_items:
        for s in push(node.items, ws(((ARR, node, 2, count + 1), rest), WS_CLOSE)):
            out += step(s, b)
    return out


def accepts(stack: Any) -> bool:
    """Whether the input read so far is a whole value (nothing but EOS may follow or end it)."""
    while True:
        frame, rest = stack
        kind = frame[0]
        if kind == END:
            return True
        if kind == WS or (kind == NUM and frame[2] in NUM_DONE) or (kind == LIT and frame[2] in frame[1].literals):
            stack = rest
            continue
        return False


class Grammar:
    """A compiled grammar: its start state and a cache of byte steps (states are shared values)."""

    MAX_CACHE = 200_000

    def __init__(self, root: Node, key: str = "") -> None:
        self.root = root
        self.key = key  # the spec it was compiled from
        self.start: State = frozenset(ws(s) for s in push(root, END_STACK))
        self._steps: dict[tuple[State, int], State] = {}
        self._accepts: dict[State, bool] = {}

    def step(self, state: State, b: int) -> State:
        key = (state, b)
        nxt = self._steps.get(key)
        if nxt is None:
            nxt = frozenset(s2 for s in state for s2 in step(s, b))
            if len(self._steps) >= self.MAX_CACHE:
                self._steps.clear()
            self._steps[key] = nxt
        return nxt

    def advance(self, state: State, data: bytes) -> State | None:
        for b in data:
            state = self.step(state, b)
            if not state:
                return None
        return state

    def accepts(self, state: State) -> bool:
        done = self._accepts.get(state)
        if done is None:
            done = any(accepts(s) for s in state)
            if len(self._accepts) >= self.MAX_CACHE:
                self._accepts.clear()
            self._accepts[state] = done
        return done

    def matches(self, text: str | bytes) -> bool:
        """Whether the whole text is in the language (tests and checks)."""
        data = text.encode() if isinstance(text, str) else text
        state = self.advance(self.start, data)
        return state is not None and self.accepts(state)
