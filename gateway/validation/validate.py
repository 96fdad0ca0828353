"""`validate(body, op)`: the parsed body against its operation's schema, or a 400 naming the field.

The body stays the dict every later layer reads; msgspec converts it into the
schema's structs (C speed, about 1-4 µs for a typical request, see
bench/validation_cpu.py) only to check it, and the structs are dropped. A
refusal says what OpenAI says for the same mistake, in its words and codes where
they are known (`Invalid type for 'temperature': expected a number, but got a
string instead.`, code `invalid_type`), with `param` the field's path
(`messages[0].role`, `tools[1].function.name`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect as mi

from gateway.errors import InvalidRequest
from gateway.providers import Operation
from gateway.validation.chat import PART_TYPES, ChatRequest
from gateway.validation.endpoints import CompletionRequest, EmbeddingRequest, ImageRequest
from gateway.validation.fields import Schema

SCHEMAS: dict[Operation, type[Schema]] = {
    Operation.chat: ChatRequest,
    Operation.completions: CompletionRequest,
    Operation.embeddings: EmbeddingRequest,
    Operation.images: ImageRequest,
}
# str_keys: logit_bias's keys are token ids written as JSON strings ("50256").
_CONVERT: dict[Operation, Callable[[dict[str, Any]], Any]] = {
    op: functools.partial(msgspec.convert, type=schema, str_keys=True) for op, schema in SCHEMAS.items()
}


def validate(body: dict[str, Any], op: Operation) -> None:
    """Raise InvalidRequest (400, `param` the field's path) unless `body` is a valid `op` request."""
    try:
        request = _CONVERT[op](body)
    except msgspec.ValidationError as exc:
        if op is Operation.chat and (known := _known_parts(body)) is not body:
            validate(known, op)  # the rest of the request still has to be valid
            return
        raise refusal(str(exc), body, op) from None
    if getattr(request, "stream_options", None) is not None and request.stream is not True:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )
    if op is Operation.completions and request.best_of is not None and request.best_of < (request.n or 1):
        raise InvalidRequest(
            "Invalid 'best_of': it must be greater than or equal to 'n'.",
            param="best_of",
            code="invalid_value",
        )


