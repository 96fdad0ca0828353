"""The Anthropic adapter's request side: config, head fields, parameters, messages, tools.

Answers, errors and streams: test_anthropic_response.py.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
import pytest

from gateway.errors import InvalidRequest, UnsupportedOperation
from gateway.providers import AnyProvider, build_adapter
from gateway.providers.anthropic import AnthropicAdapter, AnthropicConfig
from gateway.providers.base import Operation, Target

CHAT = Operation.chat
TARGET = Target("claude-x")


def adapter(**fields: Any) -> AnthropicAdapter:
    config = AnthropicConfig(api_key="sk-ant-unit", **fields)
    built = build_adapter("claude", config, "")
    assert isinstance(built, AnthropicAdapter)
    return built


def encode(body: dict[str, Any], target: Target = TARGET, **fields: Any) -> dict[str, Any]:
    body.setdefault("model", "alias")
    return dict(orjson.loads(adapter(**fields).encode_body(CHAT, body, target)))


def refused(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as exc:
        encode(body)
    assert "Provider 'claude' (anthropic)" in exc.value.message
    return exc.value


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- config and request head ---------------------------------------------------------------


def test_config_from_yaml_shape_and_defaults() -> None:
    config = msgspec.convert({"type": "anthropic", "api_key": "k"}, AnyProvider)
    assert isinstance(config, AnthropicConfig)
    assert (config.url, config.anthropic_version, config.default_max_tokens) == (
        "https://api.anthropic.com",
        "2023-06-01",
        4096,
    )
    assert sorted(config.default_capabilities) == ["chat", "streaming", "tools"]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"type": "anthropic", "default_max_tokens": 0}, AnyProvider)


def test_headers_and_target() -> None:
    built = build_adapter(
        "claude", AnthropicConfig(api_key="sk-ant-unit", anthropic_version="2099-01-01"), "/proxy"
    )
    assert (b"x-api-key", b"sk-ant-unit") in built.keys.keys[0].headers
    assert (b"anthropic-version", b"2099-01-01") in built.keys.keys[0].headers
    assert not any(name == b"authorization" for name, _ in built.keys.keys[0].headers)
    assert built.target(CHAT, TARGET) == b"/proxy/v1/messages"


def test_only_chat_is_encoded() -> None:
    with pytest.raises(UnsupportedOperation) as exc:
        adapter().encode_body(Operation.embeddings, {"model": "m", "input": "x"}, TARGET)
    assert exc.value.message == "Provider 'claude' (anthropic) does not support embeddings."


# -- parameters ----------------------------------------------------------------------------


def test_minimal_request_gets_the_default_max_tokens() -> None:
    assert encode({"messages": [user("hi")]}) == {
        "model": "claude-x",
        "messages": [user("hi")],
        "max_tokens": 4096,
    }
    assert encode({"messages": [user("hi")]}, default_max_tokens=7)["max_tokens"] == 7


def test_parameters_translated() -> None:
    body = encode(
        {
            "messages": [user("hi")],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "stop": "END",
            "temperature": 1,
            "top_p": 0.5,
            "top_k": 3,
            "safety_identifier": "sid",
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "logprobs": False,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
            "response_format": {"type": "text"},
            "modalities": ["text"],
            "seed": 1,
            "service_tier": "auto",
            "store": False,
            "metadata": {"k": "v"},
            "reasoning_effort": "low",
            "verbosity": "low",
            "prediction": {"type": "content", "content": "x"},
            "prompt_cache_key": "p",
            "audio": None,
        }
    )
    assert body == {
        "model": "claude-x",
        "messages": [user("hi")],
        "max_tokens": 20,
        "stop_sequences": ["END"],
        "temperature": 1,
        "top_p": 0.5,
        "top_k": 3,
        "metadata": {"user_id": "sid"},
        "stream": True,
    }
    both = encode({"messages": [user("hi")], "stop": ["a", "b"], "user": "u", "safety_identifier": "s"})
    assert (both["stop_sequences"], both["metadata"]) == (["a", "b"], {"user_id": "u"})


def test_deployment_params_are_defaults_under_the_client_values() -> None:
    target = Target("claude-x", {"max_tokens": 64, "top_k": 9, "temperature": 0.1})
    body = encode({"messages": [user("hi")], "temperature": 0.7}, target)
    assert (body["max_tokens"], body["top_k"], body["temperature"]) == (64, 9, 0.7)


@pytest.mark.parametrize(
    ("params", "param", "says"),
    [
        ({"n": 2}, "n", "'n' must be 1"),
        ({"logprobs": True}, "logprobs", "log probabilities"),
        ({"top_logprobs": 0}, "top_logprobs", "'top_logprobs'"),
        ({"presence_penalty": 0.1}, "presence_penalty", "'presence_penalty'"),
        ({"frequency_penalty": -1}, "frequency_penalty", "'frequency_penalty'"),
        ({"logit_bias": {"1": 2}}, "logit_bias", "'logit_bias'"),
        ({"response_format": {"type": "xml"}}, "response_format", "text, json_object and json_schema"),
        ({"response_format": "json"}, "response_format", "text, json_object and json_schema"),
        (
            {
                "response_format": {"type": "json_object"},
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "response_format",
            "send either tools or a JSON response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema.name",
            "json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
            "response_format.json_schema.name",
            "json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {"type": "array"}},
                }
            },
            "response_format.json_schema.schema",
            "type must be 'object'",
        ),
        ({"temperature": 1.2}, "temperature", "between 0 and 1"),
        ({"modalities": ["text", "audio"]}, "modalities", "text only"),
        ({"audio": {"voice": "x"}}, "audio", "'audio'"),
        ({"functions": [{"name": "f"}]}, "functions", "'functions'"),
        ({"function_call": "auto"}, "function_call", "'function_call'"),
        ({"web_search_options": {}}, "web_search_options", "'web_search_options'"),
        ({"moderation": {"mode": "block"}}, "moderation", "'moderation'"),
        ({"frobnicate": 1}, "frobnicate", "does not recognise the request argument 'frobnicate'"),
    ],
)
def test_parameters_refused(params: dict[str, Any], param: str, says: str) -> None:
    error = refused({"messages": [user("x")], **params})
    assert error.param == param
    assert says in error.message


def test_unknown_parameter_set_to_null_is_ignored() -> None:
    assert "frobnicate" not in encode({"messages": [user("x")], "frobnicate": None})


# -- messages ------------------------------------------------------------------------------


def test_system_messages_are_lifted_and_turns_merged() -> None:
    body = encode(
        {
            "messages": [
                {"role": "system", "content": "one"},
                user("a"),
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "three"}],
                },
                user([{"type": "text", "text": "b"}]),
                {"role": "assistant", "content": ""},  # says nothing: no turn
                {"role": "assistant", "content": "c", "name": "bot"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "d"}, {"type": "refusal", "refusal": "e"}],
                },
            ]
        }
    )
    assert body["system"] == "one\n\ntwo\nthree"
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "c"},
                {"type": "text", "text": "d"},
                {"type": "text", "text": "e"},
            ],
        },
    ]


def test_tool_calls_and_results() -> None:
    body = encode(
        {
            "messages": [
                user("go"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": [1]}'},
                        },
                        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "r2"}]},
                user("thanks"),
            ]
        }
    )
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": [1]}},
                {"type": "tool_use", "id": "c2", "name": "g", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "r1"},
                {"type": "tool_result", "tool_use_id": "c2", "content": [{"type": "text", "text": "r2"}]},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


def test_images() -> None:
    body = encode(
        {
            "messages": [
                user(
                    [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/webp;base64,AAAA", "detail": "low"},
                        },
                        {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
                    ]
                )
            ]
        }
    )
    assert body["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": "AAAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://x.example/a.png"}},
    ]


def call(arguments: Any = "{}", **fields: Any) -> dict[str, Any]:
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}, **fields}


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "function", "name": "f", "content": "x"}, "messages[0].role"),
        ({"role": "system", "content": 3}, "messages[0].content"),
        ({"role": "system", "content": [{"type": "image_url", "image_url": {}}]}, "messages[0].content[0]"),
        (user(None), "messages[0].content"),
        (user([{"type": "input_audio", "input_audio": {}}]), "messages[0].content[0]"),
        (user(["text"]), "messages[0].content[0]"),
        (
            user([{"type": "image_url", "image_url": {"url": "http://x.example/a.png"}}]),
            "messages[0].content[0].image_url.url",
        ),
        (
            user([{"type": "image_url", "image_url": {"url": "data:image/png,AAAA"}}]),
            "messages[0].content[0].image_url.url",
        ),
        (
            user([{"type": "image_url", "image_url": "https://x.example/a.png"}]),
            "messages[0].content[0].image_url.url",
        ),
        ({"role": "assistant", "content": 5}, "messages[0].content"),
        ({"role": "assistant", "content": [{"type": "image_url"}]}, "messages[0].content[0]"),
        ({"role": "assistant", "tool_calls": {"id": "c1"}}, "messages[0].tool_calls"),
        ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "messages[0].tool_calls[0]"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c1", "function": {}}]},
            "messages[0].tool_calls[0].function.name",
        ),
        (
            {"role": "assistant", "tool_calls": [call("{nope")]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "tool_calls": [call("[1, 2]")]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "tool_calls": [call({"a": 1})]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        ({"role": "tool", "tool_call_id": "c1", "content": None}, "messages[0].content"),
    ],
)
def test_bad_messages_are_400_naming_the_place(message: dict[str, Any], param: str) -> None:
    assert refused({"messages": [message]}).param == param


# -- tools ---------------------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {"name": "f", "description": "does f", "parameters": {"type": "object"}},
}


def test_tools() -> None:
    body = encode(
        {
            "messages": [user("x")],
            "tools": [TOOL, {"type": "function", "function": {"name": "g", "strict": True}}],
        }
    )
    assert body["tools"] == [
        {"name": "f", "description": "does f", "input_schema": {"type": "object"}},
        {"name": "g", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body
    assert "tool_choice" not in encode(
        {"messages": [user("x")], "tool_choice": "required"}
    )  # no tools: nothing to choose


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("none", False, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice(choice: Any, parallel: Any, expected: dict[str, Any]) -> None:
    body = encode(
        {"messages": [user("x")], "tools": [TOOL], "tool_choice": choice, "parallel_tool_calls": parallel}
    )
    assert body["tool_choice"] == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0]"),
        ({"tools": [TOOL, {"type": "function", "function": {}}]}, "tools[1]"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
    ],
)
def test_bad_tools_are_400(fields: dict[str, Any], param: str) -> None:
    assert refused({"messages": [user("x")], **fields}).param == param


def test_json_mode_forces_the_answer_tool_once() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}}}
    body = encode(
        {"messages": [user("x")], "response_format": fmt, "tool_choice": "none", "parallel_tool_calls": True}
    )
    assert [t["name"] for t in body["tools"]] == ["city"]
    assert body["tool_choice"] == {"type": "tool", "name": "city", "disable_parallel_tool_use": True}


def test_text_response_format_sends_no_tool() -> None:
    body = encode({"messages": [user("x")], "response_format": {"type": "text"}})
    assert "tools" not in body and "tool_choice" not in body
