"""The Cohere adapter: config, request translation, answers, streams and errors, each checked
against the `openai` SDK's own types (strictly: the SDK itself parses leniently)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.config import parse
from gateway.errors import InvalidRequest, UnsupportedOperation, UpstreamError, UpstreamTimeout
from gateway.providers import Capability, Operation, Target, build_adapter
from gateway.providers.cohere import DEFAULT_INPUT_TYPE, CohereAdapter, CohereConfig
from gateway.providers.cohere_response import ERRORS, ChatStream

KEY = "co-key-0123456789abcdef"
CHAT = Operation.chat
EMBED = Operation.embeddings
TARGET = Target("command-a-03-2025")
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}},
}


def adapter(base_path: str = "") -> CohereAdapter:
    built = build_adapter("co", CohereConfig(api_key=KEY), base_path)
    assert isinstance(built, CohereAdapter)
    return built


def chat(target: Target = TARGET, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "alias")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    out: dict[str, Any] = orjson.loads(adapter().encode_body(CHAT, body, target))
    return out


def refused(op: Operation = CHAT, **body: Any) -> InvalidRequest:
    body.setdefault("model", "alias")
    if op is CHAT:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest) as info:
        adapter().encode_body(op, body, TARGET)
    return info.value


def answer(raw: dict[str, Any], op: Operation = CHAT, **request: Any) -> dict[str, Any]:
    """Encode a request, then translate `raw` as its answer (as forward does, in one context)."""
    a = adapter()
    if op is CHAT:
        body: dict[str, Any] = {"model": "alias", "messages": [{"role": "user", "content": "x"}]}
    else:
        body = {"model": "alias", "input": "x", **request}
    a.encode_body(op, body, TARGET)
    out: dict[str, Any] = orjson.loads(a.translate_response(op, body, orjson.dumps(raw)))
    return out


# -- config, auth, targets -------------------------------------------------------------------------


def test_config_from_yaml_with_defaults() -> None:
    provider = parse(f"providers:\n  co: {{type: cohere, api_key: {KEY}}}\n", {}).providers["co"]
    assert isinstance(provider, CohereConfig)
    assert provider.url == "https://api.cohere.com"
    assert provider.enabled
    declared = {c for c in Capability if provider.supports(c)}
    assert declared == {Capability.chat, Capability.embeddings, Capability.streaming, Capability.tools}


def test_auth_header_and_targets() -> None:
    a = adapter("/proxy")
    assert (b"authorization", b"Bearer " + KEY.encode()) in a.keys.keys[0].headers
    assert (b"content-type", b"application/json") in a.keys.keys[0].headers
    assert a.target(CHAT, TARGET) == b"/proxy/v2/chat"
    assert a.target(EMBED, TARGET) == b"/proxy/v2/embed"


@pytest.mark.parametrize("op", [Operation.completions, Operation.images])
def test_other_operations_are_refused(op: Operation) -> None:
    with pytest.raises(UnsupportedOperation, match="'co' \\(cohere\\) does not support"):
        adapter().encode_body(op, {"model": "alias", "prompt": "x"}, TARGET)


# -- chat requests ---------------------------------------------------------------------------------


def test_messages_of_every_role() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "and kind"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"}, image], "name": "ann"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"c":1}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "refusal", "refusal": "no"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c2", "function": {"name": "f"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}], "tool_calls": [
            {"id": "c3", "function": {"name": "g", "arguments": "{}"}},
        ]},
    ]  # fmt: skip
    assert chat(messages=messages)["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "and kind"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": image["image_url"]}]},
        {"role": "assistant", "tool_plan": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"c":1}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "no"}]},
        {"role": "assistant", "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "assistant", "tool_plan": "a", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ]},
    ]  # fmt: skip


def test_parameters_are_translated_and_the_model_replaced() -> None:
    body = {
        "model": "alias",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "seed": 7,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.3,
        "max_tokens": 50,
        "stop": "END",
        "top_p": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "n": 1,
        "logprobs": False,
        "logit_bias": {},
        "parallel_tool_calls": True,
        "response_format": {"type": "text"},
        "tool_choice": None,
    }
    out = orjson.loads(adapter().encode_body(CHAT, body, TARGET))
    assert out == {
        "model": "command-a-03-2025",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "seed": 7,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.3,
        "max_tokens": 50,
        "stop_sequences": ["END"],
        "p": 0.5,
        "stream": True,
    }
    assert body["model"] == "command-a-03-2025"  # answers name the upstream model


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_completion_tokens": 9, "max_tokens": 5}, {"max_tokens": 9}),
        ({"max_tokens": 5, "max_completion_tokens": 9}, {"max_tokens": 9}),
        ({"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"]}),
        ({"top_p": 1}, {"p": 0.99}),
        ({"top_p": 0}, {"p": 0.01}),
        ({"top_p": "high"}, {"p": "high"}),  # left for Cohere to reject, with its own message
        ({"stream": False}, {}),
        ({"response_format": {"type": "json_object"}}, {"response_format": {"type": "json_object"}}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            {"response_format": {"type": "json_object", "json_schema": {"type": "object"}}},
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            {"response_format": {"type": "json_object"}},
        ),
        ({"tools": [WEATHER], "tool_choice": "auto"}, {"tools": [WEATHER]}),
        ({"tools": [WEATHER], "tool_choice": "required"}, {"tools": [WEATHER], "tool_choice": "REQUIRED"}),
        ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": [WEATHER], "tool_choice": "NONE"}),
    ],
)
def test_parameter_variants(body: dict[str, Any], expected: dict[str, Any]) -> None:
    out = chat(**body)
    del out["model"], out["messages"]
    assert out == expected


def test_tools_get_a_schema_and_strictness_is_per_request() -> None:
    tools = [
        {"type": "function", "function": {"name": "now"}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}, "strict": True}},
    ]
    out = chat(tools=tools)
    assert out["tools"] == [
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
    ]
    assert out["strict_tools"] is True


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def test_named_tool_choice_sends_that_tool_alone_as_required() -> None:
    clock = {"type": "function", "function": {"name": "now", "strict": True}}
    # tool_choice before tools in the body: the order of the client's fields does not matter.
    out = chat(tool_choice=named("get_weather"), tools=[clock, WEATHER])
    assert out["tools"] == [WEATHER]
    assert out["tool_choice"] == "REQUIRED"
    assert "strict_tools" not in out  # only the strict tool that was left out asked for it

    out = chat(tools=[WEATHER, clock], tool_choice=named("now"))
    assert out["tools"] == [
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    ]
    assert (out["tool_choice"], out["strict_tools"]) == ("REQUIRED", True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": [WEATHER], "tool_choice": named("get_time")}, "names the function 'get_time'"),
        ({"tool_choice": named("get_weather")}, "names the function 'get_weather'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "use 'auto'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}}, "use 'auto'"),
        ({"tools": [WEATHER], "tool_choice": "any"}, "use 'auto'"),
    ],
)
def test_bad_tool_choice_is_400(body: dict[str, Any], message: str) -> None:
    exc = refused(**body)
    assert (exc.status, exc.param) == (400, "tool_choice")
    assert message in exc.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"tools": ["x"]}, "tools[0]"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
    ],
)
def test_parameters_cohere_cannot_honour_are_400(body: dict[str, Any], param: str) -> None:
    exc = refused(**body)
    assert exc.param == param
    assert exc.status == 400
    assert f"Provider 'co' (cohere) does not support '{param}'" in exc.message


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hi", "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "messages[0].content[0]",
        ),
        (
            [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
        ),
        ([{"role": "assistant", "content": None, "tool_calls": "x"}], "messages[0].tool_calls"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}], "messages[0].tool_calls[0]"),
    ],
)
def test_malformed_messages_are_400(messages: Any, param: str) -> None:
    assert refused(messages=messages).param == param


def test_missing_messages_and_tools_not_a_list_are_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        adapter().encode_body(CHAT, {"model": "alias"}, TARGET)
    assert info.value.param == "messages"
    assert refused(tools={"type": "function"}).param == "tools"


# -- embeddings requests ---------------------------------------------------------------------------


def test_embed_request() -> None:
    a = adapter()
    body = {"model": "alias", "input": "hello", "user": "u", "encoding_format": "base64", "dimensions": 256}
    out = orjson.loads(a.encode_body(EMBED, body, Target("embed-v4.0")))
    assert out == {
        "model": "embed-v4.0",
        "texts": ["hello"],
        "input_type": DEFAULT_INPUT_TYPE,
        "embedding_types": ["float"],
        "output_dimension": 256,
    }
    params = {"input_type": "search_query", "truncate": "END"}
    out = orjson.loads(
        a.encode_body(EMBED, {"model": "a", "input": ["x", "y"]}, Target("embed-v4.0", params))
    )
    assert out["texts"] == ["x", "y"]
    assert out["input_type"] == "search_query"
    assert out["truncate"] == "END"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [1, 2, 3]}, "input"),
        ({"input": [[1, 2]]}, "input"),
        ({"input": []}, "input"),
        ({}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "extra": 1}, "extra"),
    ],
)
def test_embed_requests_cohere_cannot_honour_are_400(body: dict[str, Any], param: str) -> None:
    exc = refused(EMBED, **body)
    assert exc.param == param
    assert "Provider 'co' (cohere)" in exc.message


# -- answers ---------------------------------------------------------------------------------------

USAGE = {
    "billed_units": {"input_tokens": 5.0, "output_tokens": 3.0},
    "tokens": {"input_tokens": 12, "output_tokens": 3},
}


def test_text_answer() -> None:
    raw = {
        "id": "c0ffee",
        "finish_reason": "COMPLETE",
        "message": {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hello"}],
            "citations": [],
        },
        "usage": USAGE,
    }
    out = answer(raw)
    ChatCompletion.model_validate(out, strict=True)
    assert out["id"] == "c0ffee"
    assert out["object"] == "chat.completion"
    assert out["model"] == "command-a-03-2025"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_tool_call_answer() -> None:
    calls = [
        {
            "id": "get_weather_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"P"}'},
        },
        {"id": "now_2", "type": "function", "function": {"name": "now", "arguments": ""}},
    ]
    raw = {
        "id": "x",
        "finish_reason": "TOOL_CALL",
        "message": {"role": "assistant", "tool_plan": "I will.", "tool_calls": calls},
    }
    out = answer(raw)
    ChatCompletion.model_validate(out, strict=True)
    message = out["choices"][0]["message"]
    assert message["content"] == "I will."
    assert message["tool_calls"] == [calls[0], {**calls[1], "function": {"name": "now", "arguments": "{}"}}]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    raw = {"id": "x", "finish_reason": "COMPLETE", "message": {"tool_calls": calls[:1]}}
    out = answer(raw)
    assert out["choices"][0]["message"]["content"] is None
    assert (
        out["choices"][0]["finish_reason"] == "tool_calls"
    )  # Cohere may say COMPLETE; OpenAI says tool_calls


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("COMPLETE", "stop"), ("STOP_SEQUENCE", "stop"), ("MAX_TOKENS", "length"), ("ERROR_TOXIC", "content_filter"),
     ("SOMETHING_NEW", "stop")],
)  # fmt: skip
def test_finish_reasons(reason: str, finish: str) -> None:
    out = answer(
        {"id": "x", "finish_reason": reason, "message": {"content": [{"type": "text", "text": "a"}]}}
    )
    assert out["choices"][0]["finish_reason"] == finish


def test_usage_falls_back_to_tokens_and_empty_answer_has_empty_content() -> None:
    raw = {
        "finish_reason": "COMPLETE",
        "message": {},
        "usage": {"tokens": {"input_tokens": 12, "output_tokens": 2}},
    }
    out = answer(raw)
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    assert out["choices"][0]["message"]["content"] == ""
    assert out["id"].startswith("chatcmpl-")


@pytest.mark.parametrize(("reason", "error"), [("ERROR", UpstreamError), ("TIMEOUT", UpstreamTimeout)])
def test_failed_generation_is_an_upstream_error(reason: str, error: type[UpstreamError]) -> None:
    with pytest.raises(error) as info:
        answer({"id": "x", "finish_reason": reason, "message": {}})
    assert type(info.value) is error
    assert f"'co' (cohere) ended the generation with {reason}" in info.value.message


@pytest.mark.parametrize("raw", [b"not json", b"[1]"])
def test_malformed_answer_is_an_upstream_error(raw: bytes) -> None:
    a = adapter()
    for op, body in (
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
        (EMBED, {"model": "m", "input": "x"}),
    ):
        a.encode_body(op, body, TARGET)
        with pytest.raises(UpstreamError, match="not a JSON object"):
            a.translate_response(op, body, raw)


def test_embeddings_answer_float_and_base64() -> None:
    vectors = [[0.5, -0.25, 1.0], [0.125, 0.0, -1.0]]
    raw = {
        "id": "e",
        "embeddings": {"float": vectors},
        "texts": ["a", "b"],
        "meta": {"billed_units": {"input_tokens": 4}},
    }
    out = answer(raw, EMBED)
    CreateEmbeddingResponse.model_validate(out, strict=True)
    assert out == {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": "command-a-03-2025",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    out = answer(raw, EMBED, encoding_format="base64")
    decoded = [list(struct.unpack("<3f", base64.b64decode(d["embedding"]))) for d in out["data"]]
    assert decoded == vectors
    assert answer({"embeddings": {}}, EMBED)["data"] == []


def test_each_request_answers_with_its_own_model() -> None:
    a = adapter()
    raw = orjson.dumps({"id": "x", "finish_reason": "COMPLETE", "message": {}})

    def request(model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": "alias", "messages": [{"role": "user", "content": "x"}]}
        a.encode_body(CHAT, body, Target(model))
        return body

    one, two = request("m-one"), request("m-two")
    assert orjson.loads(a.translate_response(CHAT, two, raw))["model"] == "m-two"
    assert orjson.loads(a.translate_response(CHAT, one, raw))["model"] == "m-one"


# -- streams ---------------------------------------------------------------------------------------


def event(data: dict[str, Any]) -> bytes:
    return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def text_stream(*pieces: str, reason: str = "COMPLETE", usage: dict[str, Any] | None = None) -> bytes:
    skeleton = {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
    out = event({"id": "msg-1", "type": "message-start", "delta": {"message": skeleton}})
    out += event(
        {"type": "content-start", "index": 0, "delta": {"message": {"content": {"type": "text", "text": ""}}}}
    )
    for piece in pieces:
        out += event(
            {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": piece}}}}
        )
    out += event({"type": "content-end", "index": 0})
    out += event({"type": "message-end", "delta": {"finish_reason": reason, "usage": usage or USAGE}})
    return out + b"data: [DONE]\n\n"


TOOL_STREAM = (
    event({"id": "msg-2", "type": "message-start", "delta": {"message": {"role": "assistant"}}})
    + event({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": "I will "}}})
    + event({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": "look."}}})
    + event({"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": {
        "id": "get_weather_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}}}})
    + event({"type": "tool-call-delta", "index": 0, "delta": {"message": {"tool_calls": {"function": {"arguments": '{"ci'}}}}})
    + event({"type": "tool-call-delta", "index": 0, "delta": {"message": {"tool_calls": {"function": {"arguments": 'ty":"P"}'}}}}})
    + event({"type": "tool-call-end", "index": 0})
    + event({"type": "tool-call-start", "index": 1, "delta": {"message": {"tool_calls": {
        "id": "now_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}}}})
    + event({"type": "tool-call-delta", "index": 1, "delta": {"message": {"tool_calls": {"function": {}}}}})
    + event({"type": "tool-call-end", "index": 1})
    + event({"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": USAGE}})
    + b"data: [DONE]\n\n"
)  # fmt: skip


def run(stream: bytes, include_usage: bool = False, split: int | None = None) -> bytes:
    translator = adapter().stream_translator(
        CHAT, {"model": "command-x", "stream": True, "stream_options": {"include_usage": include_usage}}
    )
    assert isinstance(translator, ChatStream)
    step = split or len(stream)
    out = b"".join(translator.feed(stream[i : i + step]) for i in range(0, len(stream), step))
    return out + translator.finish()


def chunks(sse: bytes) -> list[dict[str, Any]]:
    """OpenAI's framing: `data: <json>` events, then `data: [DONE]`; each chunk valid for the SDK."""
    assert sse.endswith(b"data: [DONE]\n\n")
    out = []
    for block in sse.split(b"\n\n")[:-2]:
        assert block.startswith(b"data: ") and b"\n" not in block
        chunk = orjson.loads(block[6:])
        ChatCompletionChunk.model_validate(chunk, strict=True)
        out.append(chunk)
    return out