def _known_parts(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with every content part of a type OpenAI does not document (a vLLM `video_url`, a
    provider's new kind) replaced by an empty text part, or `body` itself when there is none.

    Providers add part types as they add fields; the schema cannot say "any other tag", so only a
    refused request pays this second look."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    changed = False
    checked = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = [{"type": "text", "text": ""} if _foreign(p) else p for p in content]
            if parts != content:
                changed = True
                message = {**message, "content": parts}
        checked.append(message)
    return {**body, "messages": checked} if changed else body


def _foreign(part: Any) -> bool:
    kind = part.get("type") if isinstance(part, dict) else None
    return isinstance(kind, str) and bool(kind) and kind not in PART_TYPES


# -- msgspec's wording -> OpenAI's -------------------------------------------------------------------

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<key>key` in `)?\$\.?(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_TYPE = re.compile(r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`")
_BOUND = re.compile(r"Expected `(?P<kind>int|float)` (?P<op>[<>]=?) (?P<bound>\S+)")
_LENGTH = re.compile(r"Expected `(?P<kind>str|array|object)` of length (?P<op>[<>]=) (?P<bound>\d+)")
_PATTERN = re.compile(r"Expected `str` matching regex (?P<pattern>.+)")
_VALUE = re.compile(r"Invalid (?:enum )?value (?P<value>.+)")
_STEP = re.compile(r"[^.\[\]]+|\[\d+\]")

_NAMES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}
_GOT = {**_NAMES, "float": "a decimal number"}
_NOUN = {"str": "string", "array": "array", "object": "object"}
_SHOWN = 80  # characters of a refused value echoed back


def refusal(message: str, body: dict[str, Any], op: Operation) -> InvalidRequest:
    """The 400 for one msgspec ValidationError message about `body`."""
    at = _AT.match(message)
    assert at is not None  # the pattern matches any text
    msg, path = at["msg"], at["path"] or ""
    # A dict's key (`key` in `$.logit_bias`) or value (`$.logit_bias[...]`): the dict is the param.
    entry = "a key of " if at["key"] else "a value of " if path.endswith("[...]") else ""
    path = path.removesuffix("[...]")
    if m := _MISSING.fullmatch(msg):
        param = f"{path}.{m['field']}" if path else m["field"]
        return InvalidRequest(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    value = None if entry else _lookup(body, path)
    if m := _TYPE.fullmatch(msg):
        expected = " or ".join(_NAMES.get(t, t) for t in m["expected"].split(" | ") if t != "null")
        got = _GOT.get(m["got"], m["got"])
        if m["got"] in ("int", "float") and value is not None:
            got += f" ({value!r})"
        text = f"Invalid type for {entry}'{path}': expected {expected}, but got {got} instead."
        return InvalidRequest(text, param=path, code="invalid_type")
    if m := _BOUND.fullmatch(msg):
        number = "integer" if m["kind"] == "int" else "decimal"
        above = m["op"].startswith("<")
        text = (
            f"Invalid '{path}': {number} {'above maximum' if above else 'below minimum'} value. "
            f"Expected a value {m['op']} {m['bound']}"
            + (f", but got {value!r} instead." if value is not None else " for every entry.")
        )
        code = f"{number}_{'above_max' if above else 'below_min'}_value"
        return InvalidRequest(text, param=path, code=code)
    if m := _LENGTH.fullmatch(msg):
        noun = _NOUN[m["kind"]]
        length = len(value) if isinstance(value, (str, list, dict)) else 0
        if length == 0:
            problem, code, got = f"empty {noun}", f"empty_{noun}", f"an empty {noun}"
        else:
            above = m["op"] == "<="
            problem = f"{noun} too {'long' if above else 'short'}"
            code = f"{noun}_{'above_max' if above else 'below_min'}_length"
            got = f"{'an' if noun[0] in 'ao' else 'a'} {noun} with length {length}"
        side = "maximum" if m["op"] == "<=" else "minimum"
        text = (
            f"Invalid '{path}': {problem}. "
            f"Expected {_NAMES[m['kind']]} with {side} length {m['bound']}, but got {got} instead."
        )
        return InvalidRequest(text, param=path, code=code)
    if m := _PATTERN.fullmatch(msg):
        text = (
            f"Invalid '{path}': string does not match pattern. "
            f"Expected a string that matches the pattern {m['pattern']}."
        )
        return InvalidRequest(text, param=path, code="invalid_value")
    if m := _VALUE.fullmatch(msg):
        shown = m["value"] if len(m["value"]) <= _SHOWN else m["value"][:_SHOWN] + "...'"
        text = f"Invalid value for '{path}': {shown}."
        allowed = ALLOWED[op].get(re.sub(r"\[\d+\]", "[]", path))
        if allowed:
            text += " Supported values are: " + _listing(allowed) + "."
        return InvalidRequest(text, param=path, code="invalid_value")
    return InvalidRequest(f"Invalid '{path}': {msg}.", param=path or None, code="invalid_value")


def _lookup(body: Any, path: str) -> Any:
    """The value at a msgspec path (`messages[0].content`) of the parsed body, None if it is not there."""
    node = body
    for step in _STEP.findall(path):
        if step[0] == "[" and isinstance(node, list) and int(step[1:-1]) < len(node):
            node = node[int(step[1:-1])]
        elif step[0] != "[" and isinstance(node, dict):
            node = node.get(step)
        else:
            return None
    return node


def _listing(values: tuple[str, ...]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) < 3:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


# -- the values each enumerated field takes, for "Supported values are: ..." -----------------------


def _walk(t: mi.Type, path: str, out: dict[str, tuple[str, ...]]) -> None:
    if isinstance(t, mi.Metadata):
        _walk(t.type, path, out)
    elif isinstance(t, mi.LiteralType):
        out[path] = out.get(path, ()) + tuple(map(str, t.values))
    elif isinstance(t, mi.ListType):
        _walk(t.item_type, f"{path}[]", out)
    elif isinstance(t, mi.UnionType):
        for member in t.types:
            _walk(member, path, out)
    elif isinstance(t, mi.StructType):
        if t.tag_field is not None:
            key = f"{path}.{t.tag_field}" if path else t.tag_field
            out[key] = (*out.get(key, ()), str(t.tag))
        for field in t.fields:
            _walk(field.type, f"{path}.{field.encode_name}" if path else field.encode_name, out)


def _allowed(schema: type[Schema]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    _walk(mi.type_info(schema), "", out)
    # A union's members share their fields: each value once, in declaration order.
    return {path: tuple(dict.fromkeys(values)) for path, values in out.items()}


ALLOWED: dict[Operation, dict[str, tuple[str, ...]]] = {op: _allowed(s) for op, s in SCHEMAS.items()}
