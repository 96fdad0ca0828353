"""Anthropic JSON mode's forced tool (gateway/providers/anthropic_json.py); its answers: test_anthropic_response.py."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.providers.anthropic_json import answer_tool, answer_tool_name

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_json_object_is_a_tool_taking_any_object() -> None:
    tool = answer_tool({"type": "json_object"}, "claude")
    assert tool is not None
    assert (tool["name"], tool["input_schema"]) == ("json_object", {"type": "object"})
    assert tool["description"].startswith("Give your whole answer by calling this tool")


def test_json_schema_is_a_tool_with_that_name_schema_and_description() -> None:
    spec = {"name": "city", "description": "A city.", "schema": SCHEMA, "strict": True}
    tool = answer_tool({"type": "json_schema", "json_schema": spec}, "claude")
    assert tool is not None
    assert (tool["name"], tool["input_schema"]) == ("city", SCHEMA)
    assert tool["description"].endswith(" A city.")


def test_json_schema_without_a_schema_takes_any_object() -> None:
    tool = answer_tool({"type": "json_schema", "json_schema": {"name": "n"}}, "claude")
    assert tool is not None
    assert tool["input_schema"] == {"type": "object"}


@pytest.mark.parametrize("fmt", [None, {"type": "text"}, "json"])
def test_no_tool_outside_json_mode(fmt: Any) -> None:
    assert answer_tool(fmt, "claude") is None
    assert answer_tool_name({"response_format": fmt}) is None


@pytest.mark.parametrize(
    ("spec", "param", "says"),
    [
        (None, "name", "json_schema.name"),
        ({}, "name", "json_schema.name"),
        ({"name": "has space"}, "name", "json_schema.name"),
        ({"name": "x" * 65}, "name", "json_schema.name"),
        ({"name": "n", "schema": {"type": "array"}}, "schema", "type must be 'object'"),
        ({"name": "n", "schema": "object"}, "schema", "type must be 'object'"),
    ],
)
def test_json_schemas_anthropic_cannot_take_are_400(spec: Any, param: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        answer_tool({"type": "json_schema", "json_schema": spec}, "claude")
    assert (info.value.status, info.value.param) == (400, f"response_format.json_schema.{param}")
    assert info.value.message.startswith("Provider 'claude' (anthropic) ")
    assert says in info.value.message


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ({"type": "json_object"}, "json_object"),
        ({"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}, "city"),
    ],
)
def test_answer_tool_name_matches_the_tool_sent(fmt: dict[str, Any], name: str) -> None:
    tool = answer_tool(fmt, "claude")
    assert tool is not None
    assert answer_tool_name({"response_format": fmt}) == tool["name"] == name