def deltas(parsed: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None]]:
    return [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in parsed if c["choices"]]


def test_text_stream() -> None:
    parsed = chunks(run(text_stream("Hel", "lo")))
    assert deltas(parsed) == [
        ({"role": "assistant", "content": "", "refusal": None}, None),
        ({"content": "Hel"}, None),
        ({"content": "lo"}, None),
        ({}, "stop"),
    ]
    assert {c["id"] for c in parsed} == {"msg-1"}
    assert {c["model"] for c in parsed} == {"command-x"}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in parsed)


def test_include_usage_adds_a_last_usage_chunk() -> None:
    parsed = chunks(run(text_stream("a", reason="MAX_TOKENS"), include_usage=True))
    assert all(c["usage"] is None for c in parsed[:-1])
    assert parsed[-2]["choices"][0]["finish_reason"] == "length"
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


@pytest.mark.parametrize("include_usage", [True, False])
def test_the_translator_counts_usage_whether_or_not_the_client_sees_it(include_usage: bool) -> None:
    translator = adapter().stream_translator(
        CHAT, {"model": "command-x", "stream": True, "stream_options": {"include_usage": include_usage}}
    )
    stream = text_stream("a", "b")
    head, tail = stream.split(b"event: message-end")
    translator.feed(head)
    assert translator.usage is None  # known at message-end only
    out = translator.feed(b"event: message-end" + tail) + translator.finish()

    assert translator.usage == (5, 3)
    assert (b'"choices":[],"usage"' in out) is include_usage


