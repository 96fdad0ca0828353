"""The mock Cohere upstream, checked against the official `cohere` SDK so it cannot drift into fiction.

The SDK parses leniently (and keeps unknown fields), so every answer is also validated
strictly against the SDK's own types, with no field the types do not declare.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import cohere
import httpx
import pydantic
import pytest
from cohere.types import EmbedByTypeResponse
from cohere.v2.types import V2ChatResponse, V2ChatStreamResponse

from tests.mock_cohere import PROMPT_TEMPLATE_TOKENS, MockCohere
from tests.mock_openai import embedding_vector

STREAM_EVENT = pydantic.TypeAdapter(V2ChatStreamResponse)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[MockCohere]:
    with MockCohere() as mock:
        yield mock


@pytest.fixture
def mock(server: MockCohere) -> Iterator[MockCohere]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def co(mock: MockCohere) -> Iterator[cohere.ClientV2]:
    with httpx.Client(timeout=10) as http:
        yield cohere.ClientV2(base_url=mock.base_url, api_key=mock.api_key, httpx_client=http)


@pytest.fixture
def raw(mock: MockCohere) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {mock.api_key}"}
    with httpx.Client(base_url=mock.base_url, headers=headers, timeout=10) as client:
        yield client


# Fields the real API sends beyond the SDK's types, as Cohere's own streaming docs show them:
# message-start carries the empty message skeleton.
DOCUMENTED_EXTRAS = {"$.delta.message": {"content", "tool_plan", "tool_calls", "citations"}}


def no_extras(value: Any, where: str = "$", extras: dict[str, set[str]] | None = None) -> None:
    """Every field of `value` is one the SDK's types declare (or one of the documented `extras`)."""
    if isinstance(value, pydantic.BaseModel):
        undeclared = set(value.model_extra or ()) - (extras or {}).get(where, set())
        assert not undeclared, f"{where}: undeclared fields {undeclared}"
        for name in type(value).model_fields:
            no_extras(getattr(value, name), f"{where}.{name}", extras)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            no_extras(item, f"{where}[{i}]", extras)


def strict_chat(body: bytes) -> V2ChatResponse:
    response = V2ChatResponse.model_validate_json(body)
    no_extras(response)
    return response


def sse(body: bytes) -> list[dict[str, Any]]:
    """Cohere's framing: `event: <type>` + one `data:` line per event, then `data: [DONE]`."""
    assert body.endswith(b"data: [DONE]\n\n")
    events = []
    for block in body.split(b"\n\n")[:-2]:
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        data = json.loads(data_line.removeprefix(b"data: "))
        assert data["type"] == event_line.removeprefix(b"event: ").decode()
        extras = DOCUMENTED_EXTRAS if data["type"] == "message-start" else None
        no_extras(STREAM_EVENT.validate_python(data), extras=extras)
        events.append(data)
    return events


def user(text: str) -> list[Any]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


# -- chat ------------------------------------------------------------------------------


def test_chat_echoes_the_last_user_message(co: cohere.ClientV2, mock: MockCohere) -> None:
    raw = co.with_raw_response.chat(model="command-x", messages=user("hi there"))
    response = raw.data

    assert response.message.content is not None
    assert response.message.content[0].text == "echo: hi there"  # type: ignore[union-attr]
    assert response.finish_reason == "COMPLETE"
    strict_chat(raw.response.content)
    assert response.usage is not None and response.usage.billed_units is not None
    assert response.usage.billed_units.input_tokens == 4  # "be brief" + "hi there"
    assert response.usage.tokens is not None
    assert response.usage.tokens.input_tokens == 4 + PROMPT_TEMPLATE_TOKENS
    assert response.usage.billed_units.output_tokens == 3
    sent = mock.requests_to("/v2/chat")[0]
    assert sent.header("authorization") == f"Bearer {mock.api_key}"
    assert sent.json()["stream"] is False


def test_chat_content_blocks_are_read(co: cohere.ClientV2) -> None:
    blocks: Any = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    response = co.chat(model="command-x", messages=[{"role": "user", "content": blocks}])
    assert response.message.content[0].text == "echo: one two"  # type: ignore[index,union-attr]


