"""The chat schema: every rule refuses with the field's path, and every valid shape passes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.providers import Operation
from gateway.validation.fields import MAX_OUTPUT_TOKENS
from gateway.validation.validate import validate

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def refused(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate(body, Operation.chat)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


# Every shape below is one the openai SDK's types allow (openai/types/chat/*_param.py).
VALID: list[Any] = [
    pytest.param(chat(), id="minimal"),
    pytest.param(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief", "name": "sys"},
                {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "original"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"}},
                    {"type": "file", "file": {"file_id": "file-abc"}},
                ]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                    {"id": "c2", "type": "custom", "custom": {"name": "sql", "input": "select 1"}},
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "1"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "no"}]},
                {"role": "assistant", "refusal": "I can't"},
                {"role": "assistant", "audio": {"id": "audio_1"}},
                {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                {"role": "assistant", "content": [], "tool_calls": [
                    {"id": "c3", "type": "function", "function": {"name": "f", "arguments": ""}}]},
                {"role": "function", "name": "f", "content": None},
                {"role": "user", "content": "", "name": "bob"},
            ],
        },
        id="every-role-and-part",
    ),
    pytest.param(
        chat(
            temperature=0, top_p=1, n=128, max_tokens=MAX_OUTPUT_TOKENS, max_completion_tokens=1,
            presence_penalty=-2, frequency_penalty=2.0, stop=["a", "b", "c", "d"], logit_bias={"50256": -100, "1": 100},
            logprobs=True, top_logprobs=20, seed=-(2**63), user="u", parallel_tool_calls=False,
            stream=True, stream_options={"include_usage": True, "include_obfuscation": False},
        ),
        id="every-bound",
    ),
    pytest.param(chat(temperature=2, top_p=0.5, stop="\n", seed=2**63 - 1, stream=False), id="scalar-stop"),
    pytest.param(
        chat(
            tools=[
                TOOL,
                {"type": "function", "function": {"name": "A-b_9", "description": "d", "strict": True, "parameters": {}}},
                {"type": "function", "function": {"name": "x" * 64}},
                {"type": "custom", "custom": {"name": "sql", "format": {"type": "grammar", "grammar": {}}}},
            ],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ),
        id="tools",
    ),
    pytest.param(chat(tool_choice="none"), id="choice-none"),
    pytest.param(chat(tool_choice="required"), id="choice-required"),
    pytest.param(chat(tool_choice={"type": "custom", "custom": {"name": "sql"}}), id="choice-custom"),
    pytest.param(
        chat(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [TOOL]}}),
        id="choice-allowed-tools",
    ),
    pytest.param(chat(functions=[{"name": "f", "parameters": {}}], function_call={"name": "f"}), id="functions"),
    pytest.param(chat(function_call="auto"), id="function-call-auto"),
    pytest.param(chat(response_format={"type": "text"}), id="format-text"),
    pytest.param(chat(response_format={"type": "json_object"}), id="format-json"),
    pytest.param(
        chat(response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": {}, "strict": True}}),
        id="format-schema",
    ),
    # null is "not set" for every optional field (the SDKs send it for a None argument)
    pytest.param(
        chat(temperature=None, top_p=None, n=None, max_tokens=None, stop=None, logit_bias=None, seed=None,
             tools=None, tool_choice=None, response_format=None, stream=None, stream_options=None, user=None),
        id="nulls",
    ),
    # fields the schema does not know are the upstream's business
    pytest.param(
        chat(reasoning_effort="xhigh", verbosity="low", metadata={"a": {"b": 1}}, store=True,
             web_search_options={}, prompt_cache_key="k", vendor_extension={"anything": [1, "2"]},
             modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, service_tier="fast"),
        id="unknown-and-open-fields",
    ),
]


@pytest.mark.parametrize("body", VALID)
def test_valid_bodies_pass_untouched(body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    validate(body, Operation.chat)
    assert body == before


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        # messages
        ({"messages": []}, "messages", "empty_array"),
        ({"messages": None}, "messages", "invalid_type"),
        ({"messages": {"role": "user"}}, "messages", "invalid_type"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        ({"messages": [USER, {"role": "root", "content": "x"}]}, "messages[1].role", "invalid_value"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role", "invalid_type"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "system", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "empty_array"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "invalid_type"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type",
         "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": ""}]}]}, "messages[0].content[0].type",
         "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}, {"role": "x"}]},
         "messages[1].role", "invalid_value"),  # a foreign part passes, the rest is still checked
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
         "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
         "messages[0].content[0].text", "invalid_type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x"}]}]},
         "messages[0].content[0].image_url", "invalid_type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0].image_url.url", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]},
         "messages[0].content[0].input_audio.format", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": 3}}]}]},
         "messages[0].content[0].file.file_id", "invalid_type"),
        ({"messages": [{"role": "assistant"}]}, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
         "messages[0].tool_calls[0].function", "missing_required_parameter"),
        ({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
         "messages[0].tool_calls[0].function.arguments", "invalid_type"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "x"}]}]},
         "messages[0].tool_calls[0].type", "invalid_value"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].name", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name", "invalid_type"),
        # sampling and sizes
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"temperature": -0.1}, "temperature", "decimal_below_min_value"),
        ({"temperature": 2.01}, "temperature", "decimal_above_max_value"),
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"top_p": 1.5}, "top_p", "decimal_above_max_value"),
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"n": 1000}, "n", "integer_above_max_value"),
        ({"n": 1.5}, "n", "invalid_type"),
        ({"n": True}, "n", "invalid_type"),
        ({"max_tokens": -1}, "max_tokens", "integer_below_min_value"),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"max_tokens": MAX_OUTPUT_TOKENS + 1}, "max_tokens", "integer_above_max_value"),
        ({"max_tokens": 1e23}, "max_tokens", "invalid_type"),
        ({"max_tokens": "100"}, "max_tokens", "invalid_type"),
        ({"max_completion_tokens": 10**23}, "max_completion_tokens", "integer_above_max_value"),
        ({"presence_penalty": -2.5}, "presence_penalty", "decimal_below_min_value"),
        ({"frequency_penalty": 3}, "frequency_penalty", "decimal_above_max_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
        ({"stop": 5}, "stop", "invalid_type"),
        ({"stop": ["a", 5]}, "stop[1]", "invalid_type"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "invalid_type"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "decimal_above_max_value"),
        ({"logit_bias": [1]}, "logit_bias", "invalid_type"),
        ({"logprobs": "yes"}, "logprobs", "invalid_type"),
        ({"top_logprobs": 21}, "top_logprobs", "integer_above_max_value"),
        ({"top_logprobs": -1}, "top_logprobs", "integer_below_min_value"),
        ({"seed": 2**63}, "seed", "integer_above_max_value"),
        ({"seed": "7"}, "seed", "invalid_type"),
        ({"user": 42}, "user", "invalid_type"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls", "invalid_type"),
        # stream
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stream": 1}, "stream", "invalid_type"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "invalid_type"),
        ({"stream": True, "stream_options": []}, "stream_options", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        # tools
        ({"tools": TOOL}, "tools", "invalid_type"),
        ({"tools": [TOOL, {"type": "function", "function": {"name": "bad name"}}]}, "tools[1].function.name",
         "invalid_value"),
        ({"tools": [TOOL, {"type": "function", "function": {"name": "get.weather"}}]}, "tools[1].function.name",
         "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name",
         "string_above_max_length"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name", "empty_string"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "missing_required_parameter"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
        ({"tools": [{"function": {"name": "f"}}]}, "tools[0].type", "missing_required_parameter"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
         "tools[0].function.parameters", "invalid_type"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools[0].function.strict",
         "invalid_type"),
        ({"tools": [{"type": "custom", "custom": {}}]}, "tools[0].custom.name", "missing_required_parameter"),
        ({"tool_choice": "any"}, "tool_choice", "invalid_value"),
        ({"tool_choice": 1}, "tool_choice", "invalid_type"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.function", "missing_required_parameter"),
        ({"tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name",
         "missing_required_parameter"),
        ({"tool_choice": {"type": "tool", "name": "f"}}, "tool_choice.type", "invalid_value"),
        ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "any", "tools": []}}},
         "tool_choice.allowed_tools.mode", "invalid_value"),
        ({"functions": [{"name": "a b"}]}, "functions[0].name", "invalid_value"),
        ({"function_call": "required"}, "function_call", "invalid_value"),
        # response_format
        ({"response_format": "json"}, "response_format", "invalid_type"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format.json_schema.name", "missing_required_parameter"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "my schema"}}},
         "response_format.json_schema.name", "invalid_value"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": []}}},
         "response_format.json_schema.schema", "invalid_type"),
    ],
)
def test_invalid_field_is_refused_with_its_path(fields: dict[str, Any], param: str, code: str) -> None:
    error = refused(chat(**fields))
    assert (error.param, error.code) == (param, code), error.message
    assert f"'{param}'" in error.message


def test_parts_of_types_openai_does_not_document_pass_unchecked() -> None:
    # vLLM's video and audio URLs, or a provider's new kind: theirs to judge, as unknown fields are.
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what happens?"},
                                         {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}]},
            {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "https://x/a.wav"}}]},
        ],
    }
    before = copy.deepcopy(body)
    validate(body, Operation.chat)
    assert body == before  # checked on a copy; forwarded as sent


def test_messages_is_required() -> None:
    error = refused({"model": "m"})
    assert (error.param, error.code) == ("messages", "missing_required_parameter")