@pytest.mark.parametrize("split", [1, 2, 7, 64])
def test_bytes_split_anywhere_give_the_same_stream(split: int) -> None:
    whole = run(TOOL_STREAM, include_usage=True)
    assert run(TOOL_STREAM, include_usage=True, split=split) == whole
    crlf = TOOL_STREAM.replace(b"\n", b"\r\n")
    assert run(crlf, include_usage=True, split=split) == whole


def test_tool_call_stream() -> None:
    parsed = chunks(run(TOOL_STREAM))
    assert deltas(parsed) == [
        ({"role": "assistant", "content": "", "refusal": None}, None),
        ({"content": "I will "}, None),
        ({"content": "look."}, None),
        ({"tool_calls": [{"index": 0, "id": "get_weather_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": ""}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"P"}'}}]}, None),
        ({"tool_calls": [{"index": 1, "id": "now_2", "type": "function",
                          "function": {"name": "now", "arguments": "{}"}}]}, None),
        ({}, "tool_calls"),
    ]  # fmt: skip


def test_stream_tolerates_missing_start_thinking_comments_and_multiline_data() -> None:
    stream = (
        b": keep-alive\n\n"
        + event(
            {"type": "content-start", "index": 0, "delta": {"message": {"content": {"type": "thinking"}}}}
        )
        + event({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"thinking": "hmm"}}}})
        + b'event: content-delta\ndata: {"type":"content-delta",\ndata: "delta":{"message":{"content":{"text":"Hi"}}}}\n\n'
        + event({"type": "citation-start", "index": 0, "delta": {"message": {"citations": {}}}})
        + event({"type": "message-end", "delta": {"finish_reason": "STOP_SEQUENCE"}})
        + event({"type": "content-delta", "delta": {"message": {"content": {"text": "late"}}}})
    )
    parsed = chunks(run(stream))
    assert deltas(parsed)[1:] == [({"content": "Hi"}, None), ({}, "stop")]
    assert parsed[0]["id"].startswith("chatcmpl-")