def test_chat_stream_events_in_order(co: cohere.ClientV2, raw: httpx.Client) -> None:
    events = list(co.chat_stream(model="command-x", messages=user("hello there friend")))
    kinds = [e.type for e in events]
    assert kinds == ["message-start", "content-start"] + ["content-delta"] * 4 + [
        "content-end",
        "message-end",
    ]
    text = "".join(e.delta.message.content.text for e in events if e.type == "content-delta")  # type: ignore[union-attr]
    assert text == "echo: hello there friend"
    end = events[-1]
    assert end.delta.finish_reason == "COMPLETE"  # type: ignore[union-attr]
    assert end.delta.usage.billed_units.output_tokens == 4  # type: ignore[union-attr]

    body = raw.post("/v2/chat", json={"model": "command-x", "messages": user("hi"), "stream": True})
    assert body.headers["content-type"] == "text/event-stream"
    wire = sse(body.content)
    assert wire[0]["delta"]["message"]["role"] == "assistant"
    assert wire[1]["delta"]["message"]["content"] == {"type": "text", "text": ""}


def test_tool_call_when_asked_for(co: cohere.ClientV2, raw: httpx.Client) -> None:
    messages: Any = [{"role": "user", "content": 'call get_weather {"city": "Paris"} please'}]
    raw_response = co.with_raw_response.chat(model="command-x", messages=messages, tools=[WEATHER])
    response = raw_response.data
    strict_chat(raw_response.response.content)

    assert response.finish_reason == "TOOL_CALL"
    assert response.message.tool_plan == "I will call get_weather."
    (call,) = response.message.tool_calls or []
    assert call.function is not None
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments or "") == {"city": "Paris"}
    assert call.id.startswith("get_weather_")


def test_parallel_tool_calls_and_calls_without_arguments(co: cohere.ClientV2) -> None:
    clock = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    messages: Any = [{"role": "user", "content": 'call get_weather {"city": "Oslo"} and call now'}]
    response = co.chat(model="command-x", messages=messages, tools=[WEATHER, clock])  # type: ignore[list-item]
    calls = response.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", '{"city": "Oslo"}'),
        ("now", "{}"),
    ]


def test_no_tool_call_for_unknown_names_or_tool_choice_none(co: cohere.ClientV2) -> None:
    messages: Any = [{"role": "user", "content": "call nothing_known"}]
    response = co.chat(model="command-x", messages=messages, tools=[WEATHER])
    assert response.finish_reason == "COMPLETE" and not response.message.tool_calls
    messages = [{"role": "user", "content": "call get_weather"}]
    response = co.chat(model="command-x", messages=messages, tools=[WEATHER], tool_choice="NONE")
    assert not response.message.tool_calls


def test_tool_choice_required_forces_a_call(co: cohere.ClientV2) -> None:
    clock = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    messages: Any = [{"role": "user", "content": "what now?"}]
    response = co.chat(model="command-x", messages=messages, tools=[clock], tool_choice="REQUIRED")  # type: ignore[list-item]
    assert response.finish_reason == "TOOL_CALL"
    calls = response.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [("now", "{}")]  # type: ignore[union-attr]
    # Asked for by name, the call keeps its arguments.
    messages = [{"role": "user", "content": 'call get_weather {"city": "Rome"}'}]
    response = co.chat(model="command-x", messages=messages, tools=[WEATHER], tool_choice="REQUIRED")
    calls = response.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", '{"city": "Rome"}')]  # type: ignore[union-attr]


def test_tool_call_stream(co: cohere.ClientV2, raw: httpx.Client) -> None:
    messages: Any = [{"role": "user", "content": 'call get_weather {"city": "Paris"}'}]
    events = list(co.chat_stream(model="command-x", messages=messages, tools=[WEATHER]))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["message-start", "tool-plan-delta", "tool-call-start"]
    assert kinds[-2:] == ["tool-call-end", "message-end"]
    start = events[2].delta.message.tool_calls  # type: ignore[union-attr]
    assert start.function.name == "get_weather" and start.function.arguments == ""  # type: ignore[union-attr]
    arguments = "".join(
        e.delta.message.tool_calls.function.arguments  # type: ignore[union-attr]
        for e in events
        if e.type == "tool-call-delta"
    )
    assert json.loads(arguments) == {"city": "Paris"}
    assert kinds.count("tool-call-delta") > 1
    assert events[-1].delta.finish_reason == "TOOL_CALL"  # type: ignore[union-attr]

    body = raw.post(
        "/v2/chat", json={"model": "command-x", "messages": messages, "tools": [WEATHER], "stream": True}
    )
    sse(body.content)


