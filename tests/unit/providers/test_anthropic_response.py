"""Anthropic's answers, errors and streams in OpenAI's shape (gateway/providers/anthropic_response.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import UpstreamError
from gateway.providers.anthropic import AnthropicAdapter, AnthropicConfig
from gateway.providers.base import Operation, StreamTranslator

CHAT = Operation.chat


def adapter() -> AnthropicAdapter:
    return AnthropicAdapter("claude", AnthropicConfig(api_key="sk-ant-unit"), "")


# -- answers -------------------------------------------------------------------------------


def message(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 2},
    }
    return orjson.dumps({**base, **fields})


def translated(raw: bytes) -> dict[str, Any]:
    out = adapter().translate_response(CHAT, {}, raw)
    assert out is not None
    ChatCompletion.model_validate_json(out)
    return dict(orjson.loads(out))


def test_message_with_text_tools_and_cache_usage() -> None:
    completion = translated(
        message(
            content=[
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "let me "},
                {"type": "text", "text": "check"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": "é"}},
            ],
            stop_reason="tool_use",
            usage={
                "input_tokens": 5,
                "cache_creation_input_tokens": 7,
                "cache_read_input_tokens": 11,
                "output_tokens": 3,
            },
        )
    )
    assert completion["id"] == "msg_1"
    assert (completion["object"], completion["model"]) == ("chat.completion", "claude-x")
    assert isinstance(completion["created"], int)
    (choice,) = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "let me check"
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a":"é"}'}}
    ]
    assert completion["usage"] == {
        "prompt_tokens": 23,
        "completion_tokens": 3,
        "total_tokens": 26,
        "prompt_tokens_details": {"cached_tokens": 11},
    }


def test_tool_only_message_has_null_content_and_missing_usage_counts_zero() -> None:
    completion = translated(
        message(content=[{"type": "tool_use", "id": "t", "name": "f", "input": {}}], usage=None)
    )
    assert completion["choices"][0]["message"]["content"] is None
    assert completion["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert completion["usage"]["total_tokens"] == 0


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reasons(stop_reason: Any, finish: str) -> None:
    assert translated(message(stop_reason=stop_reason))["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"type": "message"}', b'{"content": "text"}'])
def test_malformed_answer_is_an_upstream_error(raw: bytes) -> None:
    with pytest.raises(UpstreamError) as exc:
        adapter().translate_response(CHAT, {}, raw)
    assert "'claude' (anthropic)" in exc.value.message


# -- errors --------------------------------------------------------------------------------


def anthropic_error(kind: str, text: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": text}, "request_id": "req_1"})


@pytest.mark.parametrize(
    ("status", "kind", "expected_status"),
    [
        (400, "invalid_request_error", 400),
        (401, "authentication_error", 401),
        (402, "billing_error", 402),
        (403, "permission_error", 403),
        (404, "not_found_error", 404),
        (413, "request_too_large", 413),
        (429, "rate_limit_error", 429),
        (500, "api_error", 500),
        (504, "timeout_error", 504),
        (529, "overloaded_error", 503),
    ],
)
def test_errors_keep_status_type_and_message(status: int, kind: str, expected_status: int) -> None:
    out_status, body = adapter().translate_error(status, anthropic_error(kind, "the reason"))
    assert out_status == expected_status
    assert orjson.loads(body) == {
        "error": {"message": "the reason", "type": kind, "param": None, "code": None}
    }


def test_errors_not_in_anthropic_shape() -> None:
    assert adapter().translate_error(529, b"<html>busy</html>") == (503, None)  # overloaded: 503
    assert adapter().translate_error(500, b'{"error": "flat"}') == (500, None)
    _, body = adapter().translate_error(500, b'{"error": {"message": ""}}')
    assert orjson.loads(body)["error"] == {
        "message": "Upstream provider 'claude' answered 500.",
        "type": "api_error",
        "param": None,
        "code": None,
    }


# -- streams -------------------------------------------------------------------------------


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


START = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_s",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 4,
                "cache_creation_input_tokens": 1,
                "cache_read_input_tokens": 2,
                "output_tokens": 1,
            },
        },
    }
)


def text_block(index: int, *pieces: str) -> bytes:
    out = sse({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
    out += sse({"type": "ping"})
    for piece in pieces:
        out += sse(
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
        )
    return out + sse({"type": "content_block_stop", "index": index})


def tool_block(index: int, call_id: str, name: str, *fragments: str) -> bytes:
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    out = sse({"type": "content_block_start", "index": index, "content_block": block})
    for fragment in fragments:
        delta = {"type": "input_json_delta", "partial_json": fragment}
        out += sse({"type": "content_block_delta", "index": index, "delta": delta})
    return out + sse({"type": "content_block_stop", "index": index})


def end(stop_reason: str = "end_turn", **usage: int) -> bytes:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return sse({"type": "message_delta", "delta": delta, "usage": {"output_tokens": 9, **usage}}) + sse(
        {"type": "message_stop"}
    )


def translator(include_usage: bool = False) -> StreamTranslator:
    options = {"include_usage": include_usage}
    built = adapter().stream_translator(
        CHAT, {"model": "m", "messages": [], "stream": True, "stream_options": options}
    )
    assert built is not None
    return built


def run(stream: bytes, include_usage: bool = False, step: int | None = None) -> bytes:
    t = translator(include_usage)
    size = step or len(stream) or 1
    return b"".join(t.feed(stream[i : i + size]) for i in range(0, len(stream), size)) + t.finish()


def chunks(out: bytes) -> list[dict[str, Any]]:
    """OpenAI's framing checked: `data: ` events, `[DONE]` last; each chunk valid for the SDK."""
    events = out.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    parsed = []
    for event in events[:-2]:
        assert event.startswith(b"data: ")
        ChatCompletionChunk.model_validate_json(event[6:])
        parsed.append(orjson.loads(event[6:]))
    return parsed