def test_last_event_without_a_blank_line_is_read_at_the_end() -> None:
    stream = text_stream("a").removesuffix(b"data: [DONE]\n\n").removesuffix(b"\n\n")
    assert deltas(chunks(run(stream)))[-1] == ({}, "stop")


def error_event(sse: bytes) -> dict[str, Any]:
    _, _, last = sse.rstrip(b"\n").rpartition(b"\n\n")
    assert last.startswith(b"event: error\ndata: ")
    assert b"[DONE]" not in sse
    error: dict[str, Any] = orjson.loads(last.split(b"data: ", 1)[1])["error"]
    return error


@pytest.mark.parametrize(
    ("end", "kind", "text"),
    [
        ({"finish_reason": "ERROR", "error": "model crashed"}, "upstream_error", "with ERROR: model crashed"),
        ({"finish_reason": "TIMEOUT"}, "upstream_error", "with TIMEOUT."),
        ({"finish_reason": "COMPLETE", "error": "odd"}, "upstream_error", "with ERROR: odd"),
    ],
)
def test_failed_generation_ends_the_stream_with_an_error_event(
    end: dict[str, Any], kind: str, text: str
) -> None:
    translator = adapter().stream_translator(CHAT, {"model": "m", "stream": True})
    out = translator.feed(text_stream("a").split(b"event: message-end")[0])
    out += translator.feed(event({"type": "message-end", "delta": end}))
    assert translator.feed(text_stream("more")) == b""
    out += translator.finish()
    error = error_event(out)
    assert error["type"] == kind
    assert text in error["message"]
    assert b'"content":"a"' in out