def test_tool_results_round_trip(co: cohere.ClientV2) -> None:
    first = co.chat(
        model="command-x", messages=[{"role": "user", "content": "call get_weather"}], tools=[WEATHER]
    )
    call = (first.message.tool_calls or [])[0]
    messages: Any = [
        {"role": "user", "content": "call get_weather"},
        {"role": "assistant", "tool_plan": first.message.tool_plan, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": "sunny, 21C"}]},
    ]
    response = co.chat(model="command-x", messages=messages, tools=[WEATHER])
    assert response.message.content[0].text == "tool said: sunny, 21C"  # type: ignore[index,union-attr]
    assert response.finish_reason == "COMPLETE"


@pytest.mark.parametrize(
    ("extra", "text", "reason"),
    [
        ({"max_tokens": 2}, "echo: one ", "MAX_TOKENS"),
        ({"stop_sequences": ["two"]}, "echo: one ", "STOP_SEQUENCE"),
    ],
)
def test_max_tokens_and_stop_sequences(
    co: cohere.ClientV2, extra: dict[str, Any], text: str, reason: str
) -> None:
    response = co.chat(model="command-x", messages=[{"role": "user", "content": "one two three"}], **extra)
    assert response.message.content[0].text == text  # type: ignore[index,union-attr]
    assert response.finish_reason == reason


def test_behaviour_finish_reason_and_chunks(co: cohere.ClientV2, mock: MockCohere) -> None:
    mock.behave(model="command-err", finish_reason="ERROR")
    assert co.chat(model="command-err", messages=user("x")).finish_reason == "ERROR"
    end = list(co.chat_stream(model="command-err", messages=user("x")))[-1]
    assert end.delta.finish_reason == "ERROR"  # type: ignore[union-attr]
    assert end.delta.error  # type: ignore[union-attr]

    mock.behave(model="command-many", chunks=5)
    events = list(co.chat_stream(model="command-many", messages=user("x")))
    assert [e.type for e in events].count("content-delta") == 5


def test_error_after_ends_the_stream_with_an_error(co: cohere.ClientV2, mock: MockCohere) -> None:
    mock.behave(model="command-x", chunks=5, error_after=2, error={"message": "model crashed"})
    events = list(co.chat_stream(model="command-x", messages=user("x")))
    assert [e.type for e in events].count("content-delta") == 2
    assert events[-1].type == "message-end"
    assert events[-1].delta.finish_reason == "ERROR"  # type: ignore[union-attr]
    assert events[-1].delta.error == "model crashed"  # type: ignore[union-attr]


def test_reset_after_aborts_the_connection(co: cohere.ClientV2, mock: MockCohere) -> None:
    mock.behave(model="command-x", chunks=5, reset_after=2)
    seen = []
    with pytest.raises(httpx.TransportError):
        for event in co.chat_stream(model="command-x", messages=user("x")):
            seen.append(event.type)
    assert seen.count("content-delta") == 2


# -- embed -----------------------------------------------------------------------------


def test_embed_float_and_base64(co: cohere.ClientV2, raw: httpx.Client) -> None:
    texts = ["alpha beta", "gamma"]
    response = co.embed(
        model="embed-x", texts=texts, input_type="search_document", embedding_types=["float", "base64"]
    )
    assert response.embeddings.float_ == [embedding_vector(t) for t in texts]
    decoded = [list(struct.unpack("<8f", base64.b64decode(b))) for b in response.embeddings.base64 or []]
    assert decoded == response.embeddings.float_
    assert response.meta is not None and response.meta.billed_units is not None
    assert response.meta.billed_units.input_tokens == 3
    assert response.texts == texts

    body = raw.post(
        "/v2/embed",
        json={"model": "embed-x", "texts": ["a"], "input_type": "search_query", "embedding_types": ["float"]},
    )
    parsed = EmbedByTypeResponse.model_validate_json(body.content)
    no_extras(parsed)
    assert parsed.response_type == "embeddings_by_type"


def test_embed_output_dimension(co: cohere.ClientV2) -> None:
    response = co.embed(
        model="embed-x", texts=["a"], input_type="clustering", embedding_types=["float"], output_dimension=16
    )
    assert len((response.embeddings.float_ or [[]])[0]) == 16


# -- errors and validation -------------------------------------------------------------


def test_wrong_or_missing_key_is_cohere_401(mock: MockCohere) -> None:
    with httpx.Client(timeout=10) as http:
        bad = cohere.ClientV2(base_url=mock.base_url, api_key="wrong", httpx_client=http)
        with pytest.raises(cohere.UnauthorizedError) as err:
            bad.chat(model="command-x", messages=user("x"))
    assert err.value.body["message"] == "invalid api token"
    assert set(err.value.body) == {"id", "message"}
    with httpx.Client(base_url=mock.base_url, timeout=10) as anonymous:
        answer = anonymous.post("/v2/chat", json={"model": "command-x", "messages": user("x")})
    assert answer.status_code == 401
    assert answer.json()["message"] == "no api key supplied"


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, cohere.BadRequestError),
        (403, cohere.ForbiddenError),
        (404, cohere.NotFoundError),
        (422, cohere.UnprocessableEntityError),
        (429, cohere.TooManyRequestsError),
        (499, cohere.ClientClosedRequestError),
        (500, cohere.InternalServerError),
        (503, cohere.ServiceUnavailableError),
    ],
)
def test_behaviour_status_is_a_cohere_error(
    co: cohere.ClientV2, mock: MockCohere, status: int, error_class: type[Exception]
) -> None:
    mock.behave(model="command-x", status=status)
    with pytest.raises(error_class) as err:
        co.chat(model="command-x", messages=user("x"), request_options={"max_retries": 0})
    body = err.value.body  # type: ignore[attr-defined]
    assert set(body) == {"id", "message"} and body["message"]
    if status == 429:
        assert err.value.headers["retry-after"] == "1"  # type: ignore[attr-defined]