def test_text_stream() -> None:
    out = chunks(run(START + text_block(0, "Hel", "lo") + end()))
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": None},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in out] == [None, None, None, "stop"]
    assert {(c["id"], c["model"], c["object"]) for c in out} == {
        ("msg_s", "claude-x", "chat.completion.chunk")
    }
    assert all("usage" not in c for c in out)


def test_stream_split_anywhere_gives_the_same_events() -> None:
    stream = (
        START + text_block(0, "a", "ü ", "ç") + tool_block(1, "t1", "f", '{"x"', ": 1}") + end("tool_use")
    )

    def timeless(out: bytes) -> bytes:  # runs may straddle a second
        return re.sub(rb'"created":\d+', b'"created":0', out)

    whole = timeless(run(stream, include_usage=True))
    assert len(chunks(whole)) == 9  # role, 3 texts, tool call, 2 fragments, finish, usage
    for step in (1, 2, 7, 64):
        assert timeless(run(stream, include_usage=True, step=step)) == whole
    assert timeless(run(stream.replace(b"\n", b"\r\n"), include_usage=True, step=5)) == whole


def test_include_usage() -> None:
    out = chunks(run(START + text_block(0, "x") + end(output_tokens=6), include_usage=True))
    *body, last = out
    assert all(c["usage"] is None for c in body)
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 6,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


@pytest.mark.parametrize("include_usage", [True, False])
def test_the_translator_counts_usage_whether_or_not_the_client_sees_it(include_usage: bool) -> None:
    t = translator(include_usage)
    t.feed(
        START
        + text_block(0, "x")
        + sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 6}})
    )
    assert t.usage is None  # known at message_stop only
    out = t.feed(sse({"type": "message_stop"})) + t.finish()

    assert t.usage == (7, 6)
    assert (b'"choices":[],"usage"' in out) is include_usage


def test_message_delta_cumulative_input_counts_win() -> None:
    out = chunks(run(START + end(input_tokens=40, cache_read_input_tokens=0), include_usage=True))
    assert out[-1]["usage"]["prompt_tokens"] == 41
    assert out[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_message_delta_without_usage_keeps_the_counts() -> None:
    stream = (
        START
        + sse({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}})
        + sse({"type": "message_stop"})
    )
    out = chunks(run(stream, include_usage=True))
    assert out[-2]["choices"][0]["finish_reason"] == "length"
    assert (out[-1]["usage"]["prompt_tokens"], out[-1]["usage"]["completion_tokens"]) == (7, 1)


