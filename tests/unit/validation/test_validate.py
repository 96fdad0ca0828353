"""A refusal says what OpenAI says: its wording, its codes, `param` the field's path."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.providers import Operation
from gateway.validation import validate as module
from gateway.validation.validate import ALLOWED, SCHEMAS, refusal, validate

USER = {"role": "user", "content": "hi"}


def message(body: dict[str, Any], op: Operation = Operation.chat) -> tuple[str, str | None, str | None]:
    with pytest.raises(InvalidRequest) as info:
        validate({"model": "m", "messages": [USER], **body}, op)
    return info.value.message, info.value.param, info.value.code


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": []}, "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                           "but got an empty array instead."),
        ({"messages": [{"role": "root", "content": "x"}]},
         "Invalid value for 'messages[0].role': 'root'. Supported values are: 'system', 'developer', "
         "'user', 'assistant', 'tool', and 'function'."),
        ({"messages": [{"content": "x"}]}, "Missing required parameter: 'messages[0].role'."),
        ({"temperature": "hot"}, "Invalid type for 'temperature': expected a number, but got a string instead."),
        ({"n": 1000}, "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 1000 instead."),
        ({"max_tokens": -1},
         "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got -1 instead."),
        # JSON's 10^23 is a float once parsed: the value is shown, so the client sees why
        ({"max_tokens": 1e23},
         "Invalid type for 'max_tokens': expected an integer, but got a decimal number (1e+23) instead."),
        ({"temperature": 2.5},
         "Invalid 'temperature': decimal above maximum value. Expected a value <= 2.0, but got 2.5 instead."),
        ({"stop": list("abcde")}, "Invalid 'stop': array too long. Expected an array with maximum length 4, "
                                  "but got an array with length 5 instead."),
        ({"messages": [{"role": "user", "content": 5}]},
         "Invalid type for 'messages[0].content': expected a string or an array, but got an integer (5) instead."),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]},
         "Invalid 'tools[0].function.name': string does not match pattern. "
         "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'."),
        ({"tools": [{"type": "function", "function": {"name": "a" * 65}}]},
         "Invalid 'tools[0].function.name': string too long. Expected a string with maximum length 64, "
         "but got a string with length 65 instead."),
        ({"logit_bias": {"x": 1}},
         "Invalid type for a key of 'logit_bias': expected an integer, but got a string instead."),
        ({"logit_bias": {"1": 1000}},
         "Invalid 'logit_bias': decimal above maximum value. Expected a value <= 100.0 for every entry."),
        ({"logit_bias": {"1": "x"}},
         "Invalid type for a value of 'logit_bias': expected a number, but got a string instead."),
        ({"tool_choice": "any"},
         "Invalid value for 'tool_choice': 'any'. Supported values are: 'auto', 'none', and 'required'."),
        ({"stream_options": {"include_usage": True}},
         "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
    ],
)
def test_openai_wording(body: dict[str, Any], expected: str) -> None:
    assert message(body)[0] == expected


def test_two_supported_values_read_as_a_pair() -> None:
    text, param, code = message({"input": "x", "encoding_format": "int8"}, Operation.embeddings)
    assert text == "Invalid value for 'encoding_format': 'int8'. Supported values are: 'base64' and 'float'."
    assert (param, code) == ("encoding_format", "invalid_value")


def test_a_long_refused_value_is_cut() -> None:
    text, _, _ = message({"messages": [{"role": "r" * 10_000, "content": "x"}]})
    assert len(text) < 300 and "..." in text


def test_every_schema_lists_its_enumerations() -> None:
    assert set(ALLOWED) == set(SCHEMAS)
    chat = ALLOWED[Operation.chat]
    assert chat["messages[].role"] == ("system", "developer", "user", "assistant", "tool", "function")
    assert chat["messages[].content[].type"] == ("text", "image_url", "input_audio", "file", "refusal")
    assert chat["tools[].type"] == ("function", "custom")
    assert chat["response_format.type"] == ("text", "json_object", "json_schema")
    assert ALLOWED[Operation.images]["response_format"] == ("b64_json", "url")


def test_a_message_of_another_shape_still_names_the_field() -> None:
    error = refusal("Something new - at `$.tools[0]`", {"tools": [{}]}, Operation.chat)
    assert (error.param, error.code) == ("tools[0]", "invalid_value")
    assert error.message == "Invalid 'tools[0]': Something new."


def test_a_path_that_left_the_body_shows_no_value() -> None:
    assert module._lookup({"a": [1]}, "a[3]") is None
    assert module._lookup({"a": [1]}, "a[0].b") is None
    assert module._lookup({"a": [{"b": 2}]}, "a[0].b") == 2
