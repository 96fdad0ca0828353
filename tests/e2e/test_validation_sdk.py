"""Validation seen from the official openai SDK against a real gateway process.

Everything the SDK's types let a caller send must pass untouched (validation
must not refuse what a real client sends); what cannot be valid comes back as
the SDK's BadRequestError with `param` naming the field, and never reaches the upstream.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.mock_openai import MockOpenAI

from .conftest import GatewayFactory, GatewayProcess, default_config

pytestmark = pytest.mark.e2e

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
}
FUNCTION_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}
CUSTOM_TOOL = {
    "type": "custom",
    "custom": {"name": "sql", "description": "SQL", "format": {"type": "grammar", "grammar": {"definition": "start: /.+/", "syntax": "lark"}}},
}
WAV = base64.b64encode(b"RIFF0000WAVEfmt ").decode()
CONVERSATION: list[Any] = [
    {"role": "developer", "content": "Be brief."},
    {"role": "system", "content": [{"type": "text", "text": "You answer about weather."}], "name": "setup"},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this image and this recording, and the weather in Paris?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
        {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
        {"type": "file", "file": {"file_id": "file-123"}},
    ], "name": "alice"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "custom", "custom": {"name": "sql", "input": "select 1"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "1"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It is 18 C."}, {"type": "refusal", "refusal": "No SQL."}]},
    {"role": "assistant", "refusal": "I cannot help with that."},
    {"role": "assistant", "content": "", "audio": {"id": "audio_abc"}},
    {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
    {"role": "function", "name": "get_weather", "content": None},
    {"role": "user", "content": "Thanks!"},
]

# Each: keyword arguments of client.chat.completions.create, beside model and messages.
CHAT_CALLS: list[Any] = [
    pytest.param({}, id="plain"),
    pytest.param({"messages": CONVERSATION}, id="every-role-and-part"),
    pytest.param(
        {"temperature": 0, "top_p": 1, "n": 2, "max_tokens": 100, "presence_penalty": -2, "frequency_penalty": 2,
         "stop": ["\n", "END", "###", "."], "logit_bias": {"50256": -100, "13": 5}, "logprobs": True,
         "top_logprobs": 20, "seed": 42, "user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k",
         "metadata": {"team": "a"}, "store": False, "service_tier": "auto", "verbosity": "low",
         "reasoning_effort": "minimal"},
        id="sampling",
    ),
    pytest.param({"max_completion_tokens": 1_000_000, "temperature": 2, "stop": "\n"}, id="bounds"),
    pytest.param(
        {"tools": [FUNCTION_TOOL, CUSTOM_TOOL, {"type": "function", "function": {
            "name": "lookup_2", "strict": True, "parameters": {"type": "object", "properties": {}}}}],
         "tool_choice": "auto", "parallel_tool_calls": True},
        id="tools",
    ),
    pytest.param({"tools": [FUNCTION_TOOL], "tool_choice": "required"}, id="tool-choice-required"),
    pytest.param({"tools": [FUNCTION_TOOL], "tool_choice": "none"}, id="tool-choice-none"),
    pytest.param({"tools": [FUNCTION_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                 id="tool-choice-named"),
    pytest.param({"tools": [CUSTOM_TOOL], "tool_choice": {"type": "custom", "custom": {"name": "sql"}}},
                 id="tool-choice-custom"),
    pytest.param({"tools": [FUNCTION_TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}},
        id="tool-choice-allowed"),
    pytest.param({"functions": [{"name": "get_weather", "parameters": WEATHER}], "function_call": {"name": "get_weather"}},
                 id="functions"),
    pytest.param({"response_format": {"type": "json_object"}}, id="json-mode"),
    pytest.param({"response_format": {"type": "text"}}, id="text-format"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
        "name": "weather_report", "description": "d", "schema": WEATHER, "strict": True}}}, id="json-schema"),
    pytest.param({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, id="audio-out"),
    pytest.param({"prediction": {"type": "content", "content": "The weather is"}}, id="prediction"),
    pytest.param({"web_search_options": {"search_context_size": "low"}}, id="web-search"),
    # None is sent as null: "not set"
    pytest.param({"temperature": None, "max_tokens": None, "stop": None, "n": None, "seed": None, "user": None,
                  "stream": None, "stream_options": None, "response_format": None, "logit_bias": None},
                 id="nulls"),
    pytest.param({"extra_body": {"vendor_knob": {"a": [1, 2]}, "top_k": 40, "repetition_penalty": 1.1}},
                 id="extra-body"),
]


@pytest.fixture(scope="module")
def gw(module_gateway_factory: GatewayFactory, mock_upstream: MockOpenAI) -> GatewayProcess:
    return module_gateway_factory(default_config(mock_upstream))


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> openai.OpenAI:
    return gw.client()


@pytest.mark.parametrize("kwargs", CHAT_CALLS)
def test_chat_the_sdk_can_send_passes(client: openai.OpenAI, mock_upstream: MockOpenAI, kwargs: dict[str, Any]) -> None:
    kwargs = {"model": "gpt-mini", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    completion = client.chat.completions.create(**kwargs)
    assert completion.choices, completion
    (sent,) = mock_upstream.requests
    extra = kwargs.pop("extra_body", {})
    body = sent.json()
    for name, value in {**kwargs, **extra}.items():
        if name != "model":  # the alias becomes the deployment's model
            assert body[name] == value, name


def test_chat_stream_with_options_passes(client: openai.OpenAI, mock_upstream: MockOpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-mini", messages=CONVERSATION, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    chunks = list(stream)
    assert chunks and chunks[-1].usage is not None


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.completions.create(model="instruct", prompt="Say hi"), id="completions"),
        pytest.param(lambda c: c.completions.create(model="instruct", prompt=["a", "b"], n=2, best_of=3, echo=True,
                                                    logprobs=5, suffix="!", max_tokens=0, stop=["\n"], seed=1,
                                                    logit_bias={"50256": -100}, user="u"),
                     id="completions-all"),
        pytest.param(lambda c: c.completions.create(model="instruct", prompt=[1, 2, 3]), id="completions-tokens"),
        pytest.param(lambda c: c.completions.create(model="instruct", prompt=[[1, 2], [3]]),
                     id="completions-token-batches"),
        pytest.param(lambda c: c.completions.create(model="instruct", prompt=None), id="completions-null-prompt"),
        pytest.param(lambda c: list(c.completions.create(model="instruct", prompt="x", stream=True,
                                                         stream_options={"include_usage": True})),
                     id="completions-stream"),
        pytest.param(lambda c: c.embeddings.create(model="emb", input="text"), id="embeddings"),
        pytest.param(lambda c: c.embeddings.create(model="emb", input=["a", "b"], dimensions=8,
                                                   encoding_format="float", user="u"), id="embeddings-batch"),
        pytest.param(lambda c: c.embeddings.create(model="emb", input=[1, 2, 3]), id="embeddings-tokens"),
        pytest.param(lambda c: c.embeddings.create(model="emb", input=[[1, 2], [3]]), id="embeddings-token-batches"),
        pytest.param(lambda c: c.images.generate(model="img", prompt="a lighthouse"), id="images"),
        pytest.param(lambda c: c.images.generate(model="img", prompt="a lighthouse", n=2, size="1024x1024",
                                                 quality="hd", style="natural", response_format="b64_json",
                                                 background="auto", output_format="png", output_compression=90,
                                                 moderation="auto", user="u"),
                     id="images-all"),
    ],
)
def test_other_operations_the_sdk_can_send_pass(
    client: openai.OpenAI, mock_upstream: MockOpenAI, call: Callable[[openai.OpenAI], Any]
) -> None:
    assert call(client) is not None
    assert len(mock_upstream.requests) == 1


@pytest.mark.parametrize(
    ("call", "param"),
    [
        pytest.param(lambda c: c.chat.completions.create(model="gpt-mini", messages=[]), "messages", id="no-messages"),
        pytest.param(lambda c: c.chat.completions.create(model="gpt-mini", messages=[{"role": "root", "content": "x"}]),
                     "messages[0].role", id="role"),
        pytest.param(lambda c: c.chat.completions.create(model="gpt-mini", messages=[{"role": "user", "content": "x"}],
                                                         max_tokens=-1), "max_tokens", id="max-tokens"),
        pytest.param(lambda c: c.chat.completions.create(model="gpt-mini", messages=[{"role": "user", "content": "x"}],
                                                         n=1000), "n", id="n"),
        pytest.param(lambda c: c.chat.completions.create(model="gpt-mini", messages=[{"role": "user", "content": "x"}],
                                                         temperature="hot"), "temperature", id="temperature"),
        pytest.param(lambda c: c.chat.completions.create(
            model="gpt-mini", messages=[{"role": "user", "content": "x"}],
            tools=[FUNCTION_TOOL, {"type": "function", "function": {"name": "two words"}}]),
            "tools[1].function.name", id="tool-name"),
        pytest.param(lambda c: c.chat.completions.create(model="gpt-mini", messages=[{"role": "user", "content": "x"}],
                                                         stream_options={"include_usage": True}),
                     "stream_options", id="stream-options"),
        pytest.param(lambda c: c.embeddings.create(model="emb", input=""), "input", id="embeddings"),
        pytest.param(lambda c: c.images.generate(model="img", prompt="cat", n=11), "n", id="images"),
        pytest.param(lambda c: c.completions.create(model="instruct", prompt="x", n=200), "n", id="completions"),
    ],
)
def test_invalid_comes_back_as_the_sdks_bad_request(
    client: openai.OpenAI, mock_upstream: MockOpenAI, call: Callable[[openai.OpenAI], Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        call(client)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.type == "invalid_request_error" and info.value.code
    assert param in info.value.message
    assert mock_upstream.requests == []