def test_tool_calls_stream() -> None:
    stream = (
        START
        + text_block(0, "checking")
        + tool_block(1, "toolu_a", "f", "", '{"city": ', '"Paris"}')
        + tool_block(2, "toolu_b", "g", "", "{}")
        + end("tool_use")
    )
    out = chunks(run(stream))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[2:] == [
        {
            "tool_calls": [
                {"index": 0, "id": "toolu_a", "type": "function", "function": {"name": "f", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {
            "tool_calls": [
                {"index": 1, "id": "toolu_b", "type": "function", "function": {"name": "g", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


# -- JSON mode (response_format as a forced tool) ----------------------------------------------

JSON_SCHEMA_REQUEST = {
    "model": "m",
    "messages": [],
    "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}}},
}


@pytest.mark.parametrize(
    ("request_fields", "tool"),
    [
        (JSON_SCHEMA_REQUEST, "city"),
        ({"model": "m", "messages": [], "response_format": {"type": "json_object"}}, "json_object"),
    ],
)
def test_json_mode_answer_is_the_tools_input_as_content(request_fields: dict[str, Any], tool: str) -> None:
    raw = message(
        content=[{"type": "tool_use", "id": "toolu_j", "name": tool, "input": {"city": "Zürich", "n": [1]}}],
        stop_reason="tool_use",
    )
    out = adapter().translate_response(CHAT, request_fields, raw)
    ChatCompletion.model_validate_json(out)
    (choice,) = orjson.loads(out)["choices"]
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert json.loads(choice["message"]["content"]) == {"city": "Zürich", "n": [1]}


def test_json_mode_cut_by_max_tokens_says_length() -> None:
    raw = message(
        content=[{"type": "tool_use", "id": "t", "name": "city", "input": {}}], stop_reason="max_tokens"
    )
    (choice,) = orjson.loads(adapter().translate_response(CHAT, JSON_SCHEMA_REQUEST, raw))["choices"]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("{}", "length")


def json_run(stream: bytes, step: int) -> bytes:
    t = adapter().stream_translator(CHAT, {**JSON_SCHEMA_REQUEST, "stream": True})
    assert t is not None
    return b"".join(t.feed(stream[i : i + step]) for i in range(0, len(stream), step)) + t.finish()


@pytest.mark.parametrize("step", [1, 9, 4096])
def test_json_mode_stream_fragments_are_content_deltas(step: int) -> None:
    stream = START + tool_block(0, "toolu_j", "city", "", '{"city": ', '"Paris"}') + end("tool_use")
    out = chunks(json_run(stream, step))
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": None},
        {"content": '{"city": '},
        {"content": '"Paris"}'},
        {},
    ]
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_without_json_mode_a_tool_named_like_the_json_tool_stays_a_tool_call() -> None:
    stream = START + tool_block(0, "toolu_j", "city", "", "{}") + end("tool_use")
    out = chunks(run(stream))
    assert out[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "city"
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_what_has_no_openai_counterpart_is_skipped() -> None:
    stream = (
        START
        + b": a comment line\n\n"
        + sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}
        )
        + sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}}
        )
        + sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "s"},
            }
        )
        + sse({"type": "content_block_delta", "index": 0, "delta": "not an object"})
        + sse(
            {
                "type": "content_block_delta",
                "index": 9,
                "delta": {"type": "input_json_delta", "partial_json": "{}"},
            }
        )
        + sse({"type": "content_block_start", "index": 0, "content_block": "not an object"})
        + sse({"type": "content_block_stop", "index": 0})
        + sse({"type": "brand_new_event"})
        + sse({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": "pre"}})
        + sse({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": ""}})
        + b'data: {"type": "content_block_delta", "index": 1,\ndata: "delta": {"type": "text_delta", "text": "!"}}\n\n'
        + end()
    )
    out = chunks(run(stream))
    assert [c["choices"][0]["delta"] for c in out][1:] == [{"content": "pre"}, {"content": "!"}, {}]


def test_error_event_ends_the_stream_with_an_error_the_sdk_raises() -> None:
    t = translator()
    out = t.feed(
        START
        + text_block(0, "x")
        + sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    *_, error_event, tail = out.split(b"\n\n")
    assert tail == b""
    assert error_event.startswith(b"event: error\ndata: ")
    assert orjson.loads(error_event.split(b"data: ", 1)[1]) == {
        "error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}
    }
    assert t.feed(end()) == b""
    assert t.finish() == b""


def test_error_event_without_details() -> None:
    out = translator().feed(START + sse({"type": "error", "error": "?"}))
    assert (
        b'"message":"Upstream provider \'claude\' (anthropic) failed mid-stream.","type":"api_error"' in out
    )


def test_stream_cut_before_message_stop_ends_with_an_error_event() -> None:
    t = translator()
    t.feed(START + text_block(0, "x") + b"event: message_delta\ndata: {")
    out = t.finish()
    assert out.startswith(b"event: error\ndata: ")
    assert b"ended the stream before message_stop" in out
    assert b"[DONE]" not in out


def test_events_after_message_stop_are_ignored() -> None:
    t = translator()
    t.feed(START + end())
    assert t.feed(text_block(0, "late")) == b""
    assert t.finish() == b"data: [DONE]\n\n"


def test_an_event_that_never_ends_is_refused() -> None:
    t = translator()
    t.feed(START + b"event: content_block_delta\ndata: ")
    with pytest.raises(UpstreamError) as exc:
        for _ in range(20):
            t.feed(b"x" * 65536)
    assert "a stream event over 1048576 bytes" in exc.value.message


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        (b"event: message_start\ndata: {nope\n\n", "not JSON"),
        (b"data: [1, 2]\n\n", "not an object"),
        (text_block(0, "x"), "'content_block_start' before message_start"),
        (
            sse({"type": "content_block_delta", "index": 0, "delta": {}}),
            "'content_block_delta' before message_start",
        ),
        (sse({"type": "message_delta", "delta": {}}), "'message_delta' before message_start"),
        (sse({"type": "message_stop"}), "'message_stop' before message_start"),
        (sse({"type": "message_start"}), "message_start without a message"),
    ],
)
def test_malformed_streams_are_upstream_errors(stream: bytes, says: str) -> None:
    with pytest.raises(UpstreamError) as exc:
        translator().feed(stream)
    assert says in exc.value.message
    assert "'claude' (anthropic)" in exc.value.message
