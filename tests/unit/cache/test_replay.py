"""A stored answer in the other mode: streams assembled into JSON, JSON cut into SSE."""

from __future__ import annotations

from typing import Any

import orjson
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion import Completion

from gateway.cache.replay import (
    JSON_CONTENT_TYPE,
    SSE_CONTENT_TYPE,
    fit,
    json_to_sse,
    sse_to_json,
    wants_usage,
)

BASE = {"id": "chatcmpl-1", "created": 1700000000, "model": "m", "system_fingerprint": "fp"}


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps({**BASE, **e}) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunk(
    delta: dict[str, Any], finish: str | None = None, index: int = 0, logprobs: Any = None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"object": "chat.completion.chunk", "choices": [choice]}


def events(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"data: [DONE]\n\n")
    return [orjson.loads(line[6:]) for line in body.splitlines() if line.startswith(b"data: {")]


def test_chat_stream_assembles_content_tools_logprobs_and_usage() -> None:
    token = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    stream = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}, logprobs={"content": [token], "refusal": None}),
        chunk({"content": "lo"}, logprobs={"content": [token], "refusal": None}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        chunk({"content": "second"}, index=1),
        chunk({}, "tool_calls"),
        chunk({}, "stop", index=1),
        {
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        },
    )
    answer = orjson.loads(sse_to_json(stream) or b"")
    ChatCompletion.model_validate(answer)
    assert answer["object"] == "chat.completion" and answer["id"] == "chatcmpl-1"
    assert answer["system_fingerprint"] == "fp" and answer["usage"]["total_tokens"] == 3
    first, second = answer["choices"]
    assert first["message"]["content"] == "Hello" and first["finish_reason"] == "tool_calls"
    assert first["logprobs"] == {"content": [token, token], "refusal": None}
    assert first["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": ""}},
    ]
    assert second == {
        "index": 1,
        "message": {"role": "assistant", "content": "second", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_broken_or_foreign_streams_do_not_assemble() -> None:
    assert sse_to_json(sse(chunk({"content": "a"})) + b"event: error\ndata: {}\n\n") is None
    assert sse_to_json(b'data: {"error": {"message": "x"}}\n\n') is None
    assert sse_to_json(b"data: {not json\n\n") is None
    assert sse_to_json(b"data: [DONE]\n\n") is None
    assert json_to_sse(b'{"object": "list", "data": []}', include_usage=False) is None
    assert json_to_sse(b"not json", include_usage=False) is None


def test_chat_json_cuts_into_chunks_that_add_up_to_it() -> None:
    answer = {
        **BASE,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    body = orjson.dumps(answer)
    with_usage = json_to_sse(body, include_usage=True) or b""
    parsed = events(with_usage)
    for event in parsed:
        ChatCompletionChunk.model_validate(event)
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert parsed[1]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert parsed[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"] == answer["usage"]
    assert all(e["usage"] is None for e in parsed[:-1])
    assert orjson.loads(sse_to_json(with_usage) or b"") == answer
    without = events(json_to_sse(body, include_usage=False) or b"")
    assert len(without) == 3 and all("usage" not in e for e in without)


def test_legacy_completions_both_ways() -> None:
    answer = {
        **BASE,
        "object": "text_completion",
        "choices": [{"text": "echo: hi", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    cut = json_to_sse(orjson.dumps(answer), include_usage=True) or b""
    for event in events(cut):
        Completion.model_validate(event)
    assert orjson.loads(sse_to_json(cut) or b"") == answer
    pieces: list[dict[str, Any]] = [
        {"object": "text_completion", "choices": [{"text": t, "index": 0, "logprobs": None}]} for t in "ab"
    ]
    pieces[-1]["choices"][0]["finish_reason"] = "length"
    assembled = orjson.loads(sse_to_json(sse(*pieces)) or b"")
    assert assembled["choices"] == [{"text": "ab", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert "usage" not in assembled


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
WITH_USAGE = sse(
    chunk({"role": "assistant", "content": "hi"}),
    chunk({}, "stop"),
    {"object": "chat.completion.chunk", "choices": [], "usage": USAGE},
)
WITHOUT_USAGE = sse(chunk({"role": "assistant", "content": "hi"}), chunk({}, "stop"))
ANSWER = orjson.dumps(
    {
        **BASE,
        "object": "chat.completion",
        "usage": USAGE,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
)


def test_wants_usage_json_always_stream_only_when_asked() -> None:
    assert wants_usage({}) and wants_usage({"stream": False})
    assert not wants_usage({"stream": True}) and not wants_usage({"stream": True, "stream_options": None})
    assert wants_usage({"stream": True, "stream_options": {"include_usage": True}})
    assert not wants_usage({"stream": True, "stream_options": {"include_usage": False}})


def test_fit_a_stream_with_usage_serves_every_request() -> None:
    assert fit(SSE_CONTENT_TYPE, WITH_USAGE, {"stream": True, "stream_options": {"include_usage": True}}) == (
        SSE_CONTENT_TYPE,
        WITH_USAGE,
    )
    stripped = fit(SSE_CONTENT_TYPE, WITH_USAGE, {"stream": True})
    assert stripped is not None and stripped[1] == WITHOUT_USAGE
    as_json = fit(SSE_CONTENT_TYPE, WITH_USAGE, {})
    assert as_json is not None and as_json[0] == JSON_CONTENT_TYPE
    assert orjson.loads(as_json[1])["usage"] == USAGE


def test_fit_a_stream_without_usage_serves_only_streams_that_do_not_ask() -> None:
    assert fit(SSE_CONTENT_TYPE, WITHOUT_USAGE, {"stream": True}) == (SSE_CONTENT_TYPE, WITHOUT_USAGE)
    assert fit(SSE_CONTENT_TYPE, WITHOUT_USAGE, {}) is None
    assert (
        fit(SSE_CONTENT_TYPE, WITHOUT_USAGE, {"stream": True, "stream_options": {"include_usage": True}})
        is None
    )


def test_fit_a_json_answer_serves_both_modes_with_usage_only_when_asked() -> None:
    assert fit(JSON_CONTENT_TYPE, ANSWER, {}) == (JSON_CONTENT_TYPE, ANSWER)
    plain = fit(JSON_CONTENT_TYPE, ANSWER, {"stream": True})
    counted = fit(JSON_CONTENT_TYPE, ANSWER, {"stream": True, "stream_options": {"include_usage": True}})
    assert plain is not None and counted is not None
    assert all(e.get("usage") is None for e in events(plain[1]))
    assert events(counted[1])[-1]["usage"] == USAGE
    assert fit(JSON_CONTENT_TYPE, b"not json", {"stream": True}) is None
