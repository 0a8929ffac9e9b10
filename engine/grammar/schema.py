"""JSON Schema -> the grammar nodes the byte matcher walks (engine/grammar/matcher.py).

The supported subset (what OpenAI's strict mode accepts, and a little more):
type (one or a list), object (properties, required, additionalProperties false / true / a schema),
array (items, minItems, maxItems), string (minLength, maxLength), number, integer, boolean, null,
enum, const, anyOf, a one-element allOf, $ref to "#", "#/$defs/..." or "#/definitions/..." (recursion
included), and OpenAPI's nullable. Annotations are ignored (title, description, default, examples,
format...: `format` is not enforced). Anything else is refused with a SchemaError naming the keyword and
where it is (a JSON pointer), rather than silently producing output the schema would reject.

Objects are written with their declared properties in schema order (optional ones may be skipped),
as OpenAI's strict mode writes them; extra keys (when additionalProperties allows them) come after.
"""

from __future__ import annotations

import json
import math
from typing import Any

ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "format", "strict", "discriminator", "$anchor", "contentMediaType",
})
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties"})
ARRAY_KEYS = frozenset({"items", "minItems", "maxItems", "uniqueItems"})
STRING_KEYS = frozenset({"minLength", "maxLength"})
GENERIC_KEYS = frozenset({"type", "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions", "nullable"})
KNOWN = ANNOTATIONS | OBJECT_KEYS | ARRAY_KEYS | STRING_KEYS | GENERIC_KEYS
MAX_LITERALS = 4096


class SchemaError(ValueError):
    """A schema the matcher cannot enforce; the message names the keyword and its JSON pointer."""


class Node:
    __slots__ = ()


class ObjectNode(Node):
    """props: (key as JSON-escaped UTF-8 without quotes, value node, required) in schema order."""

    __slots__ = ("props", "additional", "keys")

    def __init__(self, props: tuple[tuple[bytes, Node, bool], ...], additional: Node | None) -> None:
        self.props = props
        self.additional = additional  # the schema of extra keys' values; None: no extra keys
        self.keys = frozenset(key for key, _, _ in props)


class ArrayNode(Node):
    __slots__ = ("items", "min_items", "max_items")

    def __init__(self, items: Node, min_items: int, max_items: int | None) -> None:
        self.items, self.min_items, self.max_items = items, min_items, max_items


class StringNode(Node):
    __slots__ = ("min_length", "max_length")

    def __init__(self, min_length: int = 0, max_length: int | None = None) -> None:
        self.min_length, self.max_length = min_length, max_length

    @property
    def counts(self) -> bool:
        return self.min_length > 0 or self.max_length is not None


class NumberNode(Node):
    __slots__ = ("integer",)

    def __init__(self, integer: bool) -> None:
        self.integer = integer


class LiteralNode(Node):
    """One of a set of JSON values, each written compactly (json.dumps with no spaces)."""

    __slots__ = ("literals", "prefixes")

    def __init__(self, literals: tuple[bytes, ...]) -> None:
        self.literals = frozenset(literals)
        self.prefixes = frozenset(lit[:i] for lit in literals for i in range(len(lit) + 1))


class AnyOfNode(Node):
    __slots__ = ("options",)

    def __init__(self, options: tuple[Node, ...]) -> None:
        self.options = options


class RefNode(Node):
    """A $ref, resolved after its target is compiled (so recursive schemas close their loop)."""

    __slots__ = ("target", "ref")

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.target: Node | None = None


class LiteralText(Node):
    """Fixed text around a value (a tool call's tags)."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


class SequenceNode(Node):
    """Parts one after another, no whitespace between them."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[Node, ...]) -> None:
        self.parts = parts