@pytest.mark.parametrize(
    ("stream", "text"),
    [
        (text_stream("a").split(b"event: message-end")[0], "ended the stream early"),
        (b"event: content-delta\ndata: {not json\n\n" + text_stream("a"), "malformed stream event"),
    ],
)
def test_broken_streams_end_with_an_error_event(stream: bytes, text: str) -> None:
    error = error_event(run_raw(stream))
    assert text in error["message"]
    assert "'co' (cohere)" in error["message"]


def run_raw(stream: bytes) -> bytes:
    translator = adapter().stream_translator(CHAT, {"model": "m", "stream": True})
    return translator.feed(stream) + translator.finish()


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "expected"), sorted(ERRORS.items()))
def test_error_status_mapping(status: int, expected: tuple[int, str, str | None]) -> None:
    out_status, body = adapter().translate_error(
        status, orjson.dumps({"id": "e-1", "message": "upstream words"})
    )
    error = orjson.loads(body)["error"]
    assert (out_status, error["type"], error["code"]) == expected
    assert error == {
        "message": f"Upstream provider 'co' (cohere) answered {status}: upstream words",
        "type": expected[1],
        "param": None,
        "code": expected[2],
    }


@pytest.mark.parametrize(
    ("status", "raw", "mapped", "message"),
    [
        (418, b'{"message": "teapot"}', 400, "answered 418: teapot"),
        (400, b'{"error": {"message": "openai-shaped"}}', 400, "answered 400: openai-shaped"),
    ],
)
def test_error_bodies_of_cohere_and_openai_shape(status: int, raw: bytes, mapped: int, message: str) -> None:
    out_status, body = adapter().translate_error(status, raw)
    assert out_status == mapped
    assert body is not None and orjson.loads(body)["error"]["message"].endswith(message)


@pytest.mark.parametrize(
    ("status", "raw", "mapped"),
    [(507, b"", 502), (500, b"<html>oops</html>", 500), (400, b'{"message": ""}', 400), (503, b"[1]", 503)],
)
def test_error_bodies_of_another_shape_are_left_to_the_gateway(status: int, raw: bytes, mapped: int) -> None:
    assert adapter().translate_error(status, raw) == (mapped, None)  # the status is mapped all the same
