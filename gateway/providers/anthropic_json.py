"""Anthropic JSON mode: OpenAI's `response_format` json_object / json_schema as a forced tool.

The schema becomes the input schema of one tool the model must call, once
(`tool_choice: {type: tool, disable_parallel_tool_use: true}`), and the answer
carries that call's input as the message content (`anthropic_response` does the
answer's side). A forced tool works on every model with tool use, where Anthropic's
own structured outputs (`output_config.format`) only on recent ones.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.errors import InvalidRequest

# OpenAI's rule for `json_schema.name`, within Anthropic's for tool names.
_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# The forced tool of json_object, whose answer is any JSON object.
JSON_OBJECT_TOOL = "json_object"
_DESCRIPTION = "Give your whole answer by calling this tool: its input is the answer, as JSON."


def answer_tool(fmt: Any, provider: str) -> dict[str, Any] | None:
    """The forced tool whose input is the JSON answer `response_format` asks for, or None.

    Raises InvalidRequest for a json_schema Anthropic cannot take as a tool.
    """
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        schema: Any = {"type": "object"}  # any JSON object, as OpenAI's JSON mode
        return {"name": JSON_OBJECT_TOOL, "description": _DESCRIPTION, "input_schema": schema}
    if kind != "json_schema":
        return None
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    spec = spec if isinstance(spec, dict) else {}
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise _refuse(provider, "name", "needs json_schema.name of a-z, A-Z, 0-9, _ or -, up to 64.")
    schema = spec.get("schema") or {"type": "object"}
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _refuse(provider, "schema", "answers JSON objects only: the schema's type must be 'object'.")
    description = _DESCRIPTION
    if isinstance(spec.get("description"), str):
        description += " " + spec["description"]
    return {"name": name, "description": description, "input_schema": schema}


def answer_tool_name(body: dict[str, Any]) -> str | None:
    """The forced tool's name for a request `answer_tool` accepted; None outside JSON mode."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return JSON_OBJECT_TOOL
    spec = fmt.get("json_schema") if fmt.get("type") == "json_schema" else None
    name = spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) else None


def _refuse(provider: str, field: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"Provider '{provider}' (anthropic) {why}", param=f"response_format.json_schema.{field}"
    )