def literal(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def any_value() -> Node:
    """Any JSON value (JSON mode, `{}`, `true`): a recursive anyOf."""
    node = AnyOfNode(())
    obj = ObjectNode((), node)
    arr = ArrayNode(node, 0, None)
    node.options = (obj, arr, StringNode(), NumberNode(False), LiteralNode((b"true", b"false", b"null")))
    return node


class Compiler:
    """One root document: its $defs resolve against it."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, RefNode] = {}
        self._any: Node | None = None

    def any(self) -> Node:
        if self._any is None:
            self._any = any_value()
        return self._any

    def compile(self) -> Node:
        node = self.node(self.root, "")
        for ref, holder in list(self.refs.items()):
            if holder.target is None:
                raise SchemaError(f"$ref {ref!r} could not be resolved")
        return node

    def node(self, schema: Any, at: str) -> Node:
        if schema is True or schema == {}:
            return self.any()
        if schema is False:
            raise SchemaError(f"the schema at {at or '/'} is false: no value can match it")
        if not isinstance(schema, dict):
            raise SchemaError(f"the schema at {at or '/'} must be an object or a boolean, got {type(schema).__name__}")
        for key in schema:
            if key not in KNOWN:
                raise SchemaError(f"keyword {key!r} at {at or '/'} is not supported by this server's structured outputs")
        if "$ref" in schema:
            others = set(schema) - ANNOTATIONS - {"$ref", "$defs", "definitions"}
            if others:
                raise SchemaError(f"$ref at {at or '/'} with sibling keywords ({', '.join(sorted(others))}) is not supported")
            return self.ref(schema["$ref"], f"{at}/$ref")
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1 or set(schema) - ANNOTATIONS - {"allOf", "$defs", "definitions"}:
                raise SchemaError(f"allOf at {at or '/'} is supported only with one schema and nothing beside it")
            return self.node(parts[0], f"{at}/allOf/0")
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"anyOf at {at or '/'} must be a non-empty list")
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "$defs", "definitions") and k not in ANNOTATIONS}
            if rest:
                raise SchemaError(f"anyOf at {at or '/'} with sibling keywords ({', '.join(sorted(rest))}) is not supported")
            return AnyOfNode(tuple(self.node(option, f"{at}/anyOf/{i}") for i, option in enumerate(options)))
        if "const" in schema or "enum" in schema:
            return self.literals(schema, at)
        types = schema.get("type")
        if types is None:
            types = self.implied_types(schema)
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            raise SchemaError(f"type at {at or '/'} must be one of {', '.join(TYPES)} or a list of them, got {types!r}")
        if schema.get("nullable") is True and "null" not in types:
            types = [*types, "null"]
        self.check_keywords(schema, types, at)
        options = [self.typed(schema, t, at) for t in dict.fromkeys(types)]
        return options[0] if len(options) == 1 else AnyOfNode(tuple(options))

    @staticmethod
    def implied_types(schema: dict[str, Any]) -> list[str]:
        if set(schema) & OBJECT_KEYS:
            return ["object"]
        if set(schema) & ARRAY_KEYS:
            return ["array"]
        if set(schema) & STRING_KEYS:
            return ["string"]
        return list(TYPES)  # only annotations: any value

    @staticmethod
    def check_keywords(schema: dict[str, Any], types: list[str], at: str) -> None:
        allowed = set()
        for t, keys in (("object", OBJECT_KEYS), ("array", ARRAY_KEYS), ("string", STRING_KEYS)):
            if t in types:
                allowed |= keys
        for key in schema:
            if key in (OBJECT_KEYS | ARRAY_KEYS | STRING_KEYS) and key not in allowed:
                raise SchemaError(f"keyword {key!r} at {at or '/'} does not apply to type {'/'.join(types)}")

    def typed(self, schema: dict[str, Any], kind: str, at: str) -> Node:
        if kind == "object":
            return self.object(schema, at)
        if kind == "array":
            if schema.get("uniqueItems") is True:
                raise SchemaError(f"keyword 'uniqueItems' (true) at {at or '/'} is not supported")
            items = schema.get("items", True)
            if isinstance(items, list):
                raise SchemaError(f"keyword 'items' as a list (tuple validation) at {at}/items is not supported")
            lo = self.count(schema, "minItems", at, 0)
            hi = self.count(schema, "maxItems", at, None)
            if hi is not None and hi < lo:
                raise SchemaError(f"maxItems < minItems at {at or '/'}")
            return ArrayNode(self.node(items, f"{at}/items"), lo, hi)
        if kind == "string":
            lo = self.count(schema, "minLength", at, 0)
            hi = self.count(schema, "maxLength", at, None)
            if hi is not None and hi < lo:
                raise SchemaError(f"maxLength < minLength at {at or '/'}")
            return StringNode(lo, hi)
        if kind in ("number", "integer"):
            return NumberNode(kind == "integer")
        if kind == "boolean":
            return LiteralNode((b"true", b"false"))
        return LiteralNode((b"null",))

    @staticmethod
    def count(schema: dict[str, Any], key: str, at: str, default: int | None) -> int | None:
        value = schema.get(key, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SchemaError(f"{key} at {at or '/'} must be a non-negative integer, got {value!r}")
        return value

    def object(self, schema: dict[str, Any], at: str) -> Node:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise SchemaError(f"properties at {at or '/'} must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"required at {at or '/'} must be a list of strings")
        extra = schema.get("additionalProperties", True)
        additional = None if extra is False else self.node(extra, f"{at}/additionalProperties")
        props = [(name, self.node(sub, f"{at}/properties/{name}"), name in required) for name, sub in properties.items()]
        missing = [name for name in dict.fromkeys(required) if name not in properties]
        if missing and additional is None:
            raise SchemaError(f"required property {missing[0]!r} at {at or '/'} is not in properties while "
                              "additionalProperties is false: no object can match")
        props += [(name, additional or self.any(), True) for name in missing]
        return ObjectNode(tuple((json.dumps(name, ensure_ascii=False)[1:-1].encode(), node, req)
                                for name, node, req in props), additional)

    def literals(self, schema: dict[str, Any], at: str) -> Node:
        if "const" in schema:
            values = [schema["const"]]
        else:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"enum at {at or '/'} must be a non-empty list")
            if len(values) > MAX_LITERALS:
                raise SchemaError(f"enum at {at or '/'} has {len(values)} values; at most {MAX_LITERALS} are supported")
        rest = set(schema) - ANNOTATIONS - {"const", "enum", "$defs", "definitions", "nullable"}
        types = schema.get("type")
        rest.discard("type")
        if rest:
            raise SchemaError(f"{'const' if 'const' in schema else 'enum'} at {at or '/'} with sibling keywords "
                              f"({', '.join(sorted(rest))}) is not supported")
        if types is not None:  # the type only filters the listed values
            allowed = {types} if isinstance(types, str) else set(types)
            values = [v for v in values if json_type(v) in allowed or (json_type(v) == "integer" and "number" in allowed)]
            if not values:
                raise SchemaError(f"no value of enum/const at {at or '/'} has type {types!r}")
        if schema.get("nullable") is True and None not in values:
            values = [*values, None]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise SchemaError(f"enum/const at {at or '/'} holds a non-finite number")
        return LiteralNode(tuple(dict.fromkeys(literal(v) for v in values)))

    def ref(self, ref: Any, at: str) -> Node:
        if not isinstance(ref, str):
            raise SchemaError(f"$ref at {at} must be a string")
        if ref in self.refs:
            return self.refs[ref]
        holder = RefNode(ref)
        self.refs[ref] = holder
        holder.target = self.node(self.resolve(ref, at), ref[1:] or "")
        return holder

    def resolve(self, ref: str, at: str) -> Any:
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            raise SchemaError(f"$ref {ref!r} at {at}: only local references (#, #/$defs/...) are supported")
        target = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"$ref {ref!r} at {at} points at nothing")
        return target


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def compile_schema(schema: Any) -> Node:
    return Compiler(schema).compile()


def tool_call_node(tools: list[tuple[str, Any]], prefix: str, suffix: str) -> Node:
    """`prefix{"name": <one of the tools>, "arguments": <its parameters>}suffix`; each tool's parameters are
    their own document ($defs resolve inside them)."""
    calls = []
    for name, parameters in tools:
        try:
            arguments = Compiler(parameters if parameters is not None else {"type": "object"}).compile()
        except SchemaError as e:
            raise SchemaError(f"tool {name!r} parameters: {e}") from None
        calls.append(ObjectNode(((b"name", LiteralNode((literal(name),)), True), (b"arguments", arguments, True)), None))
    call: Node = calls[0] if len(calls) == 1 else AnyOfNode(tuple(calls))
    return SequenceNode((LiteralText(prefix.encode()), call, LiteralText(suffix.encode())))