def test_behaviour_error_message_and_unknown_route(
    co: cohere.ClientV2, mock: MockCohere, raw: httpx.Client
) -> None:
    mock.behave(path="/v2/embed", status=400, error={"message": "invalid request: texts too long"})
    with pytest.raises(cohere.BadRequestError) as err:
        co.embed(model="embed-x", texts=["a"], input_type="search_query", embedding_types=["float"])
    assert err.value.body["message"] == "invalid request: texts too long"
    answer = raw.post("/v1/chat/completions", json={})
    assert answer.status_code == 404 and "message" in answer.json()


@pytest.mark.parametrize(
    ("path", "body", "problem"),
    [
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1},
            "unknown field",
        ),
        ("/v2/chat", {"messages": [{"role": "user", "content": "x"}]}, "model is required"),
        ("/v2/chat", {"model": "m", "messages": []}, "messages must be"),
        ("/v2/chat", {"model": "m", "messages": [{"role": "developer", "content": "x"}]}, "invalid role"),
        ("/v2/chat", {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ("/v2/chat", {"model": "m", "messages": ["x"]}, "must be an object"),
        ("/v2/chat", {"model": "m", "messages": [{"role": "user", "content": 3}]}, "content must be"),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "system", "content": [{"type": "image_url"}]}]},
            "not allowed for system",
        ),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "need text",
        ),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "a", "function": {}}]}]},
            "string arguments",
        ),
        ("/v2/chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "p": 1.0}, "p must be"),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": -1},
            "frequency_penalty",
        ),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
            "temperature",
        ),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop_sequences": list("abcdef")},
            "stop_sequences",
        ),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "REQUIRED"},
            "tool_choice",
        ),
        (
            "/v2/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
            "each tool",
        ),
        (
            "/v2/chat",
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "parameters",
        ),
        (
            "/v2/chat",
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            },
            "response_format",
        ),
        ("/v2/embed", {"model": "m", "texts": ["a"], "input_type": "search"}, "input_type"),
        (
            "/v2/embed",
            {"model": "m", "texts": ["a"], "input_type": "search_query", "input": "a"},
            "unknown field",
        ),
        ("/v2/embed", {"texts": ["a"], "input_type": "search_query"}, "model is required"),
        ("/v2/embed", {"model": "m", "texts": [], "input_type": "search_query"}, "texts must be"),
        ("/v2/embed", {"model": "m", "texts": ["a"] * 97, "input_type": "search_query"}, "at most 96"),
        (
            "/v2/embed",
            {"model": "m", "texts": ["a"], "input_type": "search_query", "embedding_types": ["int8"]},
            "embedding_types",
        ),
        (
            "/v2/embed",
            {"model": "m", "texts": ["a"], "input_type": "search_query", "output_dimension": 0},
            "output_dimension",
        ),
    ],
)
def test_requests_cohere_rejects_are_400(
    raw: httpx.Client, path: str, body: dict[str, Any], problem: str
) -> None:
    answer = raw.post(path, json=body)
    assert answer.status_code == 400, answer.text
    assert problem in answer.json()["message"]


def test_non_object_body_is_400(raw: httpx.Client) -> None:
    answer = raw.post("/v2/chat", content=b"[1]", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert "JSON object" in answer.json()["message"]
